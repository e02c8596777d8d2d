"""The daemon and its warm pools, through the real CLI and real podman containers."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import SESSION_LABEL, ak

pytestmark = pytest.mark.timeout(300)


def _containers(label: str) -> list[str]:
    r = subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"label={label}"], capture_output=True, text=True)
    return r.stdout.split()


class Daemon:
    def __init__(self, root: str) -> None:
        self.env = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"),
                    "AGENTKERNEL_HOME": os.path.join(root, "home"), "AGENTKERNEL_NO_DAEMON": "0",
                    "AGENTKERNEL_BACKEND": "podman"}  # these tests inspect podman containers (auto may pick oci)

    def ak(self, *args, **kw):
        env = dict(self.env)
        env.update(kw.pop("env", {}) or {})
        return ak(*args, env=env, **kw)

    def status(self) -> dict:
        r = self.ak("daemon", "status", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def pool(self) -> dict:
        pools = self.status()["pools"]
        assert pools
        return pools[0]

    def wait_ready(self, n: int, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pools = self.status()["pools"]
            if pools and pools[0]["ready"] >= n:
                return pools[0]
            time.sleep(0.2)
        raise AssertionError(f"pool never reached {n} ready members: {self.pool()}")

    @property
    def socket(self) -> str:
        return os.path.join(self.env["AGENTKERNEL_RUNTIME_DIR"], "daemon.sock")

    def pid(self) -> int:
        with open(self.socket + ".pid") as f:
            return int(f.read())


@pytest.fixture
def daemon():
    root = tempfile.mkdtemp(prefix="ak-daemon-")
    d = Daemon(root)
    r = d.ak("daemon", "start", "--pool-min", "2", "--pool-max", "4")
    assert r.returncode == 0, r.stderr
    yield d
    d.ak("daemon", "stop")


def test_run_goes_through_the_warm_pool(daemon):
    daemon.wait_ready(2)
    r = daemon.ak("run", "--", "echo", "hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello\n", b"")
    m = daemon.pool()["metrics"]
    assert m["hits"] >= 1


def test_each_member_is_used_once(daemon):
    daemon.wait_ready(2)
    # identity of the sandbox: its cgroup path (the engine's container id)
    r = daemon.ak("run", "--", "sh", "-c", "echo secret > /workspace/leak && head -1 /proc/1/cgroup")
    assert r.returncode == 0, r.stderr
    seen = {r.stdout}
    for _ in range(4):
        r = daemon.ak("run", "--", "sh", "-c", "cat /workspace/leak 2>/dev/null; head -1 /proc/1/cgroup")
        assert b"secret" not in r.stdout, "a later run saw an earlier run's file"
        seen.add(r.stdout)
    assert len(seen) == 5, "every run got a different sandbox (container)"
    deadline = time.monotonic() + 30
    while daemon.pool()["metrics"]["destroyed"] < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.pool()["metrics"]["destroyed"] >= 5


def test_exact_results_through_the_daemon(daemon):
    payload = bytes(range(256)) * 512
    r = daemon.ak("run", "--", "sh", "-c", r"cat; printf '\001err' >&2; exit 42", input=payload)
    assert (r.returncode, r.stdout, r.stderr) == (42, payload, b"\x01err")
    r = daemon.ak("run", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 143
    r = daemon.ak("run", "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = daemon.ak("run", "--", "no-such-command")
    assert r.returncode == 127 and b"no-such-command" in r.stderr


def test_large_output_through_the_daemon(daemon):
    r = daemon.ak("run", "--", "sh", "-c", "head -c 67108864 /dev/zero | tr '\\0' x")
    assert r.returncode == 0 and len(r.stdout) == 64 << 20 and set(r.stdout) == {ord("x")}


def test_pool_exhaustion_waits_then_cold_starts_never_fails(daemon):
    procs = [subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--", "sh", "-c", f"echo run{i}"],
                              env={**os.environ, **daemon.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(8)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outs]
    assert sorted(o[0] for o in outs) == sorted(f"run{i}\n".encode() for i in range(8))


def _leased_sleep(daemon: Daemon, out=subprocess.DEVNULL) -> subprocess.Popen:
    """A client running ``sleep 300`` in a leased pool member (returns once the daemon counts the lease)."""
    daemon.wait_ready(2)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--", "sleep", "300"],
                            env={**os.environ, **daemon.env}, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while daemon.pool()["in_use"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.pool()["in_use"] == 1
    return proc


def test_client_killed_mid_command_kills_it_and_destroys_the_sandbox(daemon):
    proc = _leased_sleep(daemon)
    before = set(_containers(f"agentkernel.owner.pid={daemon.pid()}"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while daemon.pool()["in_use"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.pool()["in_use"] == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gone = before - set(_containers(f"agentkernel.owner.pid={daemon.pid()}"))
        if gone:
            break
        time.sleep(0.2)
    assert gone, "the leased sandbox was destroyed"


def _claimed_by(daemon: Daemon, pid: int) -> list[str]:
    """Sandbox ids the daemon's journal says ``pid`` owns (entries are BACKEND--ID--PID.START.json)."""
    out = []
    for fn in os.listdir(os.path.join(daemon.env["AGENTKERNEL_RUNTIME_DIR"], "owned")):
        if fn.endswith(".json"):
            head, who = fn[: -len(".json")].rsplit("--", 1)
            if who.split(".")[0] == str(pid):
                out.append(head.split("--", 1)[1])
    return out


def test_gc_from_another_runtime_dir_spares_a_lease_whose_daemon_died(daemon, tmp_path):
    """The member's labels name the SIGKILLed daemon; its journal (named on the labels) names the live client.
    A scan from another installation (runtime dir) must read that journal, not reap the running command."""
    proc = _leased_sleep(daemon)
    try:
        (leased,) = _claimed_by(daemon, proc.pid)  # the lease's journal entry names the client
        os.kill(daemon.pid(), signal.SIGKILL)
        time.sleep(0.5)
        other = {"AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "other-run"), "AGENTKERNEL_HOME": str(tmp_path / "other")}
        r = ak("gc", "--dry-run", env=other)
        assert r.returncode == 0, r.stderr
        listed = r.stdout.decode()
        assert f":{leased}\n" not in listed, f"gc from another runtime dir would reap the live lease {leased}"
        # (not asserted: that the command lives on. On a shared machine any other installation's full scan
        # that predates the journal label still reaps it, which is the bug this test pins down for ours.)
    finally:
        proc.kill()
        proc.wait()
    daemon.ak("list")  # the daemon's own runtime dir: its members (the lease's too, client gone) are reaped


def test_sandbox_killed_from_outside_is_a_clear_error(daemon):
    proc = _leased_sleep(daemon, out=subprocess.PIPE)
    ids = {c for c in _containers(f"agentkernel.owner.pid={daemon.pid()}")}
    # kill every member: the one in use is among them
    subprocess.run(["podman", "kill", *ids], capture_output=True)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode in (125, 137), (proc.returncode, err)
    if proc.returncode == 125:
        assert b"agentkernel: error:" in err


def test_daemon_sigkill_leaves_nothing_after_the_next_command():
    root = tempfile.mkdtemp(prefix="ak-daemon-")
    d = Daemon(root)
    assert d.ak("daemon", "start", "--pool-min", "2").returncode == 0
    d.wait_ready(2)
    pid = d.pid()
    assert len(_containers(f"agentkernel.owner.pid={pid}")) >= 2
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    r = d.ak("list")  # any command reaps what a dead owner left
    assert r.returncode == 0
    assert _containers(f"agentkernel.owner.pid={pid}") == []
    # and a new daemon starts over the stale socket
    assert d.ak("daemon", "start", "--pool-min", "1").returncode == 0
    d.wait_ready(1)
    assert d.ak("run", "--", "true").returncode == 0
    assert d.ak("daemon", "stop").returncode == 0


def test_stop_really_stops_and_destroys_the_pool():
    root = tempfile.mkdtemp(prefix="ak-daemon-")
    d = Daemon(root)
    assert d.ak("daemon", "start", "--pool-min", "2").returncode == 0
    d.wait_ready(2)
    pid = d.pid()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    r = d.ak("daemon", "stop")
    assert r.returncode == 0 and b"stopped" in r.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(d.socket)
    assert _containers(f"agentkernel.owner.pid={pid}") == []
    assert d.ak("daemon", "status").returncode == 3


def test_stale_socket_falls_back_to_the_cold_path():
    root = tempfile.mkdtemp(prefix="ak-daemon-")
    d = Daemon(root)
    os.makedirs(os.path.dirname(d.socket), exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(d.socket)
    s.close()  # a socket file nobody listens on
    r = d.ak("run", "--", "echo", "cold")
    assert (r.returncode, r.stdout) == (0, b"cold\n")
    assert d.ak("daemon", "start", "--pool-min", "1").returncode == 0
    assert d.ak("daemon", "stop").returncode == 0


def test_status_shows_pool_metrics(daemon):
    daemon.wait_ready(2)
    daemon.ak("run", "--", "true")
    st = daemon.status()
    p = st["pools"][0]
    assert p["backend"] == "podman" and p["image"] == "agentkernel/busybox"
    for k in ("hits", "misses", "hit_rate", "refill_ms_avg", "refill_ms_last", "destroyed", "cold_starts"):
        assert k in p["metrics"]
    assert p["config"]["min"] == 2 and p["config"]["max"] == 4
    text = daemon.ak("daemon", "status").stdout.decode()
    assert "hits" in text and "refill avg" in text


def test_session_label_is_on_pool_members(daemon):
    daemon.wait_ready(2)
    assert len(_containers(SESSION_LABEL)) >= 2


def test_wasm_runs_through_the_daemon_in_process_pool(daemon):
    r = daemon.ak("run", "--backend", "wasm", "--", "echo", "hello")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    r = daemon.ak("run", "--backend", "wasm", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7
    pools = daemon.status()["pools"]
    assert any(p.get("backend") == "wasm" for p in pools), pools
    # the text status lists the in-process instance pool next to the container pools
    r = daemon.ak("daemon", "status")
    assert r.returncode == 0, r.stderr
    assert b"pool wasm module " in r.stdout, r.stdout


def test_a_finished_lease_is_handed_back_so_the_next_command_does_not_reap_it(daemon):
    """The client renames its lease's journal entry to the daemon's name before it says DONE: a command
    started right after it (the daemon has not removed the member yet; here: the daemon is stopped) finds
    no dead owner's entry to reap, and the member is still the daemon's to remove."""
    daemon.wait_ready(2)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--", "sh", "-c", "echo started; sleep 1"],
                            env={**os.environ, **daemon.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"  # the lease was answered: the command runs in its member
    (leased,) = _claimed_by(daemon, proc.pid)
    dpid = daemon.pid()
    os.kill(dpid, signal.SIGSTOP)  # the daemon cannot remove the member (nor its entry) meanwhile
    try:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert _claimed_by(daemon, proc.pid) == [], "the exited client still owns the lease's entry by name"
        assert leased in _claimed_by(daemon, dpid), "the entry was handed back to the daemon"
        r = daemon.ak("gc", "--dry-run")  # what any command's start-up reaper would take: not the member
        assert r.returncode == 0 and leased.encode() not in r.stdout, r.stdout
    finally:
        os.kill(dpid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while leased in _claimed_by(daemon, dpid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leased not in _claimed_by(daemon, dpid), "the daemon removed the member and dropped its entry"


def test_stop_with_a_large_pool_removes_every_member(monkeypatch):
    """A 20-member podman pool: the stop reply says how long to wait (it grows with the pool), the members
    go in batched engine calls, and nothing is left once the daemon has exited."""
    from agentkernel.commands import daemon_client

    root = tempfile.mkdtemp(prefix="ak-daemon-")
    d = Daemon(root)
    assert d.ak("daemon", "start", "--pool-min", "20", "--pool-max", "20").returncode == 0
    pid = d.pid()
    try:
        d.wait_ready(20, timeout=240)
        assert len(_containers(f"agentkernel.owner.pid={pid}")) >= 20
        monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", d.env["AGENTKERNEL_RUNTIME_DIR"])
        st = daemon_client.request("stop")
        assert st and st["ok"] and st["pid"] == pid
        assert st["stop_timeout_s"] >= 40 + 0.5 * 20
        deadline = time.monotonic() + st["stop_timeout_s"]
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the daemon did not stop within {st['stop_timeout_s']} s")
        assert _containers(f"agentkernel.owner.pid={pid}") == []
        assert not os.path.exists(d.socket)
    finally:
        d.ak("daemon", "stop")


def test_the_daemon_loop_has_worker_threads_for_many_blocking_starts_and_teardowns_at_once():
    """Each pool member's start and teardown holds a worker thread of the daemon's loop for its whole wall
    time (mostly blocked on the runtime or on killed processes): the loop the daemon starts on has far more
    workers than asyncio's default (cpus + 4), so 24 blocking calls at once all run together instead of
    queueing behind each other (here they would otherwise never meet at the barrier)."""
    import asyncio
    import threading

    from agentkernel.daemon import server
    from agentkernel.pool import PoolConfig

    n = 24
    assert (os.cpu_count() or 1) + 4 < n <= server.WORKER_THREADS
    barrier = threading.Barrier(n, timeout=10)

    async def main() -> list[int]:
        d = server.Daemon(pool_defaults=PoolConfig(min_size=0, max_size=1), warm=[])
        await d.start_background()
        try:
            return await asyncio.gather(*(asyncio.to_thread(barrier.wait) for _ in range(n)))
        finally:
            await d.close()

    assert sorted(asyncio.run(main())) == list(range(n)), "every call was running at the same time"
