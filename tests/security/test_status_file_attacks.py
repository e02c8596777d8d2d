"""Issue 11 item 3: the CLI read a sandbox-controlled status file following symlinks and FIFOs.

The sandbox owns its run dir (``/.ak/run``). ``ak-agent exec`` writes ``status.tmp`` and renames it to
``status``; a command that plants ``status.tmp`` as a symlink to ``/dev/zero`` gets it renamed into
place (the host then read /dev/zero until MemoryError), one that plants a FIFO with a reader kept open
gets a FIFO renamed into place (the host's open() blocked forever, past --timeout). Both attacks are
run for real; the CLI must finish promptly, without a traceback, and keep its exit-code contract."""

from __future__ import annotations

import os
import time

import pytest

from tests.security.conftest import ak_fenced

BACKENDS = ("podman", "docker")

ZERO = "ln -s /dev/zero /.ak/run/status.tmp; exit 3"
FIFO = "mkfifo /.ak/run/status.tmp; (exec 3</.ak/run/status.tmp; sleep 2) & exit 3"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attack", [ZERO, FIFO], ids=["symlink-dev-zero", "fifo"])
def test_planted_status_file_is_not_followed(backend, attack):
    t0 = time.monotonic()
    r = ak_fenced("run", "-B", backend, "--timeout", "30", "--", "sh", "-c", attack, limit_mb=1024, timeout=90)
    elapsed = time.monotonic() - t0
    assert b"MemoryError" not in r.stderr and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert elapsed < 60, elapsed
    # without a trustworthy status file the engine's own exit code is used: the command's 3
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])


def test_reader_refuses_links_fifos_devices_and_big_files(tmp_path):
    from agentkernel.safefs import UnsafeFile, read_regular

    d = str(tmp_path)
    os.symlink("/dev/zero", os.path.join(d, "zero"))
    os.mkfifo(os.path.join(d, "fifo"))
    with open(os.path.join(d, "big"), "wb") as f:
        f.write(b"x" * 5000)
    with open(os.path.join(d, "ok"), "wb") as f:
        f.write(b"exit=0\n")
    for name in ("zero", "fifo", "big"):
        with pytest.raises(UnsafeFile):
            read_regular(d, name, 4096)
    assert read_regular(d, "ok", 4096) == b"exit=0\n"
    os.symlink(d, os.path.join(d, "dirlink"))
    with pytest.raises(OSError):
        read_regular(os.path.join(d, "dirlink"), "ok")
