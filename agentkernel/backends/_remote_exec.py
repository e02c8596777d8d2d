"""Commands for engines whose exec API takes only an argv (Kubernetes, Nomad): no cwd, no per-exec
environment, no server-side timeout, no stdin EOF on older protocols.

``wrap`` returns one argv that runs ``/bin/sh -c SCRIPT`` with a fixed script; every caller value
(directory, variables, timeout, the command itself) is a separate positional argument, never part of
a shell string, so no quoting is involved and nothing a caller passes is interpreted by the shell.
The exit status is the command's (126/127 when it cannot be run, as in a shell).
"""

from __future__ import annotations

import math

# $1 = directory, $2 = number of NAME=VALUE words that follow, then the words, then the timeout in
# seconds (0 = none), then the stdin length for protocols without stdin EOF (-1 = stream as is), then
# the command. With a timeout a detached sleeper kills the command (exec keeps the shell's pid) when it
# overruns, so a client that gave up does not leave it running; its stdio is /dev/null so it never holds
# the exec session open.
SCRIPT = (
    'cd -- "$1" || exit 126; shift; '
    'n=$1; shift; while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n-1)); done; '
    't=$1; shift; l=$1; shift; '
    'if [ "$t" != 0 ]; then (sleep "$t"; kill -KILL $$) </dev/null >/dev/null 2>&1 & fi; '
    'if [ "$l" -ge 0 ]; then head -c "$l" | "$@"; exit $?; fi; '
    'exec "$@"'
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
