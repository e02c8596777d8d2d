"""Shared fixtures. Every test session gets its own agentkernel data and runtime directories, so the
store, audit log and ownership journal never mix with a developer's real ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

pytest_plugins = ["tests._gcguard"]

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


# ---- backends that must be available here ---------------------------------------------------------------
# .ci/run sets AGENTKERNEL_REQUIRED_BACKENDS (and CI sets CI=true): a test skipped because one of those
# backends is unavailable is then a failure, so a broken set-up cannot hide behind skips.

UNAVAILABLE = "backend unavailable: "
_probes: dict[str, tuple[bool, str]] = {}


def required_backends() -> set[str]:
    return set((os.environ.get("AGENTKERNEL_REQUIRED_BACKENDS") or "").split())


def _in_ci() -> bool:
    return (os.environ.get("CI") or "").lower() in ("1", "true", "yes")


def _is_required(backend: str) -> bool:
    req = required_backends()
    return backend in req or backend.split("-")[0] in req


def skip_unavailable(backend: str, reason: str):
    """Skip because ``backend`` cannot run here (a failure in CI when the backend is required)."""
    pytest.skip(f"{UNAVAILABLE}{backend}: {reason}")


def probe_backend(backend: str) -> tuple[bool, str]:
    """doctor's verdict on a registry entry, cached for the session."""
    if backend not in _probes:
        from agentkernel.backends import get_backend_class
        from agentkernel.errors import AgentKernelError

        try:
            a = get_backend_class(backend).probe()
            _probes[backend] = (a.available, a.reason + (f" (fix: {a.fix})" if a.fix else ""))
        except AgentKernelError as exc:
            _probes[backend] = (False, exc.message)
    return _probes[backend]


def need(cond: bool, why: str) -> None:
    """Skip unless ``cond``; with CI=true a missing prerequisite is a failure, not a skip."""
    if not cond:
        if os.environ.get("CI") == "true":
            pytest.fail(f"required for CI: {why}")
        pytest.skip(why)


def require_backend(backend: str) -> None:
    ok, reason = probe_backend(backend)
    if not ok:
        skip_unavailable(backend, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or not _in_ci() or not isinstance(rep.longrepr, tuple):
        return
    reason = str(rep.longrepr[2])
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    if not reason.startswith(UNAVAILABLE):
        return
    backend = reason[len(UNAVAILABLE):].split(":", 1)[0]
    if _is_required(backend):
        rep.outcome = "failed"
        rep.longrepr = (f"required backend {backend!r} is unavailable in CI "
                        f"(AGENTKERNEL_REQUIRED_BACKENDS={os.environ.get('AGENTKERNEL_REQUIRED_BACKENDS')!r}): "
                        f"{reason}")


def pytest_sessionfinish(session, exitstatus):
    """Networked sandboxes of this session used its own egress bridge and gateway: remove them."""
    from agentkernel import paths

    if not os.path.exists(os.path.join(paths.runtime_dir(), "egress", "net.json")):
        return
    from agentkernel.egress import gateway_ctl, netns

    gateway_ctl.stop()
    netns.remove_bridge()
