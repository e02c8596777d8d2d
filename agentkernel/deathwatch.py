"""A sandbox dies with the process that owns it, even when that process is SIGKILLed.

A daemon-less ``agentkernel run`` owns its sandbox. If the CLI is killed with SIGKILL it cannot clean
up: the container (podman's conmon, the Docker daemon, or the OCI runtime's orphaned init) keeps running
until the next agentkernel command reaps it from the ownership journal. ``arm`` closes that window: it
forks a small watcher (its own session, stdio on /dev/null, no other fds) that blocks reading a pipe
whose only write end the CLI holds. The kernel closes that end whenever the CLI exits, however it exits:

- ``disarm`` (the normal end) writes one byte first: the watcher exits without doing anything;
- EOF without that byte: the owner died abnormally; the watcher removes the journalled resource right
  away (the same removal the reaper does), then exits.

With the agent built, the watcher is ``ak-agent watch-owner`` started with ``posix_spawn`` (a vfork:
~0.2 ms), which on EOF execs a fresh Python that does the removal; without it, a fork() of this process
(~1 ms, and while the fork lives the CLI copies every page it writes: ~2-4 ms of CPU on a one-shot run).
One pipe per run; no thread, no polling. Standard library only.
"""

from __future__ import annotations

import os

_ARMED: dict[tuple[str, str], tuple[int, int]] = {}  # (backend, sandbox id) -> (write end, watcher pid)


WATCH_MARK = b"ak-agent watch-owner --fd N -- PROGRAM ARGS..."  # in the agent's usage text


def arm(backend: str, sandbox_id: str) -> None:
    """Start watching this process on behalf of the journalled resource ``backend:sandbox_id`` (once: a
    resource already watched keeps its watcher)."""
    if (backend, sandbox_id) in _ARMED:
        return
    from . import paths

    r, w = os.pipe2(os.O_CLOEXEC)
    agent = paths.agent_with(WATCH_MARK)
    if agent is not None:
        pid = _spawn_watcher(agent, r, backend, sandbox_id)
        os.close(r)
        if pid is None:
            os.close(w)
        else:
            _ARMED[(backend, sandbox_id)] = (w, pid)
        return
    try:
        pid = os.fork()
    except OSError:  # e.g. EAGAIN at a pids limit: the journal still lets the next command reap it
        os.close(r)
        os.close(w)
        return
    if pid == 0:  # the watcher
        try:
            os.close(w)
            for fd in list(_ARMED.values()):
                try:
                    os.close(fd[0])  # other watchers' write ends: they must see our parent's death only
                except OSError:
                    pass
            os.setsid()  # a terminal's Ctrl-C or hangup for the CLI's process group is not ours
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, r)
            os.closerange(r + 1, 1 << 16)
            try:
                data = os.read(r, 1)
            except OSError:
                data = b""
            if not data:
                _reap(backend, sandbox_id)
        finally:
            os._exit(0)
    os.close(r)
    _ARMED[(backend, sandbox_id)] = (w, pid)


def _spawn_watcher(agent: str, r: int, backend: str, sandbox_id: str) -> int | None:
    """``ak-agent watch-owner`` on the read end ``r``, in a session of its own with stdio on /dev/null;
    on EOF it execs a Python with this process's sys.path that calls ``_reap``. The resource is named in
    its environment, not its command line (a process naming a sandbox counts as the sandbox's own:
    ``oci.runtime.leftovers``)."""
    import _signal as signal  # not `signal`: it imports enum
    import sys

    code = (f"import os, sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
            "from agentkernel.deathwatch import _reap; _reap(*os.environ['AGENTKERNEL_DEATHWATCH'].split(':', 1))")
    argv = [agent, "watch-owner", "--fd", str(r), "--", sys.executable, "-I", "-S", "-c", code]
    env = dict(os.environ, AGENTKERNEL_DEATHWATCH=f"{backend}:{sandbox_id}")
    acts = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    try:
        os.set_inheritable(r, True)  # the watcher closes every other fd itself
        return os.posix_spawn(agent, argv, env, file_actions=acts, setsid=True,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except OSError:  # e.g. EAGAIN at a pids limit: the journal still lets the next command reap it
        return None


def disarm(backend: str, sandbox_id: str) -> None:
    """The owner finished normally (and cleaned up itself): let the watcher go."""
    entry = _ARMED.pop((backend, sandbox_id), None)
    if entry is None:
        return
    w, pid = entry
    try:
        os.write(w, b"x")
    except OSError:
        pass
    os.close(w)
    _reap_exited(pid)


_EXITING: list[int] = []  # disarmed watchers not yet reaped


def _reap_exited(pid: int) -> None:
    """Reap disarmed watchers that have exited, without waiting for ``pid`` (it exits as soon as it reads
    the byte; waiting for it to be scheduled costs the CLI's one-shot its wake-up latency). One still
    running is reaped by a later call, or by init once this process exits (the CLI does right after)."""
    _EXITING.append(pid)
    for p in list(_EXITING):
        try:
            done, _ = os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            done = p
        if done:
            _EXITING.remove(p)


def _reap(backend: str, sandbox_id: str) -> None:
    from . import owner

    owner.reap_one(backend, sandbox_id)
