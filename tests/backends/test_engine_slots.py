"""Engine admission (``backends/_engineslots.py``): an overloaded engine makes calls queue, never fail or leak.

- The slots are real ``flock``s shared by processes: N held means the next caller waits; a holder that is
  SIGKILLed frees its slot; a cancelled async waiter gives the slot back.
- With the real podman: 30 concurrent CLI lifecycles (create/start/exec/stop/rm, each a new process) through
  2 slots all succeed, never run more than 2 podman clients at once, and leave no container.
- A create SIGKILLed while it waits in the queue leaves nothing; a create whose CLI is SIGKILLed while its
  ``podman create`` runs is removed by the next command's reaper, even when that client finishes later.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from agentkernel.backends import _engineslots
from tests.conftest import require_backend

pytestmark = pytest.mark.timeout(300)

IMAGE = "agentkernel/busybox"


@pytest.fixture
def slots(tmp_path, monkeypatch):
    d = str(tmp_path / "slots")
    monkeypatch.setenv(_engineslots.DIR_ENV, d)
    monkeypatch.setenv(_engineslots.SLOTS_ENV, "2")
    return d


def _holder(engine: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Another process holding one slot of ``engine`` until killed (it prints 'held' once it has it)."""
    code = ("import sys; from agentkernel.backends import _engineslots as s; "
            f"slot = s.acquire_sync({engine!r}); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert p.stdout.readline() == b"held\n"
    return p


def test_slots_are_shared_between_processes_and_freed_by_death(slots):
    a, b = _holder("t"), _holder("t")
    try:
        assert _engineslots.try_acquire("t") is None  # both held elsewhere
        got: list[float] = []
        t = threading.Thread(target=lambda: got.append(_engineslots.acquire_sync("t").waited_s))
        t.start()
        time.sleep(0.3)
        assert not got  # queued
        a.kill()  # SIGKILL: its descriptors, and so its slot, go with it
        a.wait()
        t.join(10)
        assert got and got[0] >= 0.3
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_cleanup_calls_take_at_most_half_the_slots(slots, monkeypatch):
    """stop/rm never hold every slot: creates and starts (what callers wait for) always find room."""
    monkeypatch.setenv(_engineslots.SLOTS_ENV, "4")
    cleanups = [_engineslots.try_acquire("t", cleanup=True) for _ in range(3)]
    assert [s is not None for s in cleanups] == [True, True, False]
    others = [_engineslots.try_acquire("t") for _ in range(3)]
    assert [s is not None for s in others] == [True, True, False]
    for s in [*cleanups, *others]:
        if s is not None:
            s.release()


def test_admission_off_never_waits(slots, monkeypatch):
    monkeypatch.setenv(_engineslots.SLOTS_ENV, "0")
    held = [_engineslots.acquire_sync("t") for _ in range(5)]
    assert all(s.fd == -1 for s in held)


def test_cancelled_waiter_gives_the_slot_back(slots):
    async def go() -> None:
        first, second = await _engineslots.acquire("t"), await _engineslots.acquire("t")
        waiter = asyncio.ensure_future(_engineslots.acquire("t"))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        waiter.cancel()
        first.release()
        await asyncio.sleep(0.3)  # the waiter's thread got the slot, saw the cancel, released it
        again = await asyncio.wait_for(_engineslots.acquire("t"), 5)
        again.release()
        second.release()

    asyncio.run(go())


# ---- with the real podman ---------------------------------------------------------------------------------

def _env(slots_dir: str, label: str, n: int) -> dict[str, str]:
    e = dict(os.environ)
    e[_engineslots.DIR_ENV] = slots_dir
    e[_engineslots.SLOTS_ENV] = str(n)
    e["AGENTKERNEL_LABELS"] = ",".join(x for x in (e.get("AGENTKERNEL_LABELS"), label) if x)
    return e


def _ak(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _containers(label: str) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _podman_clients(marker: bytes) -> list[int]:
    """podman client processes whose arguments contain ``marker`` that were all alive at one moment: the
    scan of /proc takes a while, so those seen are checked again at its end (one that exited during the
    scan is not counted beside the one that took its slot)."""
    seen = _scan(marker)
    alive = [p for p in seen if os.path.exists(f"/proc/{p}")]
    return [p for p in alive if _ppid(p) not in alive]  # not podman's own fork on its way to exec a helper


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _scan(marker: bytes) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker in cmd and os.path.basename(cmd.split(b"\0", 1)[0]) == b"podman":
            out.append(int(e))
    return out


def _unique() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return tag, f"agentkernel.test-slots={tag}"


def _cleanup(label: str) -> None:
    for name in _containers(label):
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)


def test_30_concurrent_cli_lifecycles_through_2_slots_all_succeed_and_leave_nothing(slots):
    require_backend("podman")
    tag, label = _unique()
    env = _env(slots, label, 2)
    names = [f"sl{tag}-{i}" for i in range(30)]
    peak = [0]
    stop = threading.Event()

    def watch() -> None:  # podman clients of this test alive at once
        marker = f"agentkernel-sl{tag}-".encode()
        while not stop.is_set():
            peak[0] = max(peak[0], len(_podman_clients(marker)))
            time.sleep(0.005)

    def lifecycle(name: str) -> str | None:
        steps = [("create", name, "--backend", "podman", "--image", IMAGE), ("start", name),
                 ("exec", name, "--", "echo", "hello"), ("stop", name), ("rm", name)]
        for argv in steps:
            r = _ak(env, *argv)
            if r.returncode != 0:
                _ak(env, "rm", name)
                return f"{argv[0]} {name}: exit {r.returncode}: {r.stderr.decode()[-300:]}"
            if argv[0] == "exec" and r.stdout != b"hello\n":
                _ak(env, "rm", name)
                return f"exec {name}: {r.stdout!r}"
        return None

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(30) as pool:
            errors = [e for e in pool.map(lifecycle, names) if e]
    finally:
        stop.set()
        w.join()
        left = _containers(label)
        _cleanup(label)
    assert errors == []
    assert left == []
    assert 1 <= peak[0] <= 2, f"{peak[0]} podman clients ran at once through 2 slots"


def test_create_killed_while_queued_leaves_nothing(slots):
    require_backend("podman")
    tag, label = _unique()
    env = _env(slots, label, 1)
    holder = _holder("podman", env)  # the only slot is taken: the create must queue
    name = f"sq{tag}"
    p: subprocess.Popen | None = None
    try:
        p = subprocess.Popen([sys.executable, "-m", "agentkernel", "create", name, "--backend", "podman",
                              "--image", IMAGE], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        time.sleep(3)  # well into the queue (a create's own work before the engine call is ~0.2 s)
        assert p.poll() is None
        assert _podman_clients(f"agentkernel-{name}-".encode()) == []
        p.send_signal(signal.SIGKILL)
        p.communicate()
        holder.kill()
        holder.wait()
        r = _ak(env, "rm", name)  # its store row (state "creating"); the reaper runs first
        assert r.returncode == 0, r.stderr
        assert _containers(label) == []
        assert json.loads(_ak(env, "list", "--json").stdout or b"[]") == []
    finally:
        holder.kill()
        holder.wait()
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate()
        _ak(env, "rm", name)
        _cleanup(label)


def test_create_killed_mid_engine_call_is_removed_by_the_reaper(slots):
    """The CLI dies while its ``podman create`` runs: the client goes on (orphaned, held back here until
    the next command's reaper has looked). Whatever that client does then - creates the container after
    the reaper found none (the reaper waits for it and removes it), or fails because the reaper removed its
    bind sources - nothing of the sandbox is left."""
    require_backend("podman")
    tag, label = _unique()
    env = _env(slots, label, 2)
    name = f"sk{tag}"
    marker = f"agentkernel-{name}-".encode()
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "create", name, "--backend", "podman",
                          "--image", IMAGE], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    clients: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (clients := _podman_clients(marker)) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert clients, "podman create never started"
        for c in clients:  # hold the orphan back so the reaper runs before it creates anything
            os.kill(c, signal.SIGSTOP)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        reaper = subprocess.Popen([sys.executable, "-m", "agentkernel", "list"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        for c in clients:
            os.kill(c, signal.SIGCONT)
        reaper.communicate(timeout=240)
        assert reaper.returncode == 0
        while _podman_clients(marker):
            time.sleep(0.05)
        assert _containers(label) == []
        assert _ak(env, "rm", name).returncode == 0
    finally:
        for c in clients:
            try:
                os.kill(c, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _cleanup(label)
