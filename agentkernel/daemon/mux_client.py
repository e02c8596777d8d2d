"""The asyncio client of the daemon's multiplexed mode (daemon/mux.py): one persistent connection, any
number of concurrent ``run`` calls on it, pipelined (requests go out without waiting for answers; answers
come back by id in completion order).

    async with await MuxClient.connect() as c:
        results = await asyncio.gather(*(c.run(["echo", str(i)], spec) for i in range(1000)))

Cancelling a ``run`` call sends ``MCANCEL``: the daemon kills that command and destroys its sandbox.

``submit`` is the same without a coroutine per run: it queues the request and returns a future (for a
caller keeping a window of runs in flight with done callbacks). Requests queued in one loop turn go out
in one write; answers are read in bulk (256 KiB reads, every whole frame in them dispatched at once).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from .. import paths
from ..errors import AgentKernelError, DaemonUnavailable
from ..spec import SandboxSpec
from . import protocol as P


class MuxClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._spec_ids: dict[int, tuple[SandboxSpec, int]] = {}
        self._fr = P.FrameReader()
        self._reader_task: asyncio.Task | None = None
        self._closed_exc: BaseException | None = None
        self._out: list[bytes] = []  # requests of this loop turn, written together by _flush
        self._loop = asyncio.get_running_loop()
        self.daemon_pid: int | None = None

    @classmethod
    async def connect(cls, path: str | None = None) -> MuxClient:
        path = path or paths.daemon_socket()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise DaemonUnavailable(f"no daemon answers on {path}: {exc}", hint="agentkernel daemon start") from None
        c = cls(reader, writer)
        writer.write(P.oframe(P.REQUEST, {"v": P.PROTOCOL_VERSION, "op": "mux"}))
        frames: list = []
        while not frames:
            data = await reader.read(65536)
            if not data:
                raise DaemonUnavailable("the daemon closed the connection", hint="agentkernel daemon status")
            frames = c._fr.feed(data)
        t, payload = frames[0]
        if t != P.REPLY:
            obj = P.decode(payload)
            writer.close()
            raise AgentKernelError(obj.get("message", "daemon refused multiplexed mode"), hint=obj.get("hint"))
        c.daemon_pid = P.decode(payload).get("pid")
        c._reader_task = asyncio.get_running_loop().create_task(c._read_loop())
        for t, payload in frames[1:]:
            c._dispatch(t, payload)
        return c

    async def __aenter__(self) -> MuxClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, argv: list[str], spec: SandboxSpec, *, timeout: float | None = None,
               stdin: bytes | None = None, env: dict[str, str] | None = None,
               cwd: str | None = None) -> asyncio.Future:
        """Queue one run (sent with the others of this loop turn); the future gets what ``run`` returns,
        or its error. Cancelling the future does not cancel the run: use ``cancel(future)``."""
        if self._closed_exc is not None:
            raise DaemonUnavailable(f"the multiplexed connection is closed: {self._closed_exc}")
        rid = next(self._ids)
        req: dict[str, Any] = {"id": rid, "argv": argv, "timeout": timeout, "stdin": stdin, "env": env, "cwd": cwd}
        known = self._spec_ids.get(id(spec))
        if known is not None and known[0] is spec:
            req["spec_id"] = known[1]
        else:
            sid = len(self._spec_ids) + 1
            self._spec_ids[id(spec)] = (spec, sid)
            req["spec_id"], req["spec"] = sid, spec.to_dict()
        fut = self._loop.create_future()
        fut.rid = rid  # type: ignore[attr-defined]
        self._pending[rid] = fut
        self._send(P.oframe(P.MRUN, req))
        return fut

    def cancel(self, fut: asyncio.Future) -> None:
        """Cancel a submitted run: the daemon kills its command and destroys its sandbox."""
        rid = getattr(fut, "rid", None)
        if self._pending.pop(rid, None) is not None and self._closed_exc is None:
            self._send(P.oframe(P.MCANCEL, {"id": rid}))
        fut.cancel()

    async def run(self, argv: list[str], spec: SandboxSpec, *, timeout: float | None = None,
                  stdin: bytes | None = None, env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
        """One command in a fresh sandbox for ``spec``: a dict with exit_code, signal, timed_out, oom_killed,
        stdout, stderr (bytes), truncated, timings. Raises the daemon's error for that run."""
        fut = self.submit(list(argv), spec, timeout=timeout, stdin=stdin, env=env, cwd=cwd)
        if self._writer.transport.get_write_buffer_size() > (1 << 20):
            self._flush()
            await self._writer.drain()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():
                self.cancel(fut)
            raise

    def _send(self, frame: bytes) -> None:
        self._out.append(frame)
        if len(self._out) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self._closed_exc is None:
            self._writer.write(data)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            self._reader_task = None
        self._fail(ConnectionError("closed"))
        try:
            self._writer.close()
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    # -- internals --
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(1 << 18)
                if not data:
                    raise ConnectionError("the daemon closed the connection")
                for t, payload in self._fr.feed(data):
                    self._dispatch(t, payload)
        except (ConnectionError, OSError, ValueError) as exc:
            self._fail(exc)

    def _dispatch(self, t: int, payload: bytes) -> None:
        obj = P.decode(payload)
        fut = self._pending.pop(obj.get("id"), None)
        if fut is None or fut.done():
            return  # an answer to a run we cancelled
        if t == P.MRESULT:
            fut.set_result(obj)
            return
        elif t == P.MERROR:
            from .. import errors

            cls = getattr(errors, obj.get("kind") or "", None)
            if obj.get("kind") == "Cancelled":
                fut.cancel()
                return
            if not (isinstance(cls, type) and issubclass(cls, AgentKernelError)):
                cls = AgentKernelError
            fut.set_exception(cls(obj.get("message", "daemon error"), hint=obj.get("hint")))

    def _fail(self, exc: BaseException) -> None:
        self._closed_exc = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(DaemonUnavailable(f"the daemon connection failed: {exc}"))
