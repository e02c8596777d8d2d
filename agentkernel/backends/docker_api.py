"""A small Docker Engine API client over the engine's unix socket.

One protocol core, two thin I/O drivers:

- ``Call`` is the sans-IO core: one request/response through ``_http1`` (JSON bodies, chunked or sized
  responses, keep-alive reuse, the ``Upgrade: tcp`` hijack used by attach); it maps error responses to
  agentkernel's exceptions. ``Demuxer`` splits the attach stream's multiplexed
  frames (8-byte header: stream type, 0, 0, 0, big-endian u32 size; then the payload).
- ``SyncClient`` moves the bytes with blocking sockets (the CLI's daemon-less fast path: this module
  never imports asyncio, json, socket or h11: ~45 ms of imports together on our machines);
  ``AsyncClient`` moves the same bytes with asyncio (the backend class and the daemon). Neither driver
  knows anything about HTTP.

The API version is pinned to v1.41 (Docker Engine 20.10; every later engine still serves it), so no
negotiation round trip is paid on each command. Errors: HTTP 404 -> ``NotFound`` (the engine's own
message), 409 -> ``AlreadyExists`` (name conflicts) or ``InvalidState``, anything else -> ``SandboxError``;
a missing socket or refused connection -> ``BackendUnavailable`` with the hint to start dockerd.

The socket is ``$DOCKER_HOST`` when that is ``unix://PATH``, else ``/var/run/docker.sock``.
"""

from __future__ import annotations

import os
import struct
from _socket import AF_UNIX, SHUT_WR, SOCK_STREAM
from _socket import socket as _Socket

from .. import _fastjson
from ..errors import AgentKernelError, AlreadyExists, BackendUnavailable, InvalidState, NotFound, SandboxError
from . import _http1

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any


API_VERSION = "1.41"
DEFAULT_SOCKET = "/var/run/docker.sock"
START_HINT = "start dockerd: bash scripts/setup.sh"
DEFAULT_TIMEOUT = 300.0  # seconds for one ordinary request (removal under heavy load can be slow)
RECV_SIZE = 256 * 1024

STDIN, STDOUT, STDERR, SYSERR = 0, 1, 2, 3  # attach stream types


def socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://"):] or DEFAULT_SOCKET
    raise BackendUnavailable(
        f"DOCKER_HOST={host!r} is not a unix socket; agentkernel talks to a local dockerd only",
        hint="unset DOCKER_HOST (or set it to unix:///var/run/docker.sock)",
    )


# ---- the protocol core (sans-IO) ----------------------------------------------------------------------

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(value: str) -> str:
    """Percent-encode a query or path component (urllib.parse costs more to import than this)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in value.encode())


def target(path: str, params: dict[str, Any] | None = None, version: str = API_VERSION) -> str:
    t = f"/v{version}{path}" if version else path
    if params:
        parts = []
        for k, v in params.items():
            if v is None:
                continue
            if isinstance(v, bool):
                v = "1" if v else "0"
            elif isinstance(v, (dict, list)):
                v = _fastjson.dumps(v)
            parts.append(f"{quote(k)}={quote(str(v))}")
        if parts:
            t += "?" + "&".join(parts)
    return t


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return _fastjson.loads(self.body) if self.body.strip() else None

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:80]!r})"


def engine_message(body: bytes) -> str:
    try:
        msg = _fastjson.loads(body).get("message")
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    return body.decode("utf-8", "replace").strip() or "(no message)"


def api_error(method: str, path: str, status: int, body: bytes) -> AgentKernelError:
    """The exception for an error response: the engine's message, typed by status."""
    msg = engine_message(body)
    exc: AgentKernelError
    if status == 404:
        hint = None
        if "no such image" in msg.lower():
            hint = "build local images: agentkernel images build (or bash scripts/setup.sh)"
        exc = NotFound(msg, hint=hint)
    elif status == 409:
        conflict = any(w in msg.lower() for w in ("already in use", "already exists"))
        exc = AlreadyExists(msg) if conflict else InvalidState(msg)
    else:
        exc = SandboxError(f"docker {method} {path.split('?')[0]}: {msg} (HTTP {status})")
    exc.status = status  # type: ignore[attr-defined]
    return exc


class Call:
    """One request/response exchange (sans-IO).

    ``data`` is what to send; feed everything received to ``feed`` (b"" on EOF) until ``done``.
    ``head`` is set as soon as the status line and headers are in (e.g. ``/wait`` flushes them when
    its waiter is registered). With ``upgrade`` the exchange ends at ``101 Switching Protocols``:
    ``upgraded`` is set and ``trailing`` holds raw-stream bytes that arrived with the headers."""

    __slots__ = ("_body", "_on_data", "_parser", "data", "head", "method", "path", "received")

    def __init__(self, method: str, path: str, *, body: Any = None, raw_body: bytes | None = None,
                 upgrade: bool = False, on_data=None) -> None:
        self.method = method
        self.path = path
        headers = [("Host", "docker"), ("User-Agent", "agentkernel")]
        if body is not None:
            raw_body = _fastjson.dumps(body).encode()
            headers.append(("Content-Type", "application/json"))
        if upgrade:
            headers += [("Connection", "Upgrade"), ("Upgrade", "tcp")]
        payload = raw_body or b""
        self.data = _http1.request_bytes(method, path, headers, payload)
        self.head: Response | None = None
        self._body = bytearray()
        self._on_data = on_data
        self._parser = _http1.ResponseParser(method, self._got_head, self._got_data)
        self.received = 0  # bytes received so far (0 at EOF: the peer closed an idle connection)

    def _got_head(self, status: int, headers: dict[str, str]) -> None:
        self.head = Response(status, headers, b"")

    def _got_data(self, data: bytes) -> None:
        if self._on_data is not None and self.head is not None and self.head.status < 300:
            self._on_data(data)
        else:
            self._body += data

    @property
    def done(self) -> bool:
        return self._parser.done

    @property
    def upgraded(self) -> bool:
        return self._parser.upgraded

    @property
    def trailing(self) -> bytes:
        return self._parser.trailing

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self._parser.feed(data)
        except _http1.HTTPProtocolError as exc:
            if not data:
                raise SandboxError(f"dockerd closed the connection during {self.method} "
                                   f"{self.path.split('?')[0]}") from None
            raise SandboxError(f"bad HTTP from dockerd during {self.method} {self.path}: {exc}") from None

    def reusable(self) -> bool:
        """After ``done``: True when the connection can carry the next request."""
        return self._parser.reusable

    def response(self, ok_statuses: tuple[int, ...] = ()) -> Response:
        """The finished response; raises the mapped error unless 2xx/101 or in ``ok_statuses``."""
        assert self.head is not None
        r = self.head
        r.body = bytes(self._body)
        if not (200 <= r.status < 300 or r.status == 101 or r.status in ok_statuses):
            raise api_error(self.method, self.path, r.status, r.body)
        return r


class Demuxer:
    """Splits Docker's multiplexed attach stream into (stream type, payload) frames."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 8:
            stream = buf[pos]
            (size,) = struct.unpack_from(">I", buf, pos + 4)
            if n - pos - 8 < size:
                break
            out.append((1 if stream == STDIN else stream, bytes(buf[pos + 8:pos + 8 + size])))
            pos += 8 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self.buf)


def _unavailable(path: str, exc: OSError) -> BackendUnavailable:
    if isinstance(exc, FileNotFoundError):
        return BackendUnavailable(f"the Docker socket {path} does not exist (dockerd is not running)",
                                  hint=START_HINT)
    if isinstance(exc, ConnectionRefusedError):
        return BackendUnavailable(f"nothing listens on {path} (dockerd is not running; stale socket)",
                                  hint=START_HINT)
    if isinstance(exc, PermissionError):
        return BackendUnavailable(f"permission denied on the Docker socket {path}",
                                  hint="run as root or as a member of the docker group")
    return BackendUnavailable(f"cannot connect to dockerd at {path}: {exc}", hint=START_HINT)


def _connection_error(exc: OSError, method: str, path: str) -> SandboxError:
    """A request's connection failed after it was sent (both drivers)."""
    if isinstance(exc, TimeoutError):
        return SandboxError(f"dockerd did not answer {method} {path} in time")
    return SandboxError(f"lost the connection to dockerd during {method} {path}: {exc}", hint=START_HINT)


def _lost(call: Call) -> SandboxError:
    return SandboxError(f"lost the connection to dockerd during {call.method} {call.path.split('?')[0]}")


# ---- blocking driver ----------------------------------------------------------------------------------


class SyncClient:
    """Blocking client; keeps one idle keep-alive connection for the next request."""

    def __init__(self, path: str | None = None, *, version: str = API_VERSION,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path or socket_path()
        self.version = version
        self.timeout = timeout
        self._idle: _Socket | None = None

    def connect(self, timeout: float | None = None) -> _Socket:
        s = _Socket(AF_UNIX, SOCK_STREAM)
        s.settimeout(timeout if timeout is not None else self.timeout)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise _unavailable(self.path, exc) from None
        return s

    def _exchange(self, sock: _Socket, call: Call, until_head: bool = False) -> None:
        sock.sendall(call.data)
        while not call.done and not (until_head and call.head is not None):
            data = sock.recv(RECV_SIZE)
            call.feed(data)
            if not data and not call.done:
                raise _lost(call)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
                ok: tuple[int, ...] = (), timeout: float | None = None, on_data=None) -> Response:
        tgt = target(path, params, self.version)
        for attempt in (0, 1):
            reused = self._idle is not None and attempt == 0
            if reused:
                sock = self._idle
                self._idle = None
                sock.settimeout(timeout if timeout is not None else self.timeout)
            else:
                sock = self.connect(timeout)
            call = Call(method, tgt, body=body, on_data=on_data)
            try:
                self._exchange(sock, call)
            except (SandboxError, OSError) as exc:
                sock.close()
                if reused and call.received == 0:  # the engine closed the idle connection: retry fresh
                    continue
                if isinstance(exc, SandboxError):
                    raise
                raise _connection_error(exc, method, path) from None
            except BaseException:
                sock.close()
                raise
            if call.reusable():
                if self._idle is not None:
                    self._idle.close()
                self._idle = sock
            else:
                sock.close()
            return call.response(ok)
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    def open_call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                  body: Any = None) -> SyncCall:
        """Start a long request (e.g. ``/wait``) on its own connection; returns once its response
        headers are in. Drive the rest with ``SyncCall.on_readable`` from a select loop."""
        sock = self.connect()
        call = Call(method, target(path, params, self.version), body=body)
        try:
            self._exchange(sock, call, until_head=True)
            if call.done:
                call.response()  # raises for an error status
        except BaseException:
            sock.close()
            raise
        return SyncCall(sock, call)

    def attach(self, container: str, *, stdin: bool, stdout: bool = True, stderr: bool = True,
               logs: bool = False) -> SyncStream:
        params = {"stream": True, "stdin": stdin, "stdout": stdout, "stderr": stderr, "logs": logs}
        sock = self.connect()
        call = Call("POST", target(f"/containers/{quote(container)}/attach", params, self.version), upgrade=True)
        try:
            self._exchange(sock, call)
            call.response()
            if not call.upgraded:
                raise SandboxError(f"dockerd did not hijack the attach connection (HTTP {call.head.status})")
        except BaseException:
            sock.close()
            raise
        return SyncStream(sock, call.trailing)

    def close(self) -> None:
        if self._idle is not None:
            self._idle.close()
            self._idle = None

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCall:
    """A request in flight on its own blocking socket (see ``SyncClient.open_call``)."""

    __slots__ = ("call", "sock")

    def __init__(self, sock: _Socket, call: Call) -> None:
        self.sock = sock
        self.call = call

    @property
    def done(self) -> bool:
        return self.call.done

    def on_readable(self) -> bool:
        """Read what is available; True when the response is complete."""
        data = self.sock.recv(RECV_SIZE)
        self.call.feed(data)
        if not data and not self.call.done:
            raise _lost(self.call)
        return self.call.done

    def finish(self, timeout: float | None = None) -> Response:
        self.sock.settimeout(timeout)
        while not self.call.done:
            self.on_readable()
        return self.call.response()

    def close(self) -> None:
        self.sock.close()


class SyncStream:
    """A hijacked attach connection: demuxed output frames in, raw stdin out."""

    __slots__ = ("demux", "pending", "sock")

    def __init__(self, sock: _Socket, trailing: bytes) -> None:
        self.sock = sock
        self.demux = Demuxer()
        self.pending = trailing

    def take_pending(self) -> list[tuple[int, bytes]]:
        """Frames that arrived together with the 101 response (process before selecting)."""
        data, self.pending = self.pending, b""
        return self.demux.feed(data) if data else []

    def read_frames(self) -> list[tuple[int, bytes]] | None:
        """One recv; the complete frames it yields, or None at end of stream."""
        data = self.sock.recv(RECV_SIZE)
        if not data:
            return None
        return self.demux.feed(data)

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def close_stdin(self) -> None:
        try:
            self.sock.shutdown(SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


# ---- asyncio driver ------------------------------------------------------------------------------------


class AsyncClient:
    """asyncio client with a small pool of keep-alive connections (requests may run concurrently).

    Connections are plain non-blocking sockets driven with ``loop.sock_recv``/``sock_sendall``, so an
    idle one is not tied to the event loop that opened it (a backend object may outlive one
    ``asyncio.run``)."""

    def __init__(self, path: str | None = None, *, version: str = API_VERSION,
                 timeout: float | None = DEFAULT_TIMEOUT, max_idle: int = 8) -> None:
        self.path = path or socket_path()
        self.version = version
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_Socket] = []

    async def connect(self) -> _Socket:
        import asyncio
        import socket

        s = socket.socket(AF_UNIX, SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, self.path)
        except OSError as exc:
            s.close()
            raise _unavailable(self.path, exc) from None
        except BaseException:
            s.close()
            raise
        return s

    @staticmethod
    async def _exchange(sock: _Socket, call: Call) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, call.data)
        while not call.done:
            data = await loop.sock_recv(sock, RECV_SIZE)
            call.feed(data)
            if not data and not call.done:
                raise _lost(call)

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      body: Any = None, ok: tuple[int, ...] = (), timeout: float | None = None,
                      on_data=None) -> Response:
        import asyncio

        tgt = target(path, params, self.version)
        limit = timeout if timeout is not None else self.timeout
        for attempt in (0, 1):
            reused = bool(self._idle) and attempt == 0
            sock = self._idle.pop() if reused else await self.connect()
            call = Call(method, tgt, body=body, on_data=on_data)
            try:
                await asyncio.wait_for(self._exchange(sock, call), limit)
            except (SandboxError, OSError) as exc:
                sock.close()
                if reused and call.received == 0:  # the engine closed the idle connection: retry fresh
                    continue
                if isinstance(exc, SandboxError):
                    raise
                raise _connection_error(exc, method, path) from None
            except BaseException:  # cancelled: the connection is in an unknown state
                sock.close()
                raise
            if call.reusable() and len(self._idle) < self.max_idle:
                self._idle.append(sock)
            else:
                sock.close()
            return call.response(ok)
        raise AssertionError("unreachable")

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        return (await self.request(method, path, **kw)).json()

    async def attach(self, container: str, *, stdin: bool, stdout: bool = True, stderr: bool = True,
                     logs: bool = False) -> AsyncStream:
        params = {"stream": True, "stdin": stdin, "stdout": stdout, "stderr": stderr, "logs": logs}
        sock = await self.connect()
        call = Call("POST", target(f"/containers/{quote(container)}/attach", params, self.version), upgrade=True)
        try:
            await self._exchange(sock, call)
            call.response()
            if not call.upgraded:
                raise SandboxError(f"dockerd did not hijack the attach connection (HTTP {call.head.status})")
        except BaseException:
            sock.close()
            raise
        return AsyncStream(sock, call.trailing)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class AsyncStream:
    """A hijacked attach connection under asyncio."""

    __slots__ = ("demux", "frames", "sock")

    def __init__(self, sock: _Socket, trailing: bytes) -> None:
        self.sock = sock
        self.demux = Demuxer()
        self.frames: list[tuple[int, bytes]] = self.demux.feed(trailing) if trailing else []

    async def read(self) -> tuple[int, bytes] | None:
        """The next (stream, payload) frame, or None at end of stream."""
        import asyncio

        while not self.frames:
            data = await asyncio.get_running_loop().sock_recv(self.sock, RECV_SIZE)
            if not data:
                return None
            self.frames = self.demux.feed(data)
        return self.frames.pop(0)

    async def write(self, data: bytes) -> None:
        import asyncio

        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def close_stdin(self) -> None:
        try:
            self.sock.shutdown(SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
