"""`agentkernel serve` is also the daemon: the CLI's runs use the same pools (one owner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from api_helpers import TOKENS, wait_pool_ready


def _ak(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENTKERNEL_NO_DAEMON="0")
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, env=env, timeout=120)


def test_cli_runs_go_through_the_servers_pools(server):
    st = _ak("daemon", "status", "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    status = json.loads(st.stdout)
    assert status["pid"] == server.proc.pid
    before = status["runs"]
    r = _ak("run", "--", "echo", "via-serve")
    assert (r.returncode, r.stdout) == (0, b"via-serve\n"), r.stderr
    assert json.loads(_ak("daemon", "status", "--json").stdout)["runs"] == before + 1
    wait_pool_ready(server.url, TOKENS["ops"])  # leave the pool warm for the tests that expect a hit
