"""The oci extractor against hostile and tricky layers: nothing may land outside the root."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import oci_leftovers, oci_refs
from loopback_registry import busybox_entries, push_layers, tar_bytes

from agentkernel.images.layers import Extractor
from agentkernel.images.pullerrors import PullError


def extract(tmp_path, *layers, keep_setuid: bool = False):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    ex = Extractor(str(root), keep_setuid=keep_setuid)
    for i, entries in enumerate(layers):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(tar_bytes(entries))
        ex.layer(str(p), None)
    return root, ex


@pytest.mark.parametrize("entries,why", [
    ([("../escape", "file", b"x")], "climbs out"),
    ([("a/../../escape", "file", b"x")], "climbs out"),
    ([("/abs-escape", "file", b"x")], "absolute"),
    ([("evil", "symlink", "/tmp/ak-outside-target"), ("evil/pwned", "file", b"x")], "through the symlink"),
    ([("up", "symlink", "../../../../.."), ("up/tmp/pwned", "file", b"x")], "through the symlink"),
    ([("hl", "hardlink", "../../etc/passwd")], "climbs out"),
    ([("hl", "hardlink", "/etc/passwd")], "absolute"),
    ([("lnk", "symlink", "/etc"), ("hl", "hardlink", "lnk/passwd")], "through the symlink"),
])
def test_hostile_entries_refused(tmp_path, entries, why):
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(PullError) as ei:
        extract(tmp_path, entries)
    assert ei.value.kind == "unsafe-layer"
    assert why in ei.value.message
    assert not os.path.exists("/tmp/ak-outside-target/pwned")
    assert not (tmp_path / "escape").exists() and not os.path.exists("/abs-escape")
    assert not os.path.exists("/tmp/pwned")


def test_symlink_in_a_later_layer_cannot_redirect_writes(tmp_path):
    with pytest.raises(PullError):
        extract(tmp_path, [("etc", "symlink", "/etc")], [("etc/ak-pwned", "file", b"x")])
    assert not os.path.exists("/etc/ak-pwned")


def test_policy_setuid_devices_and_whiteouts(tmp_path):
    root, ex = extract(
        tmp_path,
        [("bin", "dir"), ("bin/su", "file", b"x", {"mode": 0o4755}), ("dev", "dir"), ("dev/null", "chr"),
         ("gone", "file", b"1"), ("dir", "dir"), ("dir/old", "file", b"1"), ("fifo", "fifo"),
         ("abs-link", "symlink", "/bin/su")],
        [(".wh.gone", "file"), ("dir/.wh..wh..opq", "file"), ("dir/new", "file", b"2"),
         ("hard", "hardlink", "bin/su")],
    )
    assert stat.S_IMODE(os.lstat(root / "bin/su").st_mode) == 0o755  # setuid stripped
    assert not (root / "dev/null").exists() and ex.devices_skipped == 1
    assert not (root / "gone").exists()
    assert sorted(os.listdir(root / "dir")) == ["new"]
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert os.readlink(root / "abs-link") == "/bin/su"  # an absolute symlink is data, kept as is
    assert os.lstat(root / "hard").st_ino == os.lstat(root / "bin/su").st_ino
    (tmp_path / "keep").mkdir()
    root2, _ = extract(tmp_path / "keep", [("su", "file", b"x", {"mode": 0o4755})], keep_setuid=True)
    assert stat.S_IMODE(os.lstat(root2 / "su").st_mode) == 0o4755


def test_diff_id_checked(tmp_path):
    p = tmp_path / "l.tar"
    p.write_bytes(tar_bytes([("f", "file", b"x")]))
    (tmp_path / "root").mkdir()
    with pytest.raises(PullError) as ei:
        Extractor(str(tmp_path / "root")).layer(str(p), "sha256:" + "0" * 64)
    assert ei.value.kind == "digest-mismatch"


@pytest.mark.parametrize("evil", ["dotdot", "symlink-parent", "hardlink-out"])
def test_malicious_image_from_registry_refused(fresh_registry, env, evil):
    reg = fresh_registry
    bad = {"dotdot": [("../../../../tmp/ak-evil-dotdot", "file", b"x")],
           "symlink-parent": [("evil", "symlink", "/tmp"), ("evil/ak-evil-symlink", "file", b"x")],
           "hardlink-out": [("hl", "hardlink", "../../../../etc/passwd")]}[evil]
    push_layers(reg, f"library/evil-{evil}:1", [tar_bytes(busybox_entries()), tar_bytes(bad)])
    env.login(reg)
    ref = reg.ref(f"library/evil-{evil}:1")
    r = env.ak("run", "-B", "oci", "-i", ref, "--", "echo", "ran")
    assert r.returncode == 125, r.stderr
    assert "refusing layer" in r.stderr, r.stderr
    assert "ran" not in r.stdout
    assert not os.path.exists("/tmp/ak-evil-dotdot") and not os.path.exists("/tmp/ak-evil-symlink")
    assert not oci_leftovers(env.cache) and ref not in oci_refs(env.cache)
    rootfs = os.path.join(env.cache, "oci", "rootfs")
    assert not os.path.isdir(rootfs) or [n for n in os.listdir(rootfs) if not n.startswith(".lock")] == []
