"""How a command ended, rendered once: the exit code the CLI returns and the notes a user sees.

Every run path (one-shot on any backend, the daemon's lease and proxy modes, ``--keep``) ends in
``render``: one ``EXIT_TIMEOUT``, one wording for timeouts, OOM kills and signals. ``Outcome`` is
defined here (the contract, ``backends.base``, re-exports it) so the warm path need not import the
contract. Hot path: no imports beyond what the caller already has.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .backends.base import ExecResult

EXIT_TIMEOUT = 124  # like coreutils' timeout(1)


class Outcome:
    """How one one-shot command ended (``OneShot.run_oneshot``). ``exit_code`` is the command's status
    (128+N when killed by signal N); ``timed_out`` means the sandbox was killed at the deadline (the
    renderer turns it into exit 124); ``oom`` means the out-of-memory killer struck; ``note`` is a
    backend-specific line for the user, or None."""

    __slots__ = ("exit_code", "note", "oom", "signal", "timed_out")

    def __init__(self, exit_code: int, *, signal: int | None = None, timed_out: bool = False, oom: bool = False,
                 note: str | None = None) -> None:
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out
        self.oom = oom
        self.note = note

    def __repr__(self) -> str:
        return (f"Outcome(exit_code={self.exit_code}, signal={self.signal}, timed_out={self.timed_out}, "
                f"oom={self.oom}, note={self.note!r})")

# signals a user sends on purpose (Ctrl-C, kill, a closed pipe): the exit code says enough
_QUIET_SIGNALS = frozenset((1, 2, 13, 15))  # SIGHUP, SIGINT, SIGPIPE, SIGTERM


def timeout_message(timeout: float | None) -> str:
    t = "the time limit" if timeout is None else f"{timeout:g} s"
    return f"timed out after {t}: the sandbox and every process in it were killed"


def oom_message(memory_mb: int | None) -> str:
    limit = f"memory limit {memory_mb} MiB" if memory_mb else "no memory limit set"
    return f"the command was killed by the out-of-memory killer ({limit})"


def signal_message(sig: int) -> str:
    return f"the command was killed by signal {sig}"


def notes(outcome: Outcome, *, timeout: float | None, memory_mb: int | None) -> list[str]:
    """The lines a user should see for ``outcome`` (possibly none)."""
    out = []
    if outcome.note:
        out.append(outcome.note)
    if outcome.timed_out:
        out.append(timeout_message(timeout))
    elif outcome.oom:
        out.append(oom_message(memory_mb))
    elif outcome.signal and outcome.signal not in _QUIET_SIGNALS:
        out.append(signal_message(outcome.signal))
    return out


def exit_code(outcome: Outcome) -> int:
    """The CLI's exit code: 124 on timeout, else the command's (128+N for signal N)."""
    return EXIT_TIMEOUT if outcome.timed_out else outcome.exit_code


def render(outcome: Outcome, *, timeout: float | None, memory_mb: int | None) -> int:
    """Write the notes for ``outcome`` to stderr and return the exit code."""
    for line in notes(outcome, timeout=timeout, memory_mb=memory_mb):
        from .termio import note

        note(line)
    return exit_code(outcome)


def from_result(result: ExecResult) -> Outcome:
    return Outcome(result.exit_code, signal=result.signal, timed_out=result.timed_out, oom=result.oom_killed)
