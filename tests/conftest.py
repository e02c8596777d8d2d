"""Shared fixtures. Every test session gets its own agentkernel data and runtime directories, so the
store, audit log and ownership journal never mix with a developer's real ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

_SESSION_DIR = tempfile.mkdtemp(prefix="ak-test-")
os.environ.setdefault("AGENTKERNEL_HOME", os.path.join(_SESSION_DIR, "home"))
os.environ.setdefault("AGENTKERNEL_RUNTIME_DIR", os.path.join(_SESSION_DIR, "run"))
os.environ["AGENTKERNEL_NO_DAEMON"] = os.environ.get("AGENTKERNEL_TEST_DAEMON", "1")
# Every sandbox this test session creates carries this label, so leak checks see only our own.
SESSION_LABEL = f"agentkernel.test-session={os.path.basename(_SESSION_DIR)}"
os.environ["AGENTKERNEL_LABELS"] = SESSION_LABEL


def ak(*args: str, input: bytes | None = None, timeout: float = 120, env: dict | None = None,
       cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a new process (as a user would), capturing bytes."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], input=input, capture_output=True,
                          timeout=timeout, env=e, cwd=cwd)


@pytest.fixture
def run_ak():
    return ak


def pytest_sessionfinish(session, exitstatus):
    """Networked sandboxes of this session used its own egress bridge and gateway: remove them."""
    from agentkernel import paths

    if not os.path.exists(os.path.join(paths.runtime_dir(), "egress", "net.json")):
        return
    from agentkernel.egress import gateway_ctl, netns

    gateway_ctl.stop()
    netns.remove_bridge()
