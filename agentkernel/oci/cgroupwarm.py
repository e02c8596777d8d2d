"""Pay the kernel's cgroup-migration grace period in the background, before the runtime needs it.

On cgroup v1 every write to a ``cgroup.procs`` file takes the global ``cgroup_threadgroup_rwsem`` for
writing, and the first such write after the lock has been idle waits for a full RCU grace period
(``rcu_sync_enter``): measured here (kernel 6.18, 2 cores) a cold write costs 12-16 ms, while a write
within ~10 ms of the previous one costs ~0.01 ms. crun's first join (the first hierarchy it puts the
container's init in) was that 12-16 ms of a 48 ms one-shot ``oci`` run.

``Warmer`` rewrites this process's own pid into the ``cgroup.procs`` of the cgroup it already is in (a
no-op migration: membership never changes) every ``INTERVAL_S`` on a background thread, from before
the bundle is prepared until the runtime has put the container in its cgroups (its pid file exists) or
``MAX_S`` passed. The grace period then elapses while Python prepares the bundle, and the runtime's own
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


class Warmer:
    """``start()`` the background writes; ``stop()`` ends them (idempotent). ``until``: a path whose
    existence ends the writes early (the runtime's pid file: the container has joined its cgroups)."""

    def __init__(self, procs_file: str | None, until: str | None = None) -> None:
        self.procs_file, self.until = procs_file, until
        self._stop = _thread.allocate_lock()
        self._stop.acquire()
        self._done = _thread.allocate_lock()
        self.writes = 0  # for tests and diagnostics
        self.error: OSError | None = None

    def start(self) -> Warmer:
        if self.procs_file is not None:
            self._done.acquire()
            _thread.start_new_thread(self._run, ())
        return self

    def _run(self) -> None:
        import time

        pid = str(os.getpid()).encode()
        deadline = time.monotonic() + MAX_S
        try:
            fd = os.open(self.procs_file, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = exc
            self._done.release()
            return
        try:
            while True:
                os.write(fd, pid)  # releases the GIL while the kernel waits for the grace period
                self.writes += 1
                if self._stop.acquire(timeout=INTERVAL_S):  # stopped
                    break
                if time.monotonic() > deadline or (self.until is not None and os.path.exists(self.until)):
                    break
        except OSError as exc:  # e.g. the cgroup went away: warming is an optimisation only
            self.error = exc
        finally:
            os.close(fd)
            self._done.release()

    def stop(self, *, wait: bool = True) -> None:
        """End the writes; ``wait``: until the thread is done (at most one write plus ``INTERVAL_S``; an
        event loop passes False and the thread ends on its own right after)."""
        if self._stop.locked():
            self._stop.release()
        if self.procs_file is not None and wait:
            self._done.acquire()
            self._done.release()
            self.procs_file = None


def start(until: str | None = None) -> Warmer:
    """A running ``Warmer`` for this process's own v1 cgroup (a no-op one where there is none)."""
    return Warmer(own_procs_file(), until).start()
