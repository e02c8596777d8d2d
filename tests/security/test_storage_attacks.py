"""Issue 11 item 11: writable storage was unbounded (150 MB written to /tmp and /workspace on every
container backend; wasm wrote 300 MB to /dev/shm). Now every profile sets a cap (``disk_mb``) and every
backend enforces it or refuses (fail closed). The attack is performed as written: write past the cap into
/tmp, the workdir and the root file system (``$HOME``; ``/`` itself as uid 0); each write must stop at
the cap (EDQUOT/ENOSPC) and the sandbox must still work afterwards (free the space, write again).

The engine backends cap through btrfs quota groups on the storage volume ``scripts/setup.sh`` makes
(podman: prestart hook + capped workdir; docker: StorageOpt size); oci through a tmpfs writable layer;
wasm through capped subvolumes for its scratch."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ak

WRITE = ("for d in /tmp /workspace $HOME; do dd if=/dev/zero of=$d/fill bs=1M count=150 2>/dev/null; "
         "echo $d $(( $(cat $d/fill 2>/dev/null | wc -c) / 1048576 )); rm -f $d/fill; done; "
         "echo still > /tmp/after && cat /tmp/after")


def _written(out: bytes) -> dict[str, int]:
    res = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            res[{"/tmp": "/tmp", "/workspace": "/workspace"}.get(parts[0], "home")] = int(parts[1])
    return res


CAPPED = [
    ("podman", ["--disk", "50"]), ("docker", ["--disk", "50"]), ("gvisor", ["--disk", "50"]),
    ("gvisor-docker", ["--disk", "50"]),
    ("oci", ["--disk", "50"]), ("oci", ["-o", "runtime=runc", "--disk", "50"]),
    ("oci", ["-o", "runtime=runsc", "--disk", "50"]),
    ("podman", ["-p", "restrictive"]), ("docker", ["-p", "restrictive"]), ("gvisor", ["-p", "restrictive"]),
    ("oci", ["-p", "restrictive"]),
    ("podman", ["--read-only", "--disk", "50"]), ("docker", ["--read-only", "--disk", "50"]),
]


@pytest.mark.parametrize(("backend", "flags"), CAPPED, ids=[f"{b}-{'_'.join(f)}" for b, f in CAPPED])
def test_writes_stop_at_the_cap(backend, flags):
    r = ak("run", "-B", backend, *flags, "--", "sh", "-c", WRITE, timeout=300)
    got = _written(r.stdout)
    assert set(got) == {"/tmp", "/workspace", "home"}, (r.stdout, r.stderr)
    if "restrictive" in flags or "--read-only" in flags:
        assert got["home"] == 0, got  # a read-only root: $HOME is not writable at all
    cap = 64 if "restrictive" in flags else 50
    assert all(v <= cap for v in got.values()), got
    assert got["/tmp"] >= cap - 8 and got["/workspace"] >= cap - 8, got  # it did write up to the cap
    assert r.stdout.rstrip().endswith(b"still"), (r.stdout, r.stderr)  # the sandbox still works


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor"])
def test_root_itself_is_capped_for_uid_0(backend, tmp_path):
    """As uid 0 inside (config ``[security] user = "0"``) the image's root-owned directories are writable
    (``/`` itself is mode 555 in our images and capabilities are dropped): capped too."""
    (tmp_path / "agentkernel.toml").write_text('[security]\nuser = "0"\n')
    r = ak("run", "-B", backend, "--disk", "40", "--", "sh", "-c",
           "id -u; dd if=/dev/zero of=/etc/fill bs=1M count=120 2>/dev/null; "
           "echo /etc $(( $(wc -c < /etc/fill) / 1048576 ))", cwd=str(tmp_path), timeout=300)
    got = r.stdout.decode().split()
    assert got[:2] == ["0", "/etc"] and 30 <= int(got[2]) <= 40, (r.stdout, r.stderr)


# The default profile's cap (moderate: 2048 MiB) without writing 2 GB: fallocate past it fails at once
# (quota groups and tmpfs check the size before allocating); well below it succeeds (except on oci, whose
# tmpfs layer also counts against the 512 MiB memory limit: there the OOM killer is the bound).
DEFAULT_PROBE = ("fallocate -l 2100M /tmp/f; echo past=$?; rm -f /tmp/f; "
                 "fallocate -l 1200M /workspace/f; echo below=$?; rm -f /workspace/f")


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor", "gvisor-docker", "oci"])
def test_default_profile_writes_are_capped(backend):
    r = ak("run", "-B", backend, "--", "sh", "-c", DEFAULT_PROBE, timeout=300)
    out = r.stdout.decode()
    assert "past=1" in out, (r.stdout, r.stderr)
    assert b"quota exceeded" in r.stderr or b"No space left" in r.stderr, r.stderr
    if backend != "oci":
        assert "below=0" in out, (r.stdout, r.stderr)


def test_wasm_scratch_is_capped():
    """wasm wrote 300 MB to /dev/shm; now its scratch is a capped subvolume (the write stops at the cap)."""
    r = ak("run", "-B", "wasm", "--disk", "8", "--", "sh", "-c",
           "seq 1 3000000 > /fill; ls -l /fill; rm /fill; echo again > /small; cat /small", timeout=300)
    size = int(r.stdout.split()[4])
    assert 4 << 20 <= size <= 8 << 20, (r.stdout, r.stderr)
    assert r.stdout.rstrip().endswith(b"again"), (r.stdout, r.stderr)


def test_wasm_default_profile_scratch_is_a_capped_subvolume(tmp_path):
    """Without --disk the profile's cap applies: the scratch root is a subvolume whose quota-group limit is
    the profile's disk_mb (read on the host while the run writes)."""
    from agentkernel.diskquota import volume
    from agentkernel.spec import PROFILES

    base = os.path.join(volume(), f"wasm-{os.geteuid()}")
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", "wasm", "--", "sh", "-c",
                             "echo x > /marker; sleep 60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        mine: list[str] = []
        while time.monotonic() < deadline and not mine:
            mine = [n for n in os.listdir(base) if n.startswith(f"ak-{proc.pid}-")] if os.path.isdir(base) else []
            time.sleep(0.1)
        assert mine, "no scratch subvolume appeared"
        path = os.path.join(base, mine[0])
        assert os.stat(path).st_ino == 256  # a subvolume root
        out = subprocess.run(["btrfs", "qgroup", "show", "-re", "--raw", "-f", path], capture_output=True,
                             text=True, check=True).stdout
        max_excl = int(out.strip().splitlines()[-1].split()[-2])  # qgroupid rfer excl max_rfer max_excl path
        assert max_excl == PROFILES["moderate"]["resources"]["disk_mb"] << 20, out
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor", "wasm"])
def test_unlimited_is_an_explicit_opt_out(backend):
    r = ak("run", "-B", backend, "--disk", "unlimited", "--", "echo", "hi", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == b"hi", r.stderr


def test_a_cap_that_cannot_be_enforced_is_refused(tmp_path):
    """Fail closed: podman storage that is not on the quota volume (a storage.conf naming the overlay driver)
    refuses the default profile, naming the cause and the fix; --disk unlimited is then the opt-out."""
    conf = tmp_path / "storage.conf"
    conf.write_text('[storage]\ndriver = "overlay"\ngraphroot = "/var/lib/containers/storage"\n')
    env = {"CONTAINERS_STORAGE_CONF": str(conf)}
    r = ak("run", "-B", "podman", "--", "true", env=env, timeout=120)
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"disk_rootfs" in r.stderr and b"overlay" in r.stderr and b"setup.sh" in r.stderr, r.stderr
    assert b"--disk unlimited" in r.stderr, r.stderr


def test_wasm_refuses_a_cap_without_the_volume(tmp_path):
    env = {"AGENTKERNEL_STORAGE_VOLUME": str(tmp_path)}  # not btrfs: no quota groups
    r = ak("run", "-B", "wasm", "--", "echo", "hi", env=env, timeout=120)
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"cannot cap its scratch storage" in r.stderr and b"setup.sh" in r.stderr, r.stderr
    r = ak("run", "-B", "wasm", "--disk", "unlimited", "--", "echo", "hi", env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == b"hi", r.stderr


def test_vm_backends_refuse_a_cap_below_their_fixed_disk():
    r = ak("run", "-B", "qemu", "--disk", "50", "--", "true", timeout=300)
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"root disk" in r.stderr and b"fixed" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor"])
def test_named_sandbox_stays_capped_across_stop_and_start(backend):
    """podman picks OCI hooks when a container starts: a named sandbox's cap must hold on every start."""
    name = f"cap-{backend}-{os.getpid()}"
    fill = "dd if=/dev/zero of=$HOME/f bs=1M count=60 2>/dev/null; wc -c < $HOME/f; rm -f $HOME/f"
    try:
        assert ak("create", name, "-B", backend, "--disk", "30", timeout=300).returncode == 0
        for _ in range(2):
            r = ak("start", name, timeout=300)
            assert r.returncode == 0, r.stderr
            r = ak("exec", name, "--", "sh", "-c", fill, timeout=300)
            assert 20 << 20 <= int(r.stdout) <= 30 << 20, (r.stdout, r.stderr)
            assert ak("stop", name, timeout=300).returncode == 0
    finally:
        ak("rm", name, timeout=300)


def test_gc_reaps_capped_directories_of_sandboxes_that_are_gone():
    """A capped workdir whose sandbox no engine lists any more (its owner and the death watcher both gone
    before they could remove it) is removed by ``gc``; a live sandbox's is kept."""
    from agentkernel import diskquota

    base = diskquota.sandboxes_dir()
    os.makedirs(base, exist_ok=True)
    stale = os.path.join(base, f"run-{os.getpid():010x}"[-14:])
    diskquota.make_capped_dir(stale, 10)
    with open(os.path.join(stale, "junk"), "wb") as f:
        f.write(b"x" * (1 << 20))
    name = f"keep-{os.getpid()}"
    try:
        assert ak("create", name, "-B", "podman", "--disk", "30", timeout=300).returncode == 0
        live = [n for n in os.listdir(base) if n.startswith(name)]
        assert live, os.listdir(base)
        r = ak("gc", env={"AGENTKERNEL_DISK_DIR_GRACE_S": "0.01"}, timeout=300)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(stale), r.stdout
        assert all(os.path.isdir(os.path.join(base, n)) for n in live), r.stdout
    finally:
        ak("rm", name, timeout=300)
        diskquota.remove_capped_dir(stale)
