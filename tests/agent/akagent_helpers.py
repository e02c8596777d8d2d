"""Helpers shared by the agent tests (a uniquely named module, importable next to the tests)."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT = os.path.join(REPO, "build", "ak-agent")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from agentkernel.bench.sustained import processes_with as procs_with  # noqa: E402, F401  (re-exported: the product's copy)

# the agent's own environment carries this marker: a command must never see it
SECRET_ENV = "AK_TEST_AGENT_SECRET"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


class RunningAgent:
    def __init__(self, proc: subprocess.Popen, sock: str) -> None:
        self.proc = proc
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_agent(argv: list[str], sock: str, timeout: float = 5.0) -> subprocess.Popen:
    """Start `argv` (an agent `serve --listen sock` command line, possibly wrapped) and wait until the
    socket accepts connections."""
    env = dict(os.environ, **{SECRET_ENV: "leaked"})
    r, w = os.pipe()
    proc = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=(w,), env=env)
    os.close(w)
    try:
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(r, select.POLLIN)
        assert p.poll(timeout * 1000), "agent did not become ready"
        assert os.read(r, 16) == b"ready\n"
        assert time.monotonic() < deadline
    finally:
        os.close(r)
    return proc


def stop_agent(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(coro):
    return asyncio.run(coro)


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose process group is pgid (zombies included)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            out.append((int(d), fields[0]))
    return out


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()

