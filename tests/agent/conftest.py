"""Fixtures for the agent tests: the agent is built with `make -C agent` and run as a real process."""

from __future__ import annotations

import os
import subprocess

import pytest
from akagent_helpers import AGENT, REPO, RunningAgent, start_agent, stop_agent


@pytest.fixture(scope="session")
def agent_bin() -> str:
    r = subprocess.run(["make", "-s", "-C", os.path.join(REPO, "agent")], capture_output=True, text=True)
    assert r.returncode == 0, f"building the agent failed:\n{r.stdout}\n{r.stderr}"
    assert os.access(AGENT, os.X_OK)
    return AGENT


@pytest.fixture
def agent(agent_bin, tmp_path):
    sock = str(tmp_path / "agent.sock")
    proc = start_agent([agent_bin, "serve", "--listen", sock], sock)
    ra = RunningAgent(proc, sock)
    yield ra
    alive = ra.alive()
    stop_agent(proc)
    assert alive, "the agent died during the test"
