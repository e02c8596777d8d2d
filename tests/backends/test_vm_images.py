"""Guest images for the microVM backends (``agentkernel images build --vm``): real kernel package, real
mkfs.ext4 and qemu-img, the real agent. Content-keyed: a second build does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from agentkernel import paths
from agentkernel.vm import guestimage
from tests.conftest import ak, need

pytestmark = [pytest.mark.engine("qemu"), pytest.mark.timeout(300)]

IMAGE = "agentkernel/busybox"


@pytest.fixture(scope="module")
def built():
    need(all(shutil.which(t) for t in ("mkfs.ext4", "qemu-img", "dpkg-deb")), "mkfs.ext4/qemu-img/dpkg-deb missing")
    r = ak("images", "build", "--vm", IMAGE, timeout=280)
    assert r.returncode == 0, r.stderr.decode()
    return r, guestimage.build(IMAGE, quiet=True)


def _cpio_entries(path: str) -> dict[str, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out, pos = {}, 0
    while True:
        hdr = data[pos:pos + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = data[pos:pos + size]
        pos += size
        pos += -pos % 4


def test_build_is_cached_and_reports_progress(built):
    r, g = built
    assert b"ready" in r.stderr
    again = ak("images", "build", "--vm", IMAGE, timeout=60)
    assert again.returncode == 0
    assert b"==>" not in again.stderr  # nothing rebuilt
    for part in (g["kernel"]["vmlinuz"], g["initramfs"]["path"], g["rootfs"]["path"]):
        assert os.path.isfile(part) and part.startswith(os.path.join(paths.cache_dir(), "vm"))


def test_initramfs_has_the_agent_as_init_and_modules_in_order(built):
    _, g = built
    ents = _cpio_entries(g["initramfs"]["path"])
    with open(paths.agent_binary(), "rb") as f:
        assert ents["init"] == f.read()
    order = ents["ak/modules/order"].decode().split()
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_console.ko")
    assert all(f"ak/modules/{m}" in ents for m in order)
    assert "dev/console" in ents
    for name in g["initramfs"]["seccomp"]:
        assert len(ents[f"ak/seccomp/{name}.bpf"]) % 8 == 0


def test_vmlinux_is_an_elf(built):
    _, g = built
    with open(guestimage.ensure_vmlinux(g["kernel"]), "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_overlays_never_write_the_base(built, tmp_path):
    _, g = built
    base = g["rootfs"]["path"]
    assert os.stat(base).st_mode & 0o222 == 0  # read-only base
    ov = str(tmp_path / "d.qcow2")
    guestimage.overlay(base, ov)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", ov], capture_output=True,
                                     check=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == base
