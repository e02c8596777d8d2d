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

import os

from . import audit, deathwatch, owner
from .backends.base import OneShot
from .errors import AgentKernelError
from .vm import prelaunch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .backends.base import Backend, ExecRequest, ExecResult, Outcome, Stdio
    from .spec import SandboxSpec


def run(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None,
        files: list[dict[str, Any]] | None = None) -> int:
    """Run ``argv`` once with ``stdio``; returns the CLI's exit code (notes already written).
    ``files``: ``[{source, dest, mode}]`` (agentkernel.toml's ``[[files]]``) copied in before the command runs:
    the asyncio way on every backend (create+start, copy, the command, remove)."""
    from .outcome import render

    if files:
        outcome = _run_async(backend, spec, argv, stdio, timeout, files)
    else:
        outcome = run_outcome(backend, spec, argv, stdio, timeout)
    return render(outcome, timeout=timeout, memory_mb=spec.resources.memory_mb)


def run_outcome(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None,
                *, sandbox_id: str | None = None, own: dict[str, Any] | None = None, cli: bool = True,
                via: str | None = None) -> Outcome:
    """``run`` without rendering: the ``Outcome`` (for callers that render it themselves).
    ``sandbox_id``: a chosen id (tests watch its resources), else a fresh one. ``cli=False``: the caller is
    a long-lived process running this on a worker thread (``run_async``): no death watcher is forked
    (the claim is always released; a killed process's sandbox is reaped from the journal)."""
    if not isinstance(backend, OneShot):
        return _run_async(backend, spec, argv, stdio, timeout)
    backend.check(spec)
    # a VM the CLI started before it had resolved the spec (vm.prelaunch) is claimed and watched under its id
    # already; the backend takes it only if it is exactly the sandbox this run would start
    sid = sandbox_id or (prelaunch.pending_id(backend.name) if cli else None) or owner.new_id("run")
    me = own or owner.current_owner()
    with _Claim(backend, sid, me, keep_on_error=cli, sole=sandbox_id is None):
        outcome = backend.run_oneshot(spec, argv, stdio, timeout, sandbox_id=sid, owner=me)
    _audit(backend, spec, sid, argv, outcome.exit_code, outcome.timed_out, outcome.oom, via=via)
    return outcome


async def run_async(backend: Backend, spec: SandboxSpec, req: ExecRequest, own: dict[str, Any],
                    *, journal: bool = True, via: str | None = None, start_gate: Any = None,
                    phased: bool = False, files: list[dict[str, Any]] | None = None) -> ExecResult:
    """The asyncio one-shot (manager, daemon, in-process API): the same claim -> run -> release ->
    audit around ``backend.run``. ``journal=False`` for backends whose runs live in this process only.
    ``start_gate`` (a semaphore: the daemon's start limiter) bounds the sandbox's create+start, not its
    command. ``phased``: never the one-shot path (the result carries each step's timing). ``files`` are
    copied in between start and the command."""
    if not files and start_gate is None and journal and not phased and _fits_oneshot(backend, req):
        return await _run_oneshot_threaded(backend, spec, req, own, via)  # run_outcome checks the spec
    backend.check(spec)
    sid = owner.new_id("run")
    if files:
        work = _run_with_files(backend, spec, req, sid, own, files)
    elif start_gate is None or backend.in_process:
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
    """``Backend.run`` with its create + start inside ``gate`` (``run_timed`` owns the sequence and timings)."""
    return (await backend.run_timed(spec, req, sandbox_id=sid, owner=who, start_gate=gate))[1]


async def _run_with_files(backend: Backend, spec: SandboxSpec, req: ExecRequest, sid: str, who: dict[str, Any],
                          files: list[dict[str, Any]]) -> ExecResult:
    """create+start -> copy ``files`` in -> the command -> remove (also when any of it fails)."""
    from .refinject import copy_files_ref

    ref = await backend.create_started(spec, sandbox_id=sid, owner=who)
    try:
        await copy_files_ref(backend, ref, files)
        return await backend.exec(ref, req)
    finally:
        await backend.remove(ref)


def _fits_oneshot(backend: Backend, req: ExecRequest) -> bool:
    """In-process runs take the CLI's one-shot path (one engine call instead of create/start/exec/remove)
    whenever the request is one it can express: no tty, no other user."""
    return (isinstance(backend, OneShot) and not backend.in_process and backend.oneshot_in_process and not req.tty
            and req.user is None)


async def _run_oneshot_threaded(backend: Backend, spec: SandboxSpec, req: ExecRequest, own: dict[str, Any],
                                via: str | None) -> ExecResult:
    """``run_outcome`` (the CLI's path) on a worker thread, its output read from pipes on this loop.
    The request's env and cwd become the sandbox's. Cancelling this destroys the sandbox (from its planned
    handle, again until the worker has returned: a runtime that was still starting is caught too)."""
    import asyncio
    import time

    from .backends.base import ExecResult, OutputCollector, SandboxRef
    from .termio import Stdio

    if req.env or req.cwd:
        spec = spec.replace(env={**spec.env, **req.env}, workdir=req.cwd or spec.workdir)
    loop = asyncio.get_running_loop()
    sid = owner.new_id("run")
    collect = OutputCollector(req.output_limit) if req.on_output is None else None
    sink = req.on_output or collect
    fds: list[int] = []  # ours to close
    readers: list[asyncio.Future] = []
    feeder = None
    t0 = time.perf_counter()
    try:
        out_w = {}
        for fd in (1, 2):
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(w, True)
            fds += [r, w]
            out_w[fd] = w
            readers.append(_read_into(loop, r, fd, sink))
        stdin_r = -1
        if req.stdin is not None:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(stdin_w, False)  # our end only (the command's end is another open file)
            fds += [stdin_r]
            feeder = asyncio.ensure_future(_feed(loop, stdin_w, req.stdin))
        stdio = Stdio(stdin_r, out_w[1], out_w[2], forward_stdin=req.stdin is not None)
        work = _in_thread(loop, lambda: run_outcome(backend, spec, req.argv, stdio, req.timeout, sandbox_id=sid,
                                                    own=own, cli=False, via=via))
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            ref = SandboxRef(backend.name, sid, backend.planned_handle(sid), spec)
            while not work.done():
                try:
                    await backend.remove(ref)
                except Exception:  # the worker's own clean-up still runs
                    pass
                await asyncio.wait([work], timeout=1.0)
            await asyncio.gather(work, return_exceptions=True)  # its error (killed while starting) is moot
            raise
        for w in out_w.values():  # the sandbox is gone: the readers see EOF once our ends are closed
            fds.remove(w)
            os.close(w)
        await asyncio.gather(*readers)
    finally:
        for f in readers:
            f.cancel()
        for fd in fds:  # stdin's read end too: a feeder still writing gets EPIPE and ends
            _close_reader(loop, fd)
        if feeder is not None:
            await asyncio.gather(feeder, return_exceptions=True)
    result = ExecResult(outcome.exit_code, signal=outcome.signal, timed_out=outcome.timed_out,
                        oom_killed=outcome.oom, timings={"total_ms": (time.perf_counter() - t0) * 1e3})
    if collect is not None:
        result.stdout, result.stderr = bytes(collect.buf[1]), bytes(collect.buf[2])
        result.truncated = collect.truncated
    return result


def _read_into(loop: Any, r: int, fd: int, sink: Any) -> Any:
    """A future done at EOF of pipe ``r``; every chunk read goes to ``sink(fd, data)`` on the loop."""
    done = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(r, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            sink(fd, data)
            return
        loop.remove_reader(r)
        if not done.done():
            done.set_result(None)

    loop.add_reader(r, readable)
    return done


def _close_reader(loop: Any, fd: int) -> None:
    loop.remove_reader(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def _in_thread(loop: Any, fn: Any) -> Any:
    """A future of ``fn()`` run on a thread of its own (not the loop's executor: a one-shot may run for
    hours, and the executor's few workers would cap how many run at once)."""
    import threading

    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def work() -> None:
        try:
            value, ok = fn(), True
        except BaseException as exc:  # handed to the awaiting task
            value, ok = exc, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=work, name="agentkernel-oneshot", daemon=True).start()
    return fut


async def _feed(loop: Any, w: int, stdin: Any) -> None:
    """Write the request's stdin (bytes or an async iterator of bytes) into the non-blocking pipe ``w``
    on the loop, then close it (EOF for the command)."""
    try:
        if isinstance(stdin, (bytes, bytearray)):
            await _write(loop, w, bytes(stdin))
        else:
            async for chunk in stdin:
                await _write(loop, w, chunk)
    except OSError:
        pass  # the command closed its stdin (EPIPE), or the run is over
    finally:
        os.close(w)


def _settle(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


async def _write(loop: Any, w: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(w, view):]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(w, _settle, ready)
            try:
                await ready
            finally:
                loop.remove_writer(w)


def _run_async(backend: Backend, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None,
               files: list[dict[str, Any]] | None = None) -> Outcome:
    import asyncio

    from .backends.base import ExecRequest
    from .outcome import from_result
    from .termio import stdin_chunks, write_all

    fds = {1: stdio.stdout, 2: stdio.stderr}

    async def go() -> ExecResult:
        req = ExecRequest(argv, stdin=stdin_chunks(stdio.stdin) if stdio.forward_stdin else None, timeout=timeout,
                          on_output=lambda fd, data: write_all(fds[fd], data))
        try:
            return await run_async(backend, spec, req, owner.current_owner(), journal=not backend.in_process,
                                   files=files)
        finally:
            await backend.aclose()

    return from_result(asyncio.run(go()))


class _Claim:
    """The ownership-journal claim around one run (see the module docstring for when it is kept).
    ``keep_on_error=False`` (asyncio runs: the backend's ``run`` removes what it made in ``finally``,
    also when cancelled, and this process lives on): always released."""

    __slots__ = ("backend", "keep_on_error", "owner", "sid", "sole")

    def __init__(self, backend: Backend, sid: str, own: dict[str, Any], *, keep_on_error: bool = True,
                 sole: bool = False) -> None:
        self.backend, self.sid, self.owner, self.keep_on_error = backend, sid, own, keep_on_error
        self.sole = sole  # a fresh id of this process's own: no other entry to look for (owner.claim)

    def __enter__(self) -> _Claim:
        owner.claim(self.backend.name, self.sid, self.backend.planned_handle(self.sid), self.owner, sole=self.sole)
        if self.keep_on_error:  # this process is the CLI: a SIGKILL must not leave the sandbox running
            deathwatch.arm(self.backend.name, self.sid)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or not self.keep_on_error or issubclass(exc_type, AgentKernelError):
            owner.release(self.backend.name, self.sid, (self.owner,))
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
