"""asyncio client for the in-sandbox agent (protocol: docs/agent-protocol.md).

    client = await AgentClient.connect(UnixSocketTransport("/run/ak/agent.sock"))
    r = await client.exec(["sh", "-c", "echo hi; exit 3"], env={"PATH": "/bin"}, timeout=10)
    r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out, r.oom, r.error, r.duration
    await client.put_file("/tmp/x", b"data", mode=0o600, make_parents=True)
    async for chunk in client.get_file("/tmp/x"): ...
    await client.close()

Many operations run concurrently on one connection (each is a stream). If the connection is lost,
every pending and future operation raises ``AgentConnectionLost``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

from . import protocol as P
from .protocol import AgentConnectionLost, AgentError, AgentExecResult, AgentProtocolError
from .transport import Transport, UnixSocketTransport

__all__ = ["AgentClient", "AgentConnectionLost", "AgentError", "AgentExecResult", "ExecProcess"]


class _Chunks:
    """A bounded async queue with byte accounting: ``put`` waits while more than ``limit`` bytes are
    queued, which stops the connection's reader and so pushes back on the agent."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque = collections.deque()
        self._size = 0
        self._limit = limit
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._closed = False
        self._exc: BaseException | None = None

    async def put(self, item, size: int) -> None:
        while self._size >= self._limit and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return
        self._items.append((item, size))
        self._size += size
        self._readable.set()

    def finish(self, exc: BaseException | None = None) -> None:
        self._eof = True
        self._exc = exc
        self._readable.set()

    def close(self) -> None:
        """The consumer went away: drop everything and never block the producer again."""
        self._closed = True
        self._items.clear()
        self._size = 0
        self._writable.set()

    async def get(self):
        while not self._items:
            if self._eof:
                if self._exc is not None:
                    raise self._exc
                return None
            self._readable.clear()
            await self._readable.wait()
        item, size = self._items.popleft()
        self._size -= size
        if self._size < self._limit:
            self._writable.set()
        return item


class _Request:
    """A request answered by one terminal frame (PONG, INFO, OK, STAT, or ERROR)."""

    def __init__(self, terminal: tuple[int, ...]) -> None:
        self.fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.terminal = terminal

    async def feed(self, ftype: int, payload: bytes) -> bool:
        if self.fut.done():
            return True
        if ftype == P.R_ERROR:
            self.fut.set_exception(P.decode_error(payload))
            return True
        if ftype in self.terminal:
            self.fut.set_result((ftype, payload))
            return True
        return False

    def fail(self, exc: BaseException) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)
            self.fut.exception()  # mark retrieved: nobody may be awaiting it any more


class _Download:
    def __init__(self, limit: int) -> None:
        self.q = _Chunks(limit)
        self.stat: P.StatResult | None = None
        self.done = False

    async def feed(self, ftype: int, payload: bytes) -> bool:
        if ftype == P.R_DATA:
            await self.q.put(payload, len(payload))
            return False
        if ftype == P.R_STAT:
            self.stat = P.decode_stat(payload)
            return False
        self.done = True
        if ftype == P.R_OK:
            self.q.finish()
        elif ftype == P.R_ERROR:
            self.q.finish(P.decode_error(payload))
        else:
            self.q.finish(AgentProtocolError(f"unexpected frame 0x{ftype:02x} in a file download"))
        return True

    def fail(self, exc: BaseException) -> None:
        self.done = True
        self.q.finish(exc)


class ExecProcess:
    """A command started with ``AgentClient.start``. Output goes to ``on_output(fd, data)`` (sync or
    async callable), or is captured (``capture=True``), or is read with ``async for fd, data in proc``."""

    def __init__(self, client: AgentClient, stream: int, on_output, capture: bool, queue_limit: int,
                 tty: bool) -> None:
        loop = asyncio.get_running_loop()
        self.client = client
        self.stream = stream
        self.tty = tty
        self.pid: int | None = None
        self._started: asyncio.Future = loop.create_future()
        self._exit: asyncio.Future = loop.create_future()
        self._on_output = on_output
        self._capture = capture
        self._out: list[list[bytes]] = [[], [], []]
        self._queue = _Chunks(queue_limit) if (on_output is None and not capture) else None

    # -- events from the reader task
    async def feed(self, ftype: int, payload: bytes) -> bool:
        if ftype == P.R_STDOUT or ftype == P.R_STDERR:
            fd = P.STDOUT if ftype == P.R_STDOUT else P.STDERR
            if self._on_output is not None:
                r = self._on_output(fd, payload)
                if hasattr(r, "__await__"):
                    await r
            elif self._capture:
                self._out[fd].append(payload)
            else:
                await self._queue.put((fd, payload), len(payload))
            return False
        if ftype == P.R_STARTED:
            self.pid = P.decode_u32(payload)
            if not self._started.done():
                self._started.set_result(self.pid)
            return False
        if ftype == P.R_EXIT:
            res = P.decode_exit(payload, cls=AgentExecResult, stdout=b"".join(self._out[1]),
                                stderr=b"".join(self._out[2]), pid=self.pid or 0)
            self._out = [[], [], []]
            if not self._started.done():
                self._started.set_result(self.pid)
            self._exit.set_result(res)
            if self._queue is not None:
                self._queue.finish()
            return True
        if ftype == P.R_ERROR:
            self.fail(P.decode_error(payload))
            return True
        return False

    def fail(self, exc: BaseException) -> None:
        for f in (self._started, self._exit):
            if not f.done():
                f.set_exception(exc)
                f.exception()
        if self._queue is not None:
            self._queue.finish(exc)

    # -- user API
    @property
    def done(self) -> bool:
        return self._exit.done()

    async def started(self) -> int | None:
        """Wait for the STARTED event; returns the pid (inside the sandbox's pid namespace)."""
        return await self._started

    async def wait(self) -> AgentExecResult:
        return await asyncio.shield(self._exit)

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        if self._queue is None:
            raise RuntimeError("output is delivered to on_output / captured; nothing to iterate")
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        for i in range(0, len(mv), P.PUT_CHUNK):
            if self._exit.done():
                return
            await self.client._send_drain(P.STDIN, self.stream, bytes(mv[i:i + P.PUT_CHUNK]))

    async def close_stdin(self) -> None:
        if not self._exit.done():
            self.client._send(P.STDIN_EOF, self.stream)

    async def signal(self, sig: int) -> None:
        """Send signal ``sig`` to the command's whole process group."""
        if not self._exit.done():
            self.client._send(P.SIGNAL, self.stream, P.encode_u32(int(sig)))

    async def resize(self, rows: int, cols: int) -> None:
        if not self._exit.done():
            self.client._send(P.RESIZE, self.stream, P.encode_resize(rows, cols))

    async def kill(self) -> None:
        """SIGKILL the whole process group (CANCEL); the EXIT event still arrives."""
        if not self._exit.done():
            self.client._send(P.CANCEL, self.stream)

    async def feed_stdin(self, stdin) -> None:
        """Send bytes / an (async) iterable of bytes as stdin, then EOF."""
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            await self.write(stdin)
        elif hasattr(stdin, "__aiter__"):
            async for chunk in stdin:
                if self._exit.done():
                    return
                await self.write(chunk)
        else:
            for chunk in stdin:
                if self._exit.done():
                    return
                await self.write(chunk)
        await self.close_stdin()


class AgentClient:
    """One connection to an agent. Create with ``await AgentClient.connect(transport_or_socket_path)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 transport: Transport | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self.transport = transport
        self._streams: dict[int, object] = {}
        self._next_stream = 1
        self._lost: BaseException | None = None
        self._decoder = P.FrameDecoder()
        self._task: asyncio.Task | None = None
        self.protocol_version = 0
        self.max_payload = P.MAX_PAYLOAD
        self.agent_version = ""

    # -- connection
    @classmethod
    async def connect(cls, transport: Transport | str | os.PathLike, *, timeout: float = 10.0) -> AgentClient:
        if not isinstance(transport, Transport):
            transport = UnixSocketTransport(os.fspath(transport))
        reader, writer = await transport.connect()
        self = cls(reader, writer, transport)
        try:
            await asyncio.wait_for(self._hello(), timeout)
        except BaseException:
            writer.close()
            await transport.aclose()
            raise
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def _hello(self) -> None:
        self._writer.write(P.encode_hello())
        frames: list = []
        while not frames:
            data = await self._reader.read(65536)
            if not data:
                raise AgentConnectionLost("the agent closed the connection during the HELLO exchange")
            frames = self._decoder.feed(data)
        ftype, stream, payload = frames[0]
        if ftype == P.R_ERROR:
            raise P.decode_error(payload)
        if ftype != P.R_HELLO or stream != 0:
            raise AgentProtocolError(f"expected HELLO from the agent, got frame type 0x{ftype:02x}")
        self.protocol_version, self.max_payload, self.agent_version = P.decode_hello(payload)
        self._pending_frames = frames[1:]

    async def _read_loop(self) -> None:
        exc: BaseException = AgentConnectionLost("the agent closed the connection")
        try:
            frames = self._pending_frames
            while True:
                for ftype, stream, payload in frames:
                    if stream == 0:
                        if ftype == P.R_ERROR:
                            err = P.decode_error(payload)
                            exc = AgentConnectionLost(f"the agent closed the connection: {err.strerror}")
                            return
                        continue
                    h = self._streams.get(stream)
                    if h is not None and await h.feed(ftype, payload):
                        self._streams.pop(stream, None)
                data = await self._reader.read(1 << 18)
                if not data:
                    return
                frames = self._decoder.feed(data)
        except asyncio.CancelledError:
            exc = AgentConnectionLost("the client closed the connection")
        except AgentProtocolError as e:
            exc = AgentConnectionLost(f"protocol error from the agent: {e}")
        except OSError as e:
            exc = AgentConnectionLost(f"connection to the agent lost: {e}")
        finally:
            self._lost = exc
            streams, self._streams = self._streams, {}
            for h in streams.values():
                h.fail(exc)
            try:
                self._writer.close()
            except Exception:
                pass

    @property
    def closed(self) -> bool:
        return self._lost is not None

    def add_lost_callback(self, fn) -> None:
        """Call ``fn(self)`` once the connection is gone (lost or closed); soon if it already is."""
        if self._task is None or self._task.done():
            asyncio.get_running_loop().call_soon(fn, self)
        else:
            self._task.add_done_callback(lambda _t: fn(self))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
        try:
            self._writer.close()
            # a peer that stopped reading could keep unsent bytes (and the close) pending forever
            await asyncio.wait_for(self._writer.wait_closed(), 2)
        except Exception:
            try:
                self._writer.transport.abort()
            except Exception:
                pass
        if self.transport is not None:
            await self.transport.aclose()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- plumbing
    def _new_stream(self) -> int:
        sid = self._next_stream
        self._next_stream = sid + 1 if sid < 0xFFFFFFFF else 1
        return sid

    def _send(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        if self._lost is not None:
            raise AgentConnectionLost(str(self._lost))
        self._writer.write(P.encode_frame(ftype, stream, payload))

    async def _send_drain(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        self._send(ftype, stream, payload)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise AgentConnectionLost(f"connection to the agent lost: {e}") from None

    def _register(self, sid: int, handler) -> None:
        if self._lost is not None:
            raise AgentConnectionLost(str(self._lost))
        self._streams[sid] = handler

    async def _request(self, ftype: int, payload: bytes, terminal: tuple[int, ...]):
        sid = self._new_stream()
        req = _Request(terminal)
        self._register(sid, req)
        self._send(ftype, sid, payload)
        return await req.fut

    # -- simple requests
    async def ping(self, payload: bytes = b"") -> float:
        """Round trip time in seconds."""
        t = time.perf_counter()
        _, reply = await self._request(P.PING, payload, (P.R_PONG,))
        if reply != payload:
            raise AgentProtocolError("PONG payload differs from PING")
        return time.perf_counter() - t

    async def info(self) -> P.AgentInfo:
        _, payload = await self._request(P.INFO, b"", (P.R_INFO,))
        return P.decode_info(payload)

    async def stat(self, path, *, follow_symlinks: bool = True) -> P.StatResult:
        """Never raises for a missing path: the result's ``exists`` is False."""
        flags = 0 if follow_symlinks else P.S_NOFOLLOW
        _, payload = await self._request(P.STAT, P.encode_path_req(flags, path), (P.R_STAT,))
        return P.decode_stat(payload)

    async def reseed(self, entropy: bytes, *, time_ns: int = 0) -> int:
        """Mix ``entropy`` into the guest's RNG (credited when the agent may) and set its clock to
        ``time_ns`` (0: unchanged). Returns the number of bytes credited. For restored VM snapshots."""
        _, payload = await self._request(P.RESEED, P.encode_reseed(entropy, time_ns), (P.R_OK,))
        return int.from_bytes(payload[:8], "big")

    async def mkdir(self, path, mode: int = 0o755, *, parents: bool = True) -> None:
        await self._request(P.MKDIR, P.encode_path_req(P.M_PARENTS if parents else 0, path, mode), (P.R_OK,))

    async def remove(self, path, *, recursive: bool = False, missing_ok: bool = False) -> None:
        flags = (P.RM_RECURSIVE if recursive else 0) | (P.RM_MISSING_OK if missing_ok else 0)
        await self._request(P.REMOVE, P.encode_path_req(flags, path), (P.R_OK,))

    # -- exec
    async def start(self, argv, *, env=None, cwd=None, timeout: float | None = None, tty: bool = False,
                    tty_size: tuple[int, int] | None = None, stdin_closed: bool = False,
                    uid: int | None = None, gid: int | None = None, output_limit: int = 0,
                    kill_group_on_exit: bool = False, on_output=None, capture: bool = False,
                    queue_limit: int = 1 << 20, restrict: bool = False,
                    seccomp_bpf: bytes | None = None) -> ExecProcess:
        """Start a command and return at once (the STARTED event is ``await proc.started()``)."""
        payload = P.encode_exec(argv, env, cwd, timeout, tty=tty, tty_size=tty_size,
                                stdin_closed=stdin_closed, uid=uid, gid=gid, output_limit=output_limit,
                                kill_group_on_exit=kill_group_on_exit, restrict=restrict,
                                seccomp_bpf=seccomp_bpf)
        sid = self._new_stream()
        proc = ExecProcess(self, sid, on_output, capture, queue_limit, tty)
        self._register(sid, proc)
        self._send(P.EXEC, sid, payload)
        return proc

    async def exec(self, argv, *, env=None, cwd=None, stdin=None, timeout: float | None = None,
                   tty: bool = False, tty_size: tuple[int, int] | None = None, on_output=None,
                   uid: int | None = None, gid: int | None = None, output_limit: int = 0,
                   kill_group_on_exit: bool = False, restrict: bool = False,
                   seccomp_bpf: bytes | None = None, on_start=None) -> AgentExecResult:
        """Run a command to completion. ``env`` is the complete environment (nothing is inherited).
        stdin: None (closed at once), bytes, or an (async) iterable of bytes. Output is captured in
        the result unless ``on_output(fd, data)`` is given. ``on_start(pid)`` is called once it runs.
        Cancelling this coroutine kills the command."""
        proc = await self.start(argv, env=env, cwd=cwd, timeout=timeout, tty=tty, tty_size=tty_size,
                                stdin_closed=stdin is None, uid=uid, gid=gid, output_limit=output_limit,
                                kill_group_on_exit=kill_group_on_exit, on_output=on_output,
                                capture=on_output is None, restrict=restrict, seccomp_bpf=seccomp_bpf)
        feeder = None
        if stdin is not None:
            feeder = asyncio.get_running_loop().create_task(proc.feed_stdin(stdin))
        try:
            if on_start is not None:
                pid = await proc.started()
                if pid:
                    on_start(pid)
            return await proc.wait()
        except asyncio.CancelledError:
            if not proc.done and not self.closed:
                try:
                    self._send(P.CANCEL, proc.stream)
                except AgentConnectionLost:
                    pass
            raise
        finally:
            if feeder is not None:
                if not feeder.done():
                    feeder.cancel()
                try:
                    await feeder
                except (asyncio.CancelledError, AgentConnectionLost):
                    pass

    async def signal(self, proc: ExecProcess | int, sig: int) -> None:
        self._send(P.SIGNAL, getattr(proc, "stream", proc), P.encode_u32(int(sig)))

    async def resize(self, proc: ExecProcess | int, rows: int, cols: int) -> None:
        self._send(P.RESIZE, getattr(proc, "stream", proc), P.encode_resize(rows, cols))

    # -- files
    async def put_file(self, path, data, *, mode: int = 0o644, make_parents: bool = False,
                       owner: tuple[int, int] | None = None, fsync: bool = False) -> int:
        """Write a file atomically (temp file + rename). data: bytes-like, a local file path
        (str / PathLike), or an (async) iterable of bytes. Returns the number of bytes written."""
        sid = self._new_stream()
        req = _Request((P.R_OK,))
        self._register(sid, req)
        self._send(P.PUT, sid, P.encode_put(path, mode, make_parents=make_parents, owner=owner, fsync=fsync))
        try:
            async for chunk in _iter_source(data):
                if req.fut.done():
                    break
                mv = memoryview(chunk).cast("B")
                for i in range(0, len(mv), P.PUT_CHUNK):
                    await self._send_drain(P.PUT_DATA, sid, bytes(mv[i:i + P.PUT_CHUNK]))
            if not req.fut.done():
                self._send(P.PUT_END, sid)
        except BaseException:
            if not req.fut.done() and not self.closed:
                self._send(P.CANCEL, sid)  # the agent drops the temp file
            raise
        _, payload = await req.fut
        return P.decode_ok(payload)

    async def get_file(self, path, *, queue_limit: int = 4 << 20):
        """Async iterator over the file's content in chunks. Raises AgentError (e.g.
        AgentFileNotFoundError) on the first iteration if the file cannot be read."""
        sid = self._new_stream()
        h = _Download(queue_limit)
        self._register(sid, h)
        self._send(P.GET, sid, P.encode_path_req(0, path))
        try:
            while True:
                chunk = await h.q.get()
                if chunk is None:
                    return
                yield chunk
        finally:
            if not h.done:
                self._streams.pop(sid, None)
                h.q.close()
                if not self.closed:
                    self._send(P.CANCEL, sid)

    async def read_file(self, path) -> bytes:
        return b"".join([c async for c in self.get_file(path)])

    async def download(self, path, local_path) -> int:
        n = 0
        with open(local_path, "wb") as f:
            async for chunk in self.get_file(path):
                f.write(chunk)
                n += len(chunk)
        return n


async def _iter_source(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield data
    elif isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            while chunk := f.read(P.PUT_CHUNK):
                yield chunk
    elif hasattr(data, "__aiter__"):
        async for chunk in data:
            yield chunk
    else:
        for chunk in data:
            yield chunk
