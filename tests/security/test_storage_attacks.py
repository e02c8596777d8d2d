"""Issue 11 item 11: writable storage was unbounded (150 MB written to /tmp and /workspace on every
container backend). The attack is performed as written on every backend and profile that can cap
storage, and must end in ENOSPC at the cap with the host's disk untouched. Where the cap cannot be
enforced, a requested cap must be refused (fail closed). The default profile's writable root on the
engine backends is still uncapped here (no project quotas under their storage): recorded as an expected
failure, see docs/security.md."""

from __future__ import annotations

import pytest

from tests.conftest import ak

WRITE = ("for d in /tmp /workspace; do dd if=/dev/zero of=$d/fill bs=1M count=150 2>/dev/null; "
         "echo $d $(( $(wc -c < $d/fill) / 1048576 )); done")


def _written(out: bytes) -> dict[str, int]:
    res = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            res[parts[0]] = int(parts[1])
    return res


CAPPED = [
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
    assert set(got) == {"/tmp", "/workspace"}, (r.stdout, r.stderr)
    cap = 64 if "restrictive" in flags else 50
    assert all(v <= cap for v in got.values()), got


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor", "wasm"])
def test_a_cap_that_cannot_be_enforced_is_refused(backend):
    """A writable root on engine storage (or wasm scratch) cannot be capped: --disk must be refused."""
    r = ak("run", "-B", backend, "--disk", "50", "--", "true", timeout=120)
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert b"disk_rootfs" in r.stderr or b"disk" in r.stderr


@pytest.mark.xfail(strict=True, reason="open: the default profile's writable root on podman/docker has no cap "
                   "here (overlay on ext4 without project quotas); see docs/security.md")
@pytest.mark.parametrize("backend", ["podman", "docker"])
def test_default_profile_writes_are_capped(backend):
    r = ak("run", "-B", backend, "--", "sh", "-c", WRITE, timeout=300)
    got = _written(r.stdout)
    assert got and all(v < 150 for v in got.values()), got
