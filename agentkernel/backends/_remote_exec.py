"""Commands for engines whose exec API takes only an argv (Kubernetes, Nomad): no cwd, no per-exec
environment, no server-side timeout, no stdin EOF on older protocols.

``wrap`` returns one argv that runs ``/bin/sh -c SCRIPT`` with a fixed script; every caller value
(directory, variables, timeout, the command itself) is a separate positional argument, never part of
a shell string, so no quoting is involved and nothing a caller passes is interpreted by the shell.
The exit status is the command's (126/127 when it cannot be run, as in a shell).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from .base import ExecRequest, ExecResult, OutputCollector, SandboxRef

# $1 = directory, $2 = number of NAME=VALUE words that follow, then the words, then the timeout in
# seconds (0 = none), then the stdin length for protocols without stdin EOF (-1 = stream as is), then
# the command. Without a timeout the shell execs the command (exit status and signals are its own). With
# one, the command runs in its own session (setsid) and a detached killer SIGKILLs that whole process
# group at the deadline, so background children go too and a client that gave up leaves nothing
# running; stdin is handed through fd 3 (an asynchronous command would get /dev/null), the killer's
# stdio is /dev/null so it never holds the exec session open, and the shell's own job notices are
# silenced before it exits with the command's status.
SCRIPT = (
    'cd -- "$1" || exit 126; shift; '
    'n=$1; shift; while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n-1)); done; '
    't=$1; shift; l=$1; shift; '
    'if [ "$l" -ge 0 ]; then exec 4<&0; exec 0</dev/null; fi; '
    'if [ "$t" = 0 ]; then '
    '  if [ "$l" -ge 0 ]; then head -c "$l" <&4 | "$@"; exit $?; fi; '
    '  exec "$@"; '
    'fi; '
    'exec 3<&0; '
    'if [ "$l" -ge 0 ]; then setsid sh -c \'head -c "$1" | { shift; "$@"; }\' sh "$l" "$@" <&4 3<&- 4<&- & '
    'else setsid "$@" <&3 3<&- & fi; '
    'p=$!; '
    'setsid sh -c \'sleep "$1"; kill -KILL -"$2"\' sh "$t" "$p" </dev/null >/dev/null 2>&1 & k=$!; '
    'wait "$p"; rc=$?; exec 2>/dev/null; kill -KILL -"$k"; exit "$rc"'
)


def wrap(argv: list[str], *, cwd: str, env: dict[str, str] | None = None, timeout: float | None = None,
         stdin_length: int | None = None) -> list[str]:
    """The argv to send to the engine. ``stdin_length`` (bytes) makes the command see EOF after that
    many bytes, for exec protocols that cannot close stdin (Kubernetes v4)."""
    env = env or {}
    words = [f"{k}={v}" for k, v in env.items()]
    t = str(max(1, math.ceil(timeout))) if timeout else "0"
    n = str(-1 if stdin_length is None else stdin_length)
    return ["/bin/sh", "-c", SCRIPT, "sh", cwd, str(len(words)), *words, t, n, *argv]

# how long past the deadline a client waits for the in-sandbox killer to end the command (so that when
# exec returns "timed out", nothing of the command is left running)
KILL_GRACE_S = 5.0


def outcome(code: int | None, elapsed: float, timeout: float | None) -> tuple[int, int | None, bool]:
    """(exit code, signal, timed out) from the exit status the engine reported (None: the client gave up).
    These exec APIs report a signal death as 128+N like a shell does, so 129..192 is read as signal N."""
    if code is None or (timeout is not None and elapsed >= timeout):
        return 124, None, True
    return code, (code - 128 if 128 < code <= 192 else None), False


async def run(start: Callable[[], Awaitable[int | None]], req: ExecRequest, collector: OutputCollector,
              exec_fn: Callable[[ExecRequest], Awaitable[ExecResult]], ref: SandboxRef) -> ExecResult:
    """Await ``start()`` (the engine's exec of a ``wrap``ped argv, returning its exit status) under the
    request's timeout plus ``KILL_GRACE_S``, and make the ExecResult: exit code, signal, timeout, the
    collected output, and, for a SIGKILL that was not the timeout, whether the OOM killer did it (probed
    with ``exec_fn``, which runs a command in the same sandbox)."""
    t0 = time.perf_counter()
    code: int | None = None
    try:
        # past the deadline the in-sandbox killer ends the command; waiting for that (bounded) means
        # nothing of it is left running when this returns
        async with asyncio.timeout(req.timeout + KILL_GRACE_S if req.timeout else None):
            code = await start()
    except TimeoutError:
        code = None
    code, sig, timed_out = outcome(code, time.perf_counter() - t0, req.timeout)
    res = ExecResult(code, signal=sig, timed_out=timed_out, truncated=collector.truncated,
                     stdout=bytes(collector.buf[1]), stderr=bytes(collector.buf[2]))
    res.timings["exec_ms"] = (time.perf_counter() - t0) * 1e3
    if code == 137 and not timed_out:
        res.oom_killed = await oom_killed(exec_fn, ref)
    return res


# The sandbox's own cgroup counts OOM kills (cgroup v2 memory.events, v1 memory.oom_control): read after
# a command died of SIGKILL, a higher count than last seen means the out-of-memory killer did it.
OOM_COUNT_ARGV = ["cat", "/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"]


def oom_kills(text: bytes) -> int | None:
    for line in text.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


async def oom_killed(exec_fn: Callable[[ExecRequest], Awaitable[ExecResult]], ref: SandboxRef) -> bool:
    """Whether the sandbox's OOM kill count rose since last seen (kept in ``ref.handle["oom_kills"]``)."""
    try:
        probe = await exec_fn(ExecRequest(list(OOM_COUNT_ARGV), cwd="/", timeout=30))
    except Exception:
        return False
    n = oom_kills(probe.stdout)
    if n is None or n <= int(ref.handle.get("oom_kills") or 0):
        return False
    ref.handle["oom_kills"] = n
    return True
