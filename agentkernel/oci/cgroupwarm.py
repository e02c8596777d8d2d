"""Pay the kernel's cgroup-migration grace period in the background, before the runtime needs it.

On cgroup v1 every write to a ``cgroup.procs`` file takes the global ``cgroup_threadgroup_rwsem`` for
writing, and the first such write after the lock has been idle waits for a full RCU grace period
(``rcu_sync_enter``): measured here (kernel 6.18, 2 cores) a cold write costs 12-16 ms, while a write
within ~10 ms of the previous one costs ~0.01 ms. crun's first join (the first hierarchy it puts the
container's init in) was that 12-16 ms of a 48 ms one-shot ``oci`` run.

``Warmer`` rewrites this process's own pid into the ``cgroup.procs`` of the cgroup it already is in (a
no-op migration: membership never changes) every ``INTERVAL_S`` on a background thread, from before
the bundle is prepared until the runtime has put the container in its cgroups (its pid file exists) or
``MAX_S`` passed; warmers active at once in one process share that thread (one write per interval for
all of them). The grace period then elapses while Python prepares the bundle, and the runtime's own
joins find the lock already in its slow-path state. Nothing is skipped: the runtime performs every
join and limit write it did before. On cgroup v2-only hosts (crun clones straight into the cgroup),
without root, or when the file cannot be written, it does nothing.

Standard library only (``_thread``: ``threading`` costs ~1 ms of imports on the CLI's cold path).
"""

from __future__ import annotations

import _thread
import os

INTERVAL_S = 0.003  # well inside the ~10 ms a finished grace period stays usable (measured)
MAX_S = 5.0  # a runtime that takes longer than this to start gains nothing from more writes


def own_procs_file() -> str | None:
    """The ``cgroup.procs`` of the cgroup v1 hierarchy this process belongs to (the first one whose file
    exists and is writable), or None (no v1 hierarchy: nothing to warm)."""
    from .runtime import hierarchies

    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mine: dict[frozenset[str], str] = {}
    for line in lines:
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid != "0" and ctrls:
            mine[frozenset(ctrls.split(","))] = path
    for mnt, kind, ctrls in hierarchies():
        if kind != "cgroup":
            continue
        names = {c for c in ctrls if c not in ("rw", "ro")}
        rel = next((p for k, p in mine.items() if k & names), None)  # "name=systemd" matches itself
        if rel is None:
            continue
        procs = os.path.join(mnt, rel.lstrip("/"), "cgroup.procs")
        if os.access(procs, os.W_OK):
            return procs
    return None


class _Writer:
    """The one thread writing to ``procs_file`` for every ``Warmer`` active on it at once."""

    def __init__(self, procs_file: str, fd: int) -> None:
        self.procs_file, self.fd = procs_file, fd
        self.users: list[Warmer] = []
        self.finished = _thread.allocate_lock()  # held until the thread has ended
        self.finished.acquire()


# One writer per file, shared: a daemon starting several sandboxes at once keeps the lock warm with one
# write every INTERVAL_S, not one per start (each write takes the kernel's threadgroup lock for writing,
# which every fork and exit on the host waits for), and without a thread made per start.
_LOCK = _thread.allocate_lock()
_WRITERS: dict[str, _Writer] = {}


class Warmer:
    """``start()`` the background writes; ``stop()`` ends them (idempotent). ``until``: a path whose
    existence ends the writes early (the runtime's pid file: the container has joined its cgroups).
    Warmers active at the same time in one process share one writer thread: the lock stays warm while
    any of them runs; ``writes`` counts the writes made while this one was active."""

    def __init__(self, procs_file: str | None, until: str | None = None) -> None:
        self.procs_file, self.until = procs_file, until
        self.writes = 0  # for tests and diagnostics
        self.error: OSError | None = None
        self.deadline = 0.0
        self._writer: _Writer | None = None

    def start(self) -> Warmer:
        if self.procs_file is None:
            return self
        import time

        self.deadline = time.monotonic() + MAX_S
        with _LOCK:
            w = _WRITERS.get(self.procs_file)
            fresh = w is None
            if fresh:
                try:
                    fd = os.open(self.procs_file, os.O_WRONLY | os.O_CLOEXEC)
                except OSError as exc:
                    self.error = exc
                    return self
                w = _WRITERS[self.procs_file] = _Writer(self.procs_file, fd)
            w.users.append(self)
            self._writer = w
        if fresh:
            try:
                _thread.start_new_thread(_write_loop, (w,))
            except BaseException:  # no thread (e.g. out of threads): leave no writer for later warmers to join
                with _LOCK:
                    if _WRITERS.get(w.procs_file) is w:
                        del _WRITERS[w.procs_file]
                os.close(w.fd)
                w.finished.release()
                self._writer = None
                raise
        return self

    def stop(self, *, wait: bool = True) -> None:
        """End the writes for this warmer (none is counted for it afterwards); ``wait``: when no other
        warmer shares the thread, until it is done (at most one write plus ``INTERVAL_S``; an event loop
        passes False and the thread ends on its own right after)."""
        w = self._writer
        if w is None:
            return
        self._writer = None
        with _LOCK:
            if self in w.users:
                w.users.remove(self)
            last = not w.users
        if wait and last:
            w.finished.acquire()
            w.finished.release()


def _write_loop(w: _Writer) -> None:
    import time

    pid = str(os.getpid()).encode()
    try:
        while True:
            try:
                os.write(w.fd, pid)  # releases the GIL while the kernel waits for the grace period
            except OSError as exc:  # e.g. the cgroup went away: warming is an optimisation only
                with _LOCK:
                    for u in w.users:
                        u.error = exc
                    w.users.clear()
                    del _WRITERS[w.procs_file]
                break
            now = time.monotonic()
            with _LOCK:
                for u in w.users:
                    u.writes += 1
                for u in [u for u in w.users if now > u.deadline or (u.until is not None and os.path.exists(u.until))]:
                    w.users.remove(u)
                if not w.users:  # the last one is done: a later warmer starts a new writer
                    del _WRITERS[w.procs_file]
                    break
            time.sleep(INTERVAL_S)
    finally:
        os.close(w.fd)
        w.finished.release()


def start(until: str | None = None) -> Warmer:
    """A running ``Warmer`` for this process's own v1 cgroup (a no-op one where there is none)."""
    return Warmer(own_procs_file(), until).start()
