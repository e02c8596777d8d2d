"""The agent protocol's framing and the codecs of one command's run (HELLO, EXEC, STDIN, SIGNAL, RESIZE,
the output events and EXIT): what a client that runs commands needs, and all the CLI's warm path imports
(``agent.sync_client``). ``agent.protocol`` is the whole protocol (files, stat, info, the errors the agent
reports) and re-exports every name here; docs/agent-protocol.md is the specification.

Frame = 10-byte header + payload:  u32 payload_length | u32 stream_id | u8 type | u8 flags(=0)
All integers are big-endian. Strings are u32 length + bytes (no terminator, no encoding imposed).
"""

from __future__ import annotations

import struct

VERSION = 1
MAGIC = b"AKAG"
HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size  # 10
MAX_PAYLOAD = 1024 * 1024  # bytes; enforced by both sides
CHUNK = 64 * 1024  # data chunk size the agent sends
PUT_CHUNK = 256 * 1024  # data chunk size the clients send

# client -> agent
HELLO = 0x01
PING = 0x02
INFO = 0x03
CANCEL = 0x04
RESEED = 0x05
EXEC = 0x10
STDIN = 0x11
STDIN_EOF = 0x12
SIGNAL = 0x13
RESIZE = 0x14
PUT = 0x20
PUT_DATA = 0x21
PUT_END = 0x22
GET = 0x23
STAT = 0x24
MKDIR = 0x25
REMOVE = 0x26

# agent -> client
R_HELLO = 0x81
R_PONG = 0x82
R_INFO = 0x83
R_OK = 0x84
R_ERROR = 0x85
R_STARTED = 0x90
R_STDOUT = 0x91
R_STDERR = 0x92
R_EXIT = 0x93
R_STAT = 0xA0
R_DATA = 0xA1


# EXEC flags
X_TTY = 0x01
X_STDIN_CLOSED = 0x02
X_SET_UID = 0x04
X_SET_GID = 0x08
X_KILL_GROUP_ON_EXIT = 0x10
X_RESTRICT = 0x20
X_SECCOMP = 0x40

# EXIT flags
E_SIGNALED = 0x01
E_TIMED_OUT = 0x02
E_OOM = 0x04
E_START_FAILED = 0x08
E_CORE = 0x10
E_STDOUT_TRUNC = 0x20
E_STDERR_TRUNC = 0x40


# output fds as reported to callbacks
STDOUT = 1
STDERR = 2


_U32 = struct.Struct(">I")
_EXEC_FIXED = struct.Struct(">IIHHIIQ")
_EXIT_FIXED = struct.Struct(">BBBBIQ")
_HELLO_REQ = struct.Struct(">4sHH")
_HELLO_REP = struct.Struct(">4sHI")
_RESIZE = struct.Struct(">HH")


# ---------------------------------------------------------------------------------------------------
# errors


class AgentProtocolError(Exception):
    """The peer sent bytes that are not a valid frame (or the agent reported a protocol error)."""


class AgentConnectionLost(ConnectionError):
    """The connection to the agent closed; every operation pending on it fails with this."""


def encode_frame(ftype: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {n} bytes exceeds the maximum of {MAX_PAYLOAD}")
    return HEADER.pack(n, stream, ftype, 0) + payload


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames as (type, stream, payload)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_LEN:
            n, stream, ftype, flags = HEADER.unpack_from(buf, pos)
            if n > MAX_PAYLOAD:
                raise AgentProtocolError(f"frame of {n} bytes exceeds the maximum payload of {MAX_PAYLOAD}")
            if flags:
                raise AgentProtocolError("reserved header byte is not zero")
            if end - pos - HEADER_LEN < n:
                break
            start = pos + HEADER_LEN
            out.append((ftype, stream, bytes(buf[start:start + n])))
            pos = start + n
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def _str(b: bytes | str) -> bytes:
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogateescape")
    return _U32.pack(len(b)) + b


def _read_str(payload: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(payload):
        raise AgentProtocolError("truncated string field")
    (n,) = _U32.unpack_from(payload, pos)
    pos += 4
    if pos + n > len(payload):
        raise AgentProtocolError("truncated string field")
    return payload[pos:pos + n], pos + n


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------
# payload codecs


def encode_hello(min_version: int = VERSION, max_version: int = VERSION) -> bytes:
    return encode_frame(HELLO, 0, _HELLO_REQ.pack(MAGIC, min_version, max_version))


def decode_hello(payload: bytes) -> tuple[int, int, str]:
    """-> (protocol version, max payload, agent version)"""
    try:
        magic, version, max_payload = _HELLO_REP.unpack_from(payload, 0)
        agent_version, _ = _read_str(payload, _HELLO_REP.size)
    except struct.error as e:
        raise AgentProtocolError(f"malformed HELLO reply: {e}") from None
    if magic != MAGIC:
        raise AgentProtocolError("HELLO reply has a wrong magic: not an agentkernel agent")
    return version, max_payload, _text(agent_version)


def encode_env(env) -> list[bytes]:
    """env: a mapping or a list of 'K=V' strings -> list of K=V byte strings (order kept)."""
    if env is None:
        return []
    if hasattr(env, "items"):
        items = []
        for k, v in env.items():
            k = k.encode("utf-8", "surrogateescape") if isinstance(k, str) else bytes(k)
            v = v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
            if b"=" in k or not k:
                raise ValueError(f"invalid environment variable name {k!r}")
            items.append(k + b"=" + v)
        return items
    return [e.encode("utf-8", "surrogateescape") if isinstance(e, str) else bytes(e) for e in env]


def encode_exec(argv, env=None, cwd: str | bytes | None = None, timeout: float | None = None, *,
                tty: bool = False, tty_size: tuple[int, int] | None = None, stdin_closed: bool = False,
                uid: int | None = None, gid: int | None = None, output_limit: int = 0,
                kill_group_on_exit: bool = False, restrict: bool = False,
                seccomp_bpf: bytes | None = None) -> bytes:
    """EXEC payload. timeout in seconds (None/0 = none); tty_size = (rows, cols). ``restrict``: the
    command runs with no_new_privs and no capabilities; ``seccomp_bpf``: a classic BPF program
    (sock_filter array) installed as its seccomp filter."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of strings, not a single string (no shell is involved)")
    argv = list(argv)
    if not argv:
        raise ValueError("argv is empty")
    flags = 0
    if tty:
        flags |= X_TTY
    if stdin_closed:
        flags |= X_STDIN_CLOSED
    if uid is not None:
        flags |= X_SET_UID
    if gid is not None:
        flags |= X_SET_GID
    if kill_group_on_exit:
        flags |= X_KILL_GROUP_ON_EXIT
    if restrict:
        flags |= X_RESTRICT
    if seccomp_bpf:
        if len(seccomp_bpf) % 8:
            raise ValueError("seccomp_bpf must be a whole number of 8-byte BPF instructions")
        flags |= X_SECCOMP
    timeout_ms = 0
    if timeout:
        timeout_ms = max(1, min(0xFFFFFFFF, int(timeout * 1000 + 0.999)))
    rows, cols = tty_size or (0, 0)
    envl = encode_env(env)
    parts = [_EXEC_FIXED.pack(flags, timeout_ms, rows, cols, uid or 0, gid or 0, output_limit),
             _str(cwd or b""), _U32.pack(len(argv))]
    parts.extend(_str(a) for a in argv)
    parts.append(_U32.pack(len(envl)))
    parts.extend(_str(e) for e in envl)
    if seccomp_bpf:
        parts.append(_str(seccomp_bpf))
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"argv + env are {len(payload)} bytes, more than the protocol's {MAX_PAYLOAD}")
    return payload


def encode_u32(v: int) -> bytes:
    return _U32.pack(v)


def encode_resize(rows: int, cols: int) -> bytes:
    return _RESIZE.pack(rows, cols)


def decode_u32(payload: bytes) -> int:
    return _U32.unpack_from(payload, 0)[0]


def exit_code_for(code: int | None, signal: int = 0, timed_out: bool = False) -> int:
    """The one place that maps a command's fate to a shell-style exit code:
    timed out -> 124, killed by signal N -> 128+N, else the exit code."""
    if timed_out:
        return 124
    if signal:
        return 128 + signal
    return code or 0


class ExitStatus:
    """A decoded EXIT event. ``exit_code`` is shell-style (124 timeout, 128+N signal); ``code`` is raw.

    Unpacks like the tuple (exit_code, signal, timed_out, oom, error)."""

    __slots__ = ("code", "core_dumped", "duration", "errno", "error", "oom", "signal", "start_failed",
                 "stderr_truncated", "stdout_truncated", "timed_out")

    def __init__(self, code: int = 0, signal: int = 0, *, timed_out: bool = False, oom: bool = False,
                 start_failed: bool = False, core_dumped: bool = False, errno: int = 0,
                 error: str | None = None, duration: float = 0.0, stdout_truncated: bool = False,
                 stderr_truncated: bool = False) -> None:
        self.code = code
        self.signal = signal
        self.timed_out = timed_out
        self.oom = oom
        self.start_failed = start_failed
        self.core_dumped = core_dumped
        self.errno = errno
        self.error = error
        self.duration = duration
        self.stdout_truncated = stdout_truncated
        self.stderr_truncated = stderr_truncated

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.code, self.signal, self.timed_out)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __iter__(self):
        return iter((self.exit_code, self.signal, self.timed_out, self.oom, self.error))

    def __repr__(self) -> str:
        extra = "".join(f" {k}" for k in ("timed_out", "oom", "start_failed") if getattr(self, k))
        err = f" error={self.error!r}" if self.error else ""
        return (f"<{type(self).__name__} exit_code={self.exit_code} code={self.code} signal={self.signal}"
                f"{extra}{err} duration={self.duration:.6f}>")


def decode_exit(payload: bytes, cls=ExitStatus, **extra):
    try:
        flags, code, sig, _, err, dur_us = _EXIT_FIXED.unpack_from(payload, 0)
        msg, _ = _read_str(payload, _EXIT_FIXED.size)
    except struct.error:
        raise AgentProtocolError("malformed EXIT event") from None
    return cls(code, sig if flags & E_SIGNALED else 0, timed_out=bool(flags & E_TIMED_OUT),
               oom=bool(flags & E_OOM), start_failed=bool(flags & E_START_FAILED),
               core_dumped=bool(flags & E_CORE), errno=err, error=_text(msg) or None,
               duration=dur_us / 1e6, stdout_truncated=bool(flags & E_STDOUT_TRUNC),
               stderr_truncated=bool(flags & E_STDERR_TRUNC), **extra)
