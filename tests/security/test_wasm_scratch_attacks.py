"""Issue 11 item 11 (wasm part) and issue 12 item 6: a SIGKILLed wasm run left its scratch directory
(on tmpfs, i.e. host memory) that neither the next run nor ``gc`` removed (``gc`` did not scan wasm; the
daemon skips the journal for in-process runs). Performed for real: a run that writes several MB and
sleeps is SIGKILLed; then the next wasm run, and separately ``gc``, must remove what it left. Both kinds
of scratch: the capped subvolumes on the storage volume (every profile's default) and the uncapped
directories of ``--disk unlimited`` (under $AGENTKERNEL_WASM_SCRATCH here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ak


def _kill_a_writing_run(scratch: str, flags: list[str], env: dict) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", "wasm", *flags, "--", "sh", "-c",
                             "seq 1 600000 > /tmp/big; seq 1 600000 > /big2; sleep 120"],
                            env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [n for n in os.listdir(scratch) if n.startswith(f"ak-{proc.pid}-")] if os.path.isdir(scratch) else []
        sizes = sum(os.path.getsize(os.path.join(dp, f)) for n in left
                    for dp, _, fs in os.walk(os.path.join(scratch, n)) for f in fs)
        if sizes > 4_000_000:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert left, "the run never made its scratch directory"
    return left


@pytest.mark.parametrize("kind", ["capped", "unlimited"])
@pytest.mark.parametrize("reaper", ["next-run", "gc"])
def test_sigkilled_wasm_run_scratch_is_reaped(reaper, kind, tmp_path):
    if kind == "capped":
        from agentkernel.diskquota import volume

        scratch, flags, env = os.path.join(volume(), f"wasm-{os.geteuid()}"), [], {}
    else:
        scratch = str(tmp_path / "scratch")
        os.makedirs(scratch, mode=0o700)
        flags, env = ["--disk", "unlimited"], {"AGENTKERNEL_WASM_SCRATCH": scratch}
    left = _kill_a_writing_run(scratch, flags, env)
    assert all(os.path.exists(os.path.join(scratch, n)) for n in left)
    if kind == "capped":
        assert os.stat(os.path.join(scratch, left[0])).st_ino == 256  # a capped subvolume
    if reaper == "next-run":
        r = ak("run", "-B", "wasm", *flags, "--", "echo", "hi", env=env, timeout=60)
    else:
        r = ak("gc", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [n for n in os.listdir(scratch) if any(n.startswith(x.split(".")[0]) for x in left)] == []
