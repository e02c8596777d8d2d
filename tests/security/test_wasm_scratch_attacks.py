"""Issue 11 item 11 (wasm part) and issue 12 item 6: a SIGKILLed wasm run left its scratch directory
(on tmpfs, i.e. host memory) that neither the next run nor ``gc`` removed (``gc`` did not scan wasm; the
daemon skips the journal for in-process runs). Performed for real: a run that writes several MB and
sleeps is SIGKILLed; then the next wasm run, and separately ``gc``, must remove what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ak


def _kill_a_writing_run(scratch: str) -> list[str]:
    env = dict(os.environ, AGENTKERNEL_WASM_SCRATCH=scratch)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", "wasm", "--", "sh", "-c",
                             "seq 1 600000 > /tmp/big; seq 1 600000 > /big2; sleep 120"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [n for n in os.listdir(scratch) if n.startswith(f"ak-{proc.pid}-")]
        sizes = sum(os.path.getsize(os.path.join(dp, f)) for n in left
                    for dp, _, fs in os.walk(os.path.join(scratch, n)) for f in fs)
        if sizes > 4_000_000:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert left, "the run never made its scratch directory"
    return left


@pytest.mark.parametrize("reaper", ["next-run", "gc"])
def test_sigkilled_wasm_run_scratch_is_reaped(reaper, tmp_path):
    scratch = str(tmp_path / "scratch")
    os.makedirs(scratch, mode=0o700)
    left = _kill_a_writing_run(scratch)
    assert all(os.path.exists(os.path.join(scratch, n)) for n in left)
    env = {"AGENTKERNEL_WASM_SCRATCH": scratch}
    if reaper == "next-run":
        r = ak("run", "-B", "wasm", "--", "echo", "hi", env=env, timeout=60)
    else:
        r = ak("gc", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [n for n in os.listdir(scratch) if any(n.startswith(x.split(".")[0]) for x in left)] == []
