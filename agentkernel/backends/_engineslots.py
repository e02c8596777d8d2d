"""Machine-wide admission for container-engine calls: at most N engine client processes at once.

A hundred concurrent ``podman`` invocations on two cores do not finish a hundred times slower: they thrash
(podman's container/storage locks, each client's own start-up CPU), so every call takes minutes and fixed
timeouts fire. Every engine call from this package - CLI processes, the daemon, ``serve`` - therefore first
takes one of N *slots*: ``flock`` on files ``<engine>.<i>`` in one directory shared by every process on the
machine (not the per-user/per-test runtime dir: the engine is machine-wide). A process that dies
(even SIGKILL) releases its slot with its file descriptors. Waiters queue instead of failing:

- the fast path tries every slot without blocking (N ``open`` + ``flock`` calls, no thread);
- otherwise the waiter blocks in the kernel on the engine's ``queue`` file; the one process holding it
  (the head of the queue) polls the N slots every few milliseconds until one frees, then hands the queue
  on. Only one process polls; the others sleep in ``flock``.

Time spent waiting is not engine time: callers start their engine timeouts after ``acquire`` returns
(``Slot.waited_s`` says how long the queue took). N: ``AGENTKERNEL_ENGINE_SLOTS`` (``0`` turns admission
off), default ``default_slots()``; the directory: ``AGENTKERNEL_ENGINE_SLOTS_DIR``. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import time

SLOTS_ENV = "AGENTKERNEL_ENGINE_SLOTS"
DIR_ENV = "AGENTKERNEL_ENGINE_SLOTS_DIR"
POLL_MIN_S = 0.002
POLL_MAX_S = 0.02


def default_slots() -> int:
    """Engine calls at once when not configured: 8 per core, at least 4. Measured on 2 cores (rootful podman
    on btrfs, run/stop/rm): podman serialises on its storage lock, ~7-10 calls/s with 4, 16 or 64 clients
    at once; a few slots per core keep it busy without a crowd of waiting podman processes, whose order of
    service podman's lock hand-off leaves to chance (docs/backends/containers.md, "Engine admission")."""
    return max(4, 8 * (os.cpu_count() or 1))


def slot_count() -> int:
    v = os.environ.get(SLOTS_ENV, "").strip()
    if v.isdigit():
        return int(v)
    return default_slots()


def slots_dir() -> str:
    d = os.environ.get(DIR_ENV)
    if not d:
        if os.geteuid() == 0:
            d = "/run/agentkernel-engine"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "agentkernel-engine")
        else:
            d = f"/tmp/agentkernel-engine-{os.geteuid()}"
    return d


class Slot:
    """One held slot (or none: admission off). ``release`` is idempotent; a dead process releases it too."""

    __slots__ = ("fd", "waited_s")

    def __init__(self, fd: int, waited_s: float) -> None:
        self.fd, self.waited_s = fd, waited_s

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # closing the only descriptor of the open file drops its flock

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _order(n: int, cleanup: bool) -> list[int]:
    """The slots a caller tries, in order, from a per-process offset (concurrent callers do not all
    contend on slot 0): cleanup calls the lower half only; the others the upper half first,
    leaving the lower half to cleanup while slots are free."""
    pid, h = os.getpid(), n // 2
    if cleanup:
        m = max(1, h)
        return [(pid + k) % m for k in range(m)]
    upper = [h + (pid + k) % (n - h) for k in range(n - h)]
    return upper + [(pid + k) % h for k in range(h)]


def _try_slots(base: str, order: list[int]) -> int:
    """A locked slot descriptor, or -1 when every slot in ``order`` is held."""
    for i in order:
        fd = _open(f"{base}.{i}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
    return -1


def try_acquire(engine: str, cleanup: bool = False) -> Slot | None:
    """A slot now, or None when every slot is taken (never waits). Admission off: an empty Slot."""
    n = slot_count()
    if n <= 0:
        return Slot(-1, 0.0)
    fd = _try_slots(os.path.join(slots_dir(), engine), _order(n, cleanup))
    return Slot(fd, 0.0) if fd >= 0 else None


def acquire_sync(engine: str, abandoned=None, cleanup: bool = False) -> Slot:
    """Wait (blocking) for a slot of ``engine``. ``abandoned()`` (optional) is asked once the slot is held:
    True releases it at once and returns an empty Slot (an async waiter that was cancelled). ``cleanup``
    callers (stop, rm) queue on a queue of their own and take only the lower half of the slots, so a crowd
    of removals (a pool destroying used members, a stress run's teardown) never holds every slot while
    creates and starts - what callers wait for - queue behind them (``_order``)."""
    t0 = time.monotonic()
    n = slot_count()
    if n <= 0:
        return Slot(-1, 0.0)
    order = _order(n, cleanup)
    base = os.path.join(slots_dir(), engine)
    fd = _try_slots(base, order)
    if fd < 0:
        q = _open(f"{base}.queue{'-cleanup' if cleanup else ''}")
        try:
            fcntl.flock(q, fcntl.LOCK_EX)  # the head of the queue; the others sleep here
            delay = POLL_MIN_S
            while (fd := _try_slots(base, order)) < 0:
                time.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
        finally:
            os.close(q)
    slot = Slot(fd, time.monotonic() - t0)
    if abandoned is not None and abandoned():
        slot.release()
    return slot


async def acquire(engine: str, cleanup: bool = False) -> Slot:
    """Wait for a slot of ``engine`` without blocking the event loop: the fast path inline, the queue in a
    thread of its own (not the loop's default executor, which a long queue would starve). Cancelling the
    wait is safe: the thread gives the slot back as soon as it gets it."""
    slot = try_acquire(engine, cleanup)
    if slot is not None:
        return slot
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Slot] = loop.create_future()
    lock = threading.Lock()
    state = {"cancelled": False}

    def abandoned() -> bool:
        with lock:
            return state["cancelled"]

    def deliver(s: Slot | BaseException) -> None:
        if fut.cancelled():
            if isinstance(s, Slot):
                s.release()
        elif isinstance(s, BaseException):
            fut.set_exception(s)
        else:
            fut.set_result(s)

    def wait() -> None:
        try:
            res: Slot | BaseException = acquire_sync(engine, abandoned, cleanup)
        except BaseException as exc:  # handed to the waiter
            res = exc
        try:
            loop.call_soon_threadsafe(deliver, res)
        except RuntimeError:  # the loop is closed: nobody waits any more
            if isinstance(res, Slot):
                res.release()

    threading.Thread(target=wait, name=f"engine-slot-{engine}", daemon=True).start()
    try:
        return await fut
    except asyncio.CancelledError:
        with lock:
            state["cancelled"] = True
        raise
