"""The one-shot runner: one command in a fresh sandbox, on any backend, owned by this process.

One place owns the sequence for every backend: check the policy -> claim the sandbox in the ownership
journal under the name the backend gives it before it exists (``planned_handle``) -> run -> render the
outcome (exit code + notes, ``agentkernel.outcome``) -> release the claim -> audit. Backends that
implement ``OneShot`` run synchronously with the caller's stdio (no asyncio import: the CLI's cold
path); every other backend goes through its asyncio ``run``.

The claim is released once the backend has destroyed what it made (normally, or after an error it
reported as ``AgentKernelError``). On anything else the claim stays: this process is about to exit,
and the next agentkernel command reaps whatever is left. The synchronous (CLI) path also arms a
``deathwatch``: if this process is SIGKILLed, a watcher removes the sandbox at once.
"""

from __future__ import annotations

from . import audit, deathwatch, owner
from .backends.base import OneShot
from .errors import AgentKernelError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .backends.base import Backend, ExecRequest, ExecResult, Outcome, Stdio
    from .spec import SandboxSpec


def run(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None) -> int:
    """Run ``argv`` once with ``stdio``; returns the CLI's exit code (notes already written)."""
    from .outcome import render

    outcome = run_outcome(backend, spec, argv, stdio, timeout)
    return render(outcome, timeout=timeout, memory_mb=spec.resources.memory_mb)


def run_outcome(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None,
                *, sandbox_id: str | None = None) -> Outcome:
    """``run`` without rendering: the ``Outcome`` (for callers that render it themselves).
    ``sandbox_id``: a chosen id (tests watch its resources), else a fresh one."""
    if not isinstance(backend, OneShot):
        return _run_async(backend, spec, argv, stdio, timeout)
    backend.check(spec)
    sid = sandbox_id or owner.new_id("run")
    me = owner.current_owner()
    with _Claim(backend, sid, me):
        outcome = backend.run_oneshot(spec, argv, stdio, timeout, sandbox_id=sid, owner=me)
    _audit(backend, spec, sid, argv, outcome.exit_code, outcome.timed_out, outcome.oom)
    return outcome


async def run_async(backend: Backend, spec: SandboxSpec, req: ExecRequest, own: dict[str, Any],
                    *, journal: bool = True, via: str | None = None, start_gate: Any = None) -> ExecResult:
    """The asyncio one-shot (manager, daemon, in-process API): the same claim -> run -> release ->
    audit around ``backend.run``. ``journal=False`` for backends whose runs live in this process only.
    ``start_gate`` (a semaphore: the daemon's start limiter) bounds the sandbox's create+start, not its
    command."""
    backend.check(spec)
    sid = owner.new_id("run")
    if start_gate is None or backend.in_process:
        work = backend.run(spec, req, sandbox_id=sid, owner=own)
    else:
        work = _gated_run(backend, spec, req, sid, own, start_gate)
    if journal:
        with _Claim(backend, sid, own, keep_on_error=False):
            result = await work
    else:
        result = await work
    _audit(backend, spec, sid, req.argv, result.exit_code, result.timed_out, result.oom_killed, via=via)
    return result


async def _gated_run(backend: Backend, spec: SandboxSpec, req: ExecRequest, sid: str, who: dict[str, Any],
                     gate: Any) -> ExecResult:
    """``Backend.run`` with its ``create_started`` (create + start, one engine call where the engine has
    one) inside ``gate``; ``create_ms`` in the timings covers both, ``start_wait_ms`` the wait for the gate."""
    import time

    t0 = time.perf_counter()
    async with gate:
        t_gate = time.perf_counter()
        ref = await backend.create_started(spec, sandbox_id=sid, owner=who)
    t_started = time.perf_counter()
    try:
        result = await backend.exec(ref, req)
    finally:
        t_exec = time.perf_counter()
        await backend.remove(ref)
    t_end = time.perf_counter()
    result.timings.update({"start_wait_ms": (t_gate - t0) * 1e3, "create_ms": (t_started - t_gate) * 1e3,
                           "exec_ms": (t_exec - t_started) * 1e3, "remove_ms": (t_end - t_exec) * 1e3,
                           "total_ms": (t_end - t0) * 1e3})
    return result


def _run_async(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None) -> Outcome:
    import asyncio

    from .backends.base import ExecRequest
    from .outcome import from_result
    from .termio import stdin_chunks, write_all

    fds = {1: stdio.stdout, 2: stdio.stderr}

    async def go() -> ExecResult:
        req = ExecRequest(argv, stdin=stdin_chunks(stdio.stdin) if stdio.forward_stdin else None, timeout=timeout,
                          on_output=lambda fd, data: write_all(fds[fd], data))
        try:
            return await run_async(backend, spec, req, owner.current_owner(), journal=not backend.in_process)
        finally:
            await backend.aclose()

    return from_result(asyncio.run(go()))


class _Claim:
    """The ownership-journal claim around one run (see the module docstring for when it is kept).
    ``keep_on_error=False`` (asyncio runs: the backend's ``run`` removes what it made in ``finally``,
    also when cancelled, and this process lives on): always released."""

    __slots__ = ("backend", "keep_on_error", "owner", "sid")

    def __init__(self, backend: Backend, sid: str, own: dict[str, Any], *, keep_on_error: bool = True) -> None:
        self.backend, self.sid, self.owner, self.keep_on_error = backend, sid, own, keep_on_error

    def __enter__(self) -> _Claim:
        owner.claim(self.backend.name, self.sid, self.backend.planned_handle(self.sid), self.owner)
        if self.keep_on_error:  # this process is the CLI: a SIGKILL must not leave the sandbox running
            deathwatch.arm(self.backend.name, self.sid)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or not self.keep_on_error or issubclass(exc_type, AgentKernelError):
            owner.release(self.backend.name, self.sid)
            if self.keep_on_error:
                deathwatch.disarm(self.backend.name, self.sid)
        # else: the claim stays, and the armed watcher removes the sandbox as soon as this process exits


def _audit(backend: Backend, spec: SandboxSpec, sid: str, argv: list[str], exit_code: int, timed_out: bool,
           oom: bool, via: str | None = None) -> None:
    fields: dict[str, Any] = {"id": sid, "backend": backend.name, "image": spec.image, "argv": argv,
                              "exit_code": exit_code, "timed_out": timed_out, "oom_killed": oom}
    if via:
        fields["via"] = via
    audit.log("run", **fields)
