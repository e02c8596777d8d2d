"""``agentkernel daemon start`` spawns the daemon so that the caller's working directory cannot inject
modules into it (``python -m`` puts the cwd first on sys.path; the daemon runs with ``-P``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.timeout(180)

TRAP = """import os, sys
open(os.path.join({cwd!r}, "TRAPPED"), "a").write(__name__ + " " + str(os.getpid()) + "\\n")
raise SystemExit("booby-trapped module imported from the working directory")
"""


def test_daemon_start_ignores_modules_in_the_callers_cwd():
    root = tempfile.mkdtemp(prefix="ak-spawn-")
    cwd = os.path.join(root, "work")
    os.makedirs(cwd)
    for name in ("asyncio", "logging", "argparse", "signal", "selectors"):  # all imported by the daemon
        with open(os.path.join(cwd, f"{name}.py"), "w") as f:
            f.write(TRAP.format(cwd=cwd))
    env = {**os.environ, "AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"),
           "AGENTKERNEL_HOME": os.path.join(root, "home"), "AGENTKERNEL_NO_DAEMON": "0"}

    def ak(*args: str) -> subprocess.CompletedProcess:
        # the CLI itself with -P too: this test is about the process it spawns
        return subprocess.run([sys.executable, "-P", "-m", "agentkernel", *args], capture_output=True,
                              timeout=120, env=env, cwd=cwd)

    r = ak("daemon", "start", "--warm", "wasm", "--pool-min", "1")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        r = ak("run", "--backend", "wasm", "--", "echo", "hello")
        assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
        st = ak("daemon", "status")
        assert st.returncode == 0, st.stdout + st.stderr
    finally:
        ak("daemon", "stop")
    trapped = os.path.join(cwd, "TRAPPED")
    assert not os.path.exists(trapped), f"imported from the cwd: {open(trapped).read()}"  # noqa: SIM115


def test_the_trap_springs_without_the_flag():
    """The booby trap above is real: a plain ``python -m`` from that cwd imports it."""
    cwd = tempfile.mkdtemp(prefix="ak-spawn-")
    with open(os.path.join(cwd, "asyncio.py"), "w") as f:
        f.write(TRAP.format(cwd=cwd))
    r = subprocess.run([sys.executable, "-m", "agentkernel.daemon", "--help"], capture_output=True, cwd=cwd,
                       timeout=60)
    assert r.returncode != 0 and os.path.exists(os.path.join(cwd, "TRAPPED"))
    from agentkernel.commands.daemon import daemon_argv

    os.unlink(os.path.join(cwd, "TRAPPED"))
    r = subprocess.run([*daemon_argv([]), "--help"], capture_output=True, cwd=cwd, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(cwd, "TRAPPED"))
