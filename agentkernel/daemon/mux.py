"""The daemon's multiplexed mode: one connection, many pipelined runs, answered by id as they complete.

A client switches a connection to it with ``REQUEST {"op": "mux"}``; from then on it sends ``MRUN`` frames
(any number, without waiting) and ``MCANCEL`` frames, and reads ``MRESULT``/``MERROR`` frames carrying the
id of the run they answer (protocol.py has the frame shapes). Each run is one task on the daemon's loop
going through ``Daemon.run`` (warm pool member, or the backend's in-process path for wasm); cancelling it
(``MCANCEL``, or the connection closing) kills the command and destroys its sandbox.

Runs the daemon can do right away (``Daemon.run_now``: a wasm command whose recent runs fit the loop's
budget) are done as their frames are read, without a task or a thread hop, in slices of ``TURN_S`` with
a loop turn between. Answers are coalesced: every frame finished in one loop turn goes out in one write,
and the socket is only drained when ``WRITE_HIGH_WATER`` bytes are queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..backends import canonical
from ..backends.base import ExecRequest, ExecResult
from ..errors import AgentKernelError, ValidationError
from ..spec import SandboxSpec
from . import protocol as P

log = logging.getLogger("agentkernel.daemon")

WRITE_HIGH_WATER = 1 << 20  # drain the socket when this much output is queued
TURN_S = 0.005  # runs done on the loop as their frames are read: at most this long before a loop turn


class MuxSession:
    def __init__(self, daemon: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 fr: P.FrameReader) -> None:
        self.daemon = daemon
        self.reader, self.writer, self.fr = reader, writer, fr
        self.specs: dict[int, SandboxSpec] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.open = True
        self._out: list[bytes] = []  # answers of this loop turn, written together by _flush
        self._loop = asyncio.get_running_loop()

    async def serve(self, early: list[tuple[int, bytes]] = ()) -> None:
        frames = list(early)  # frames the client pipelined behind its mux request
        perf = time.perf_counter
        try:
            while True:
                turn_end = perf() + TURN_S
                for t, payload in frames:
                    if t == P.MRUN:
                        if perf() > turn_end:
                            await asyncio.sleep(0)  # let the loop breathe (and our answers go out)
                            turn_end = perf() + TURN_S
                        self._start(P.decode(payload))
                    elif t == P.MCANCEL:
                        task = self.tasks.get(P.decode(payload).get("id"))
                        if task is not None:
                            task.cancel()
                    else:
                        raise AgentKernelError(f"protocol error: frame type {t} in multiplexed mode "
                                               "(only MRUN and MCANCEL)")
                if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    self._flush()
                    await self.writer.drain()
                data = await self.reader.read(1 << 18)
                if not data:
                    return
                frames = self.fr.feed(data)
        finally:
            self.open = False  # the client is gone (or broke the protocol): cancel what it still has going
            self._out.clear()
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _send(self, frame: bytes) -> None:
        if not self.open:
            return
        self._out.append(frame)
        if len(self._out) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self.open:
            self.writer.write(data)

    def _error(self, rid: Any, exc: AgentKernelError | str, kind: str | None = None) -> None:
        if isinstance(exc, AgentKernelError):
            obj = {"id": rid, "message": exc.message, "hint": exc.hint, "kind": kind or type(exc).__name__}
        else:
            obj = {"id": rid, "message": exc, "hint": None, "kind": kind or "AgentKernelError"}
        self._send(P.oframe(P.MERROR, obj))

    def _result(self, rid: int, result: ExecResult) -> None:
        self._send(P.oframe(P.MRESULT, {
            "id": rid, "exit_code": result.exit_code, "signal": result.signal, "timed_out": result.timed_out,
            "oom_killed": result.oom_killed, "stdout": bytes(result.stdout), "stderr": bytes(result.stderr),
            "truncated": result.truncated, "timings": result.timings}))

    def _start(self, req: dict) -> None:
        rid = req.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            self._error(rid, ValidationError("a multiplexed run needs an integer id"))
            return
        if rid in self.tasks:
            self._error(rid, ValidationError(f"run id {rid} is already in flight on this connection"))
            return
        try:
            spec = self._spec(req)
            argv = req.get("argv")
            if not isinstance(argv, list):
                raise ValidationError("argv must be a list of strings")
            stdin = req.get("stdin")
            if stdin is not None and not isinstance(stdin, bytes):
                raise ValidationError("stdin must be bytes")
            timeout = req.get("timeout")
            exec_req = ExecRequest(argv, stdin=stdin, timeout=float(timeout) if timeout else None,
                                   env=req.get("env") or None, cwd=req.get("cwd"))
        except AgentKernelError as exc:
            self._error(rid, exc)
            return
        try:
            result = self.daemon.run_now(spec, exec_req)
        except AgentKernelError as exc:
            self._error(rid, exc)
            return
        except Exception as exc:  # one bad run never takes the connection down
            log.exception("multiplexed run failed")
            self._error(rid, f"daemon error: {exc}")
            return
        if result is not None:
            self._result(rid, result)
            return
        self.tasks[rid] = self._loop.create_task(self._one(rid, spec, exec_req))

    def _spec(self, req: dict) -> SandboxSpec:
        sid = req.get("spec_id")
        if "spec" in req:
            spec = SandboxSpec.from_dict(req["spec"])
            spec = spec.replace(backend=canonical(spec.backend), name=None)
            if sid is not None:
                self.specs[sid] = spec
            return spec
        try:
            return self.specs[sid]
        except KeyError:
            raise ValidationError(f"unknown spec_id {sid!r} (send the spec with its first run)") from None

    async def _one(self, rid: int, spec: SandboxSpec, req: ExecRequest) -> None:
        try:
            result: ExecResult = await self.daemon.run(spec, req, via="daemon")
        except asyncio.CancelledError:
            self._error(rid, "run cancelled", kind="Cancelled")
            return
        except AgentKernelError as exc:
            self._error(rid, exc)
            return
        except Exception as exc:  # one bad run never takes the connection down
            log.exception("multiplexed run failed")
            self._error(rid, f"daemon error: {exc}")
            return
        finally:
            self.tasks.pop(rid, None)
        self._result(rid, result)
