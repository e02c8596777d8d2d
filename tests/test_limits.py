"""The long-lived owners of many sandboxes (the daemon, serve) run with their open-files soft limit raised
to the hard limit, whatever the soft limit of the shell that started them (1024 on many hosts)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ak

pytestmark = pytest.mark.timeout(120)


def _nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_daemon_raises_its_open_files_soft_limit_to_the_hard_limit():
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard open-files limit here is 1024 or less: nothing to raise")
    root = tempfile.mkdtemp(prefix="ak-limits-")
    env = {**os.environ, "AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"),
           "AGENTKERNEL_HOME": os.path.join(root, "home"), "AGENTKERNEL_NO_DAEMON": "0"}

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    r = subprocess.run([sys.executable, "-m", "agentkernel", "daemon", "start", "--pool-min", "0"], env=env,
                       capture_output=True, timeout=60, preexec_fn=low_soft_limit)
    assert r.returncode == 0, r.stderr
    try:
        with open(os.path.join(root, "run", "daemon.sock.pid")) as f:
            pid = int(f.read())
        assert _nofile(pid) == (hard, hard)
    finally:
        ak("daemon", "stop", env=env)
