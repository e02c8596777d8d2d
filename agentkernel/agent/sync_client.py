"""Blocking client for the agent over a plain socket or a pair of fds (poll(), no asyncio).

Used by the CLI fast path: it streams a command's output straight to its own stdout/stderr with
os.write as it arrives, forwards stdin from a fd, and forwards signals the caller catches:

    c = SyncAgentClient.connect_unix("/run/ak/agent.sock")
    signal.signal(signal.SIGINT, lambda s, f: c.forward_signal(s))
    exit_code, sig, timed_out, oom, error = c.exec_stream(["make"], env={...}, cwd="/src", stdin_fd=0)

Imports only C-level modules (os, select, _socket) plus the stdlib-only framing module
(``agent.wire``; the rest of ``agent.protocol`` when an operation other than exec needs it, or the agent
reports an error): the `socket` and `signal` modules would pull in `enum` (~5 ms of start-up).
"""

from __future__ import annotations

import _socket
import os
import select

from ..termio import write_all as _write_all
from . import wire as P
from .wire import AgentConnectionLost, AgentProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .protocol import AgentExecResult, AgentInfo, StatResult


def _protocol():
    """The whole protocol module (``agent.wire`` is its framing and exec part)."""
    from . import protocol

    return protocol


def _agent_error(payload: bytes):
    return _protocol().decode_error(payload)

__all__ = ["SyncAgentClient"]

_OUT_HIGH = 1 << 20  # stop reading the stdin fd while this much is queued for the agent
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_SIGPIPE = 13  # Linux
_EIO = 5  # Linux: a pty's master reads this once its other side is closed


class SyncAgentClient:
    """A blocking connection to an agent: ``SyncAgentClient(sock)`` (a connected socket object, which
    the client then owns) or ``SyncAgentClient((rfd, wfd))``.

    The HELLO is sent at once and its reply is read together with the first request's frames, so a
    new connection costs no extra round trip. One operation at a time (no concurrency)."""

    def __init__(self, conn, *, owner=None) -> None:
        if hasattr(conn, "fileno"):  # a socket.socket / _socket.socket
            self._sock = conn
            conn.setblocking(False)
            self.rfd = self.wfd = conn.fileno()
        else:
            self._sock = None
            self.rfd, self.wfd = conn
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
        self._owner = owner  # e.g. a StdioProcessTransport to close with us
        self._decoder = P.FrameDecoder()
        self._out = bytearray()
        self._frames: list = []
        self._hello_done = False
        self._lost: str | None = None
        self._next_stream = 1
        self._wake_r = self._wake_w = -1
        self._pending_signals: list[int] = []
        self._pending_resize: tuple[int, int] | None = None
        self.protocol_version = 0
        self.agent_version = ""
        self._out += P.encode_hello()

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 5.0) -> SyncAgentClient:
        from ..safefs import socket_path  # never through a link the sandbox planted at the socket's name

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            with socket_path(path) as p:
                s.connect(p)
        except BaseException:
            s.close()
            raise
        return cls(s)

    @classmethod
    def connect(cls, transport) -> SyncAgentClient:
        """From a transport (``agentkernel.agent.transport``): its connect_sync() result."""
        return cls(transport.connect_sync(), owner=transport)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._owner is None:  # an owning transport closes its own pipes (below)
            for fd in {self.rfd, self.wfd}:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._owner is not None:
            self._owner.close()
        self._lost = self._lost or "the client closed the connection"

    def __enter__(self) -> SyncAgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- signals: safe to call from a Python signal handler
    def forward_signal(self, sig: int) -> None:
        """Queue ``sig`` for the running command's process group (sent by exec_stream's loop)."""
        self._pending_signals.append(int(sig))
        self._wake()

    def resize(self, rows: int, cols: int) -> None:
        self._pending_resize = (rows, cols)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    # -- plumbing
    def _queue(self, ftype: int, stream: int, payload: bytes = b"") -> None:
        self._out += P.encode_frame(ftype, stream, payload)

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self.wfd, self._out)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                self._lost = f"connection to the agent lost: {e}"
                raise AgentConnectionLost(self._lost) from None
            del self._out[:n]

    def _read(self) -> None:
        try:
            data = os.read(self.rfd, 1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost = f"connection to the agent lost: {e}"
            raise AgentConnectionLost(self._lost) from None
        if not data:
            self._lost = "the agent closed the connection"
            raise AgentConnectionLost(self._lost)
        for f in self._decoder.feed(data):
            ftype, stream, payload = f
            if stream == 0:
                if ftype == P.R_HELLO and not self._hello_done:
                    self.protocol_version, _, self.agent_version = P.decode_hello(payload)
                    self._hello_done = True
                elif ftype == P.R_ERROR:
                    err = _agent_error(payload)
                    self._lost = f"the agent closed the connection: {err.strerror}"
                    if not self._hello_done:
                        raise err
                    raise AgentConnectionLost(self._lost)
                continue
            self._frames.append(f)

    def _check(self) -> None:
        if self._lost is not None:
            raise AgentConnectionLost(self._lost)

    def _new_stream(self) -> int:
        sid = self._next_stream
        self._next_stream += 1
        return sid

    def _wait_frames(self, timeout: float | None = None) -> None:
        """Flush, then block until at least one frame is available."""
        poller = select.poll()
        ms = -1 if timeout is None else int(timeout * 1000)
        while not self._frames:
            self._flush()
            poller.register(self.rfd, select.POLLIN | (select.POLLOUT if self._out and self.wfd == self.rfd
                                                       else 0))
            if self._out and self.wfd != self.rfd:
                poller.register(self.wfd, select.POLLOUT)
            if not poller.poll(ms) and timeout is not None:
                raise TimeoutError("no reply from the agent")
            self._read()

    def _request(self, ftype: int, payload: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        self._check()
        sid = self._new_stream()
        self._queue(ftype, sid, payload)
        while True:
            self._wait_frames(timeout)
            frames, self._frames = self._frames, []
            for ft, stream, pl in frames:
                if stream == sid:
                    if ft == P.R_ERROR:
                        raise _agent_error(pl)
                    return ft, pl

    # -- simple requests
    def hello(self, timeout: float | None = 10.0) -> str:
        """Complete the HELLO exchange now (otherwise it completes with the first request)."""
        self._check()
        poller = select.poll()
        while not self._hello_done:
            self._flush()
            poller.register(self.rfd, select.POLLIN)
            if not poller.poll(-1 if timeout is None else int(timeout * 1000)):
                raise TimeoutError("no HELLO from the agent")
            self._read()
        return self.agent_version

    def reseed(self, entropy: bytes, *, time_ns: int = 0, timeout: float | None = 10.0) -> int:
        """Mix ``entropy`` into the guest's RNG and set its clock to ``time_ns`` (0: unchanged); returns the
        bytes credited. For restored VM snapshots (``AgentClient.reseed``)."""
        _, payload = self._request(P.RESEED, _protocol().encode_reseed(entropy, time_ns), timeout)
        return int.from_bytes(payload[:8], "big")

    def ping(self, payload: bytes = b"", timeout: float | None = 10.0) -> None:
        ft, pl = self._request(P.PING, payload, timeout)
        if ft != P.R_PONG or pl != payload:
            raise AgentProtocolError("bad PONG")

    def info(self, timeout: float | None = 10.0) -> AgentInfo:
        return _protocol().decode_info(self._request(P.INFO, b"", timeout)[1])

    def stat(self, path, *, follow_symlinks: bool = True) -> StatResult:
        proto = _protocol()
        req = proto.encode_path_req(0 if follow_symlinks else proto.S_NOFOLLOW, path)
        return proto.decode_stat(self._request(P.STAT, req)[1])

    # -- exec
    def exec_stream(self, argv, env=None, cwd=None, timeout: float | None = None, *, stdin_fd=None,
                    stdout_fd: int | None = 1, stderr_fd: int | None = 2, tty: bool = False,
                    tty_size: tuple[int, int] | None = None, uid: int | None = None,
                    gid: int | None = None, output_limit: int = 0, kill_group_on_exit: bool = False,
                    on_output=None, on_started=None) -> P.ExitStatus:
        """Run ``argv`` and write its output to ``stdout_fd`` / ``stderr_fd`` as it arrives (with tty=True
        there is one merged stream, written to stdout_fd). ``stdin_fd``: None (stdin closed), a fd
        (forwarded until EOF), or bytes. ``on_output(fd, data)`` replaces the fd writes if given;
        ``on_started(pid)`` is called when the agent has forked the command.
        Returns an ExitStatus, which unpacks as (exit_code, signal, timed_out, oom, error) with
        exit_code shell-style (124 on timeout, 128+N on signal N)."""
        self._check()
        sid = self._new_stream()
        stdin_bytes = None
        if isinstance(stdin_fd, (bytes, bytearray, memoryview)):
            stdin_bytes, stdin_fd = memoryview(stdin_fd).cast("B"), None
        stdin_closed = stdin_fd is None and stdin_bytes is None
        self._queue(P.EXEC, sid, P.encode_exec(argv, env, cwd, timeout, tty=tty, tty_size=tty_size,
                                                stdin_closed=stdin_closed, uid=uid, gid=gid,
                                                output_limit=output_limit,
                                                kill_group_on_exit=kill_group_on_exit))
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        sinks = {P.R_STDOUT: stdout_fd, P.R_STDERR: stderr_fd}
        broken: set[int] = set()
        stdin_pos = 0
        poller = select.poll()
        while True:
            # stdin from bytes: queue a slice while the outbound buffer has room
            while stdin_bytes is not None and len(self._out) < _OUT_HIGH:
                chunk = stdin_bytes[stdin_pos:stdin_pos + P.PUT_CHUNK]
                stdin_pos += len(chunk)
                if chunk:
                    self._queue(P.STDIN, sid, bytes(chunk))
                if stdin_pos >= len(stdin_bytes):
                    self._queue(P.STDIN_EOF, sid)
                    stdin_bytes = None
            while self._pending_signals:
                self._queue(P.SIGNAL, sid, P.encode_u32(self._pending_signals.pop(0)))
            if self._pending_resize:
                self._queue(P.RESIZE, sid, P.encode_resize(*self._pending_resize))
                self._pending_resize = None
            self._flush()
            frames, self._frames = self._frames, []
            for ft, stream, pl in frames:
                if stream != sid:
                    continue
                if ft == P.R_STDOUT or ft == P.R_STDERR:
                    if on_output is not None:
                        on_output(P.STDOUT if ft == P.R_STDOUT else P.STDERR, pl)
                        continue
                    fd = sinks[ft]
                    if fd is None or fd in broken:
                        continue
                    try:
                        _write_all(fd, pl)
                    except BrokenPipeError:
                        # our reader went away (e.g. `| head`): tell the command as a shell would
                        broken.add(fd)
                        self._queue(P.SIGNAL, sid, P.encode_u32(_SIGPIPE))
                elif ft == P.R_STARTED:
                    if on_started is not None:
                        on_started(P.decode_u32(pl))
                elif ft == P.R_EXIT:
                    return P.decode_exit(pl)
                elif ft == P.R_ERROR:
                    raise _agent_error(pl)
            if self._frames or (stdin_bytes is not None and len(self._out) < _OUT_HIGH):
                continue
            # wait for: agent data, room to write to the agent, stdin data, a wake-up (signal/resize)
            poller = select.poll()
            if self.rfd == self.wfd:
                poller.register(self.rfd, select.POLLIN | (select.POLLOUT if self._out else 0))
            else:
                poller.register(self.rfd, select.POLLIN)
                if self._out:
                    poller.register(self.wfd, select.POLLOUT)
            if stdin_fd is not None and len(self._out) < _OUT_HIGH:
                poller.register(stdin_fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == stdin_fd and stdin_fd is not None:
                    try:
                        data = os.read(stdin_fd, P.PUT_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        if e.errno != _EIO:
                            raise
                        data = b""
                    if data:
                        self._queue(P.STDIN, sid, data)
                    else:
                        self._queue(P.STDIN_EOF, sid)
                        stdin_fd = None
                if fd == self.rfd and ev & _POLLIN:
                    self._read()

    def exec(self, argv, env=None, cwd=None, timeout: float | None = None, *, stdin: bytes | None = None,
             tty: bool = False, tty_size: tuple[int, int] | None = None, uid: int | None = None,
             gid: int | None = None, output_limit: int = 0, kill_group_on_exit: bool = False) -> AgentExecResult:
        """Run ``argv`` to completion and capture its output in the result."""
        out: list[list[bytes]] = [[], [], []]
        st = self.exec_stream(argv, env, cwd, timeout, stdin_fd=stdin, tty=tty, tty_size=tty_size, uid=uid,
                              gid=gid, output_limit=output_limit, kill_group_on_exit=kill_group_on_exit,
                              on_output=lambda fd, data: out[fd].append(data))
        return _protocol().AgentExecResult(
            st.code, st.signal, timed_out=st.timed_out, oom=st.oom, start_failed=st.start_failed,
            core_dumped=st.core_dumped, errno=st.errno, error=st.error, duration=st.duration,
            stdout_truncated=st.stdout_truncated, stderr_truncated=st.stderr_truncated,
            stdout=b"".join(out[1]), stderr=b"".join(out[2]))
