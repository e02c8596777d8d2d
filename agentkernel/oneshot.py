"""The one-shot runner: one command in a fresh sandbox, on any backend, owned by this process.

One place owns the sequence for every backend: check the policy -> claim the sandbox in the ownership
journal under the name the backend gives it before it exists (``planned_handle``) -> run -> render the
outcome (exit code + notes, ``agentkernel.outcome``) -> release the claim -> audit. Backends that
implement ``OneShot`` run synchronously with the caller's stdio (no asyncio import: the CLI's cold
path); every other backend goes through its asyncio ``run``.

The claim is released once the backend has destroyed what it made (normally, or after an error it
reported as ``AgentKernelError``). On anything else the claim stays: this process is about to exit,
and the next agentkernel command reaps whatever is left.
"""

from __future__ import annotations

from . import audit, owner
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
    backend.check(spec)
    if not isinstance(backend, OneShot):
        return _run_async(backend, spec, argv, stdio, timeout)
    sid = sandbox_id or owner.new_id("run")
    me = owner.current_owner()
    with _Claim(backend, sid, me):
        outcome = backend.run_oneshot(spec, argv, stdio, timeout, sandbox_id=sid, owner=me)
    _audit(backend, spec, sid, argv, outcome.exit_code, outcome.timed_out, outcome.oom)
    return outcome


async def run_async(backend: Backend, spec: SandboxSpec, req: ExecRequest, own: dict[str, Any],
                    *, journal: bool = True, via: str | None = None) -> ExecResult:
    """The asyncio one-shot (manager, daemon, in-process API): the same claim -> run -> release ->
    audit around ``backend.run``. ``journal=False`` for backends whose runs live in this process only."""
    backend.check(spec)
    sid = owner.new_id("run")
    if journal:
        with _Claim(backend, sid, own):
            result = await backend.run(spec, req, sandbox_id=sid, owner=own)
    else:
        result = await backend.run(spec, req, sandbox_id=sid, owner=own)
    _audit(backend, spec, sid, req.argv, result.exit_code, result.timed_out, result.oom_killed, via=via)
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
    """The ownership-journal claim around one run (see the module docstring for when it is kept)."""

    __slots__ = ("backend", "owner", "sid")

    def __init__(self, backend: Backend, sid: str, own: dict[str, Any]) -> None:
        self.backend, self.sid, self.owner = backend, sid, own

    def __enter__(self) -> _Claim:
        owner.claim(self.backend.name, self.sid, self.backend.planned_handle(self.sid), self.owner)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or issubclass(exc_type, AgentKernelError):
            owner.release(self.backend.name, self.sid)


def _audit(backend: Backend, spec: SandboxSpec, sid: str, argv: list[str], exit_code: int, timed_out: bool,
           oom: bool, via: str | None = None) -> None:
    fields: dict[str, Any] = {"id": sid, "backend": backend.name, "image": spec.image, "argv": argv,
                              "exit_code": exit_code, "timed_out": timed_out, "oom_killed": oom}
    if via:
        fields["via"] = via
    audit.log("run", **fields)
