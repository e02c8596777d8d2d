"""Start the egress gateway when a sandbox needs it (one per runtime dir, i.e. per host installation).

The gateway holds an exclusive flock on ``egress/gateway.lock`` for as long as it runs. ``ensure``
tries that lock: held means running (microseconds); free means start one and wait until it listens.
``reg.lock`` orders registration against the gateway's idle exit: the gateway only exits while holding
it and after checking no sandbox is registered, so a sandbox registered under that lock is never left
without a gateway.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

START_TIMEOUT = 10.0


def _running(d: str) -> bool:
    fd = os.open(os.path.join(d, "gateway.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


def ensure(net: dict[str, Any]) -> None:
    from . import netns

    d = netns.state_dir()
    with open(os.path.join(d, "reg.lock"), "w") as reg:
        fcntl.flock(reg, fcntl.LOCK_SH)
        if _running(d):
            return
        _start(d, net)


def _start(d: str, net: dict[str, Any]) -> None:
    import select
    import subprocess
    import sys
    import time

    from .. import paths

    r, w = os.pipe()
    log = os.open(os.path.join(d, "gateway.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (paths.repo_root(), os.environ.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentkernel.egress.gateway", "--state", d, "--ready-fd", str(w),
             "--listen", net["gateway"]],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w,), start_new_session=True,
            cwd="/", env=env)
    finally:
        os.close(w)
        os.close(log)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                proc.kill()
                raise SandboxError("the egress gateway did not start in time", hint=f"see {d}/gateway.log")
            data = os.read(r, 64)
            if data.startswith(b"ok"):
                return
            proc.wait(1)
            if _running(d):  # another process started one first
                return
            raise SandboxError(f"the egress gateway failed to start: {data.decode(errors='replace').strip()}",
                               hint=f"see {d}/gateway.log")
    finally:
        os.close(r)


def stop() -> None:
    """Stop this installation's gateway if it runs (tests, `gc`); sandboxes still attached lose egress."""
    import signal
    import time

    from . import netns

    d = netns.state_dir()
    if not _running(d):
        return
    try:
        with open(os.path.join(d, "gateway.lock")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid > 1:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(50):
            if not _running(d):
                return
            time.sleep(0.02)
