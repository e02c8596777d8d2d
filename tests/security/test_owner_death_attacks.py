"""Issue 11 item 14: sandboxes die with their owner.

1. After SIGKILL of a daemon-less CLI the sandbox kept running until the next agentkernel command. Now a
   death watcher removes it at once: the test kills the CLI mid-command and, without running any other
   agentkernel command, checks the backend's own listing and the journal.
2. After SIGKILL of the daemon, the reaper (of the next daemon) killed a leased run whose client was
   still alive. The lease's owner is now the client: the run must finish normally."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ak

BACKENDS = ("podman", "docker", "oci")


def _journal(runtime_dir: str) -> list[dict]:
    d = os.path.join(runtime_dir, "owned")
    out = []
    for fn in os.listdir(d) if os.path.isdir(d) else ():
        if fn.endswith(".json"):
            try:
                with open(os.path.join(d, fn)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                pass
    return out


def _listed(backend: str, sandbox_id: str) -> bool:
    from agentkernel.backends import get_backend_class

    async def go():
        b = get_backend_class(backend)()
        try:
            return [i for i in await b.list() if i.id == sandbox_id or sandbox_id in str(i.handle)]
        finally:
            await b.aclose()

    return bool(asyncio.run(go()))


def _sandbox_processes(script: str) -> list[int]:
    """Processes running ``sh -c SCRIPT`` itself (inside the sandbox), not clients naming it in argv."""
    want = b"sh\0-c\0" + script.encode() + b"\0"
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if f.read() == want:
                        out.append(int(p))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkilled_cli_takes_its_sandbox_with_it(backend):
    rt = os.environ["AGENTKERNEL_RUNTIME_DIR"]
    marker = f"{os.urandom(4).hex()}"
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", backend, "--", "sh", "-c",
                             f"sleep 300; echo {marker}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        entry = None
        while time.monotonic() < deadline:
            mine = [e for e in _journal(rt) if e["owner"]["pid"] == proc.pid]
            if mine and _sandbox_processes(f"sleep 300; echo {marker}"):
                entry = mine[0]
                break
            time.sleep(0.1)
        assert entry is not None, "the sandbox never started"
        sid = entry["id"]
        assert _listed(backend, sid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30  # no other agentkernel command runs meanwhile
        while time.monotonic() < deadline:
            if not _sandbox_processes(f"sleep 300; echo {marker}") and not _listed(backend, sid):
                break
            time.sleep(0.2)
        assert not _sandbox_processes(f"sleep 300; echo {marker}"), "the sandbox kept running"
        assert not _listed(backend, sid), f"{backend} still lists {sid}"
        assert not [e for e in _journal(rt) if e["id"] == sid]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _daemon_env(root: str) -> dict:
    return {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"), "AGENTKERNEL_HOME": os.path.join(root, "home"),
            "AGENTKERNEL_NO_DAEMON": "0"}


def test_daemon_sigkill_does_not_kill_a_leased_run_whose_client_lives():
    root = tempfile.mkdtemp(prefix="ak-sec-daemon-")
    env = _daemon_env(root)
    full = dict(os.environ, **env)
    assert ak("daemon", "start", "--pool-min", "1", env=env).returncode == 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = json.loads(ak("daemon", "status", "--json", env=env).stdout or b"{}")
            if st.get("pools") and st["pools"][0]["ready"] >= 1:
                break
            time.sleep(0.2)
        with open(os.path.join(env["AGENTKERNEL_RUNTIME_DIR"], "daemon.sock.pid")) as f:
            dpid = int(f.read())
        client = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--", "sh", "-c",
                                   "sleep 6; echo survived"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=full)
        time.sleep(2)  # the client holds its lease and runs
        os.kill(dpid, signal.SIGKILL)
        time.sleep(0.3)
        # a new daemon reaps what the dead one owned at start-up; the client's run is not the dead daemon's
        assert ak("daemon", "start", "--pool-min", "1", env=env).returncode == 0
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, (out, err)
        assert out == b"survived\n"
    finally:
        ak("daemon", "stop", env=env)
