"""The agentkernel agent protocol, version 1: constants, frame encoding and payload codecs.

The full specification is docs/agent-protocol.md. This module is pure standard library and imports
nothing heavy (no asyncio). The framing and a command's run are in ``agent.wire`` (all the CLI's warm
path imports), re-exported here: this module adds files, stat, info and the errors the agent reports.

Frame = 10-byte header + payload:  u32 payload_length | u32 stream_id | u8 type | u8 flags(=0)
All integers are big-endian. Strings are u32 length + bytes (no terminator, no encoding imposed).
"""

from __future__ import annotations

import errno as _errno
import struct

from .wire import (  # noqa: F401 (re-exported: this module is the whole protocol)
    _U32,
    CANCEL,
    CHUNK,
    E_CORE,
    E_OOM,
    E_SIGNALED,
    E_START_FAILED,
    E_STDERR_TRUNC,
    E_STDOUT_TRUNC,
    E_TIMED_OUT,
    EXEC,
    GET,
    HEADER,
    HEADER_LEN,
    HELLO,
    INFO,
    MAGIC,
    MAX_PAYLOAD,
    MKDIR,
    PING,
    PUT,
    PUT_CHUNK,
    PUT_DATA,
    PUT_END,
    R_DATA,
    R_ERROR,
    R_EXIT,
    R_HELLO,
    R_INFO,
    R_OK,
    R_PONG,
    R_STARTED,
    R_STAT,
    R_STDERR,
    R_STDOUT,
    REMOVE,
    RESEED,
    RESIZE,
    SIGNAL,
    STAT,
    STDERR,
    STDIN,
    STDIN_EOF,
    STDOUT,
    VERSION,
    X_KILL_GROUP_ON_EXIT,
    X_RESTRICT,
    X_SECCOMP,
    X_SET_GID,
    X_SET_UID,
    X_STDIN_CLOSED,
    X_TTY,
    AgentConnectionLost,
    AgentProtocolError,
    ExitStatus,
    FrameDecoder,
    _read_str,
    _str,
    _text,
    decode_exit,
    decode_hello,
    decode_u32,
    encode_env,
    encode_exec,
    encode_frame,
    encode_hello,
    encode_resize,
    encode_u32,
    exit_code_for,
)

FRAME_NAMES = {
    HELLO: "HELLO", PING: "PING", INFO: "INFO", CANCEL: "CANCEL", EXEC: "EXEC", STDIN: "STDIN",
    STDIN_EOF: "STDIN_EOF", SIGNAL: "SIGNAL", RESIZE: "RESIZE", PUT: "PUT", PUT_DATA: "PUT_DATA",
    PUT_END: "PUT_END", GET: "GET", STAT: "STAT", MKDIR: "MKDIR", REMOVE: "REMOVE", R_HELLO: "R_HELLO",
    R_PONG: "R_PONG", R_INFO: "R_INFO", R_OK: "R_OK", R_ERROR: "R_ERROR", R_STARTED: "R_STARTED",
    R_STDOUT: "R_STDOUT", R_STDERR: "R_STDERR", R_EXIT: "R_EXIT", R_STAT: "R_STAT", R_DATA: "R_DATA",
}

# PUT / STAT / MKDIR / REMOVE flags
P_MKDIRS = 0x01
P_SET_OWNER = 0x02
P_FSYNC = 0x04
S_NOFOLLOW = 0x01
M_PARENTS = 0x01
RM_RECURSIVE = 0x01
RM_MISSING_OK = 0x02

# STAT file types
FILE_TYPES = {0: "missing", 1: "file", 2: "dir", 3: "symlink", 4: "char", 5: "block", 6: "fifo",
              7: "socket", 8: "other"}

_STAT = struct.Struct(">BxxxIQQII")
_INFO_FIXED = struct.Struct(">HBBIIII")
_PUT_FIXED = struct.Struct(">IIII")


# ---------------------------------------------------------------------------------------------------
# errors


class AgentError(OSError):
    """The agent refused or failed an operation; ``errno`` is the Linux errno, ``strerror`` its message."""


class AgentFileNotFoundError(AgentError, FileNotFoundError):
    pass


class AgentFileExistsError(AgentError, FileExistsError):
    pass


class AgentIsADirectoryError(AgentError, IsADirectoryError):
    pass


class AgentNotADirectoryError(AgentError, NotADirectoryError):
    pass


class AgentPermissionError(AgentError, PermissionError):
    pass


_ERROR_CLASSES = {
    _errno.ENOENT: AgentFileNotFoundError,
    _errno.EEXIST: AgentFileExistsError,
    _errno.EISDIR: AgentIsADirectoryError,
    _errno.ENOTDIR: AgentNotADirectoryError,
    _errno.EACCES: AgentPermissionError,
    _errno.EPERM: AgentPermissionError,
}


def agent_error(err: int, message: str) -> AgentError:
    return _ERROR_CLASSES.get(err, AgentError)(err, message)


# ---------------------------------------------------------------------------------------------------
# frames


def encode_reseed(entropy: bytes, time_ns: int = 0) -> bytes:
    """RESEED payload: u64 wall-clock time in ns (0 = leave the clock alone) + up to 1024 entropy bytes."""
    if len(entropy) > 1024:
        raise ValueError("at most 1024 entropy bytes per RESEED")
    return struct.pack(">Q", time_ns) + entropy


def encode_put(path, mode: int = 0o644, *, make_parents: bool = False, owner: tuple[int, int] | None = None,
               fsync: bool = False) -> bytes:
    flags = (P_MKDIRS if make_parents else 0) | (P_SET_OWNER if owner else 0) | (P_FSYNC if fsync else 0)
    uid, gid = owner or (0, 0)
    return _PUT_FIXED.pack(flags, mode, uid, gid) + _str(path)


def encode_path_req(flags: int, path, mode: int | None = None) -> bytes:
    """GET / STAT / REMOVE (flags, path) and MKDIR (flags, mode, path)."""
    head = _U32.pack(flags) if mode is None else _U32.pack(flags) + _U32.pack(mode)
    return head + _str(path)


def decode_error(payload: bytes) -> AgentError:
    try:
        (err,) = _U32.unpack_from(payload, 0)
        msg, _ = _read_str(payload, 4)
    except (struct.error, AgentProtocolError):
        return AgentError(_errno.EPROTO, "malformed ERROR frame from the agent")
    return agent_error(err, _text(msg))


def decode_ok(payload: bytes) -> int:
    return struct.unpack(">Q", payload[:8])[0] if len(payload) >= 8 else 0


class AgentExecResult(ExitStatus):
    """ExitStatus plus what the command printed (when captured) and its pid."""

    __slots__ = ("pid", "stderr", "stdout")

    def __init__(self, *args, stdout: bytes = b"", stderr: bytes = b"", pid: int = 0, **kw) -> None:
        super().__init__(*args, **kw)
        self.stdout = stdout
        self.stderr = stderr
        self.pid = pid


class StatResult:
    __slots__ = ("gid", "mode", "mtime_ns", "size", "type", "uid")

    def __init__(self, type: str, mode: int, size: int, mtime_ns: int, uid: int, gid: int) -> None:
        self.type = type
        self.mode = mode
        self.size = size
        self.mtime_ns = mtime_ns
        self.uid = uid
        self.gid = gid

    @property
    def exists(self) -> bool:
        return self.type != "missing"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    def __repr__(self) -> str:
        return f"<StatResult {self.type} mode={self.mode:o} size={self.size} uid={self.uid} gid={self.gid}>"


def decode_stat(payload: bytes) -> StatResult:
    try:
        t, mode, size, mtime_ns, uid, gid = _STAT.unpack_from(payload, 0)
    except struct.error:
        raise AgentProtocolError("malformed STAT reply") from None
    return StatResult(FILE_TYPES.get(t, "other"), mode, size, mtime_ns, uid, gid)


class AgentInfo:
    __slots__ = ("agent_version", "gid", "is_pid1", "max_payload", "oom_source", "pid", "protocol_version",
                 "stdio", "uid")

    def __init__(self, **kw) -> None:
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def __repr__(self) -> str:
        return "<AgentInfo " + " ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ">"


def decode_info(payload: bytes) -> AgentInfo:
    try:
        proto, flags, oom, pid, uid, gid, max_payload = _INFO_FIXED.unpack_from(payload, 0)
        ver, _ = _read_str(payload, _INFO_FIXED.size)
    except struct.error:
        raise AgentProtocolError("malformed INFO reply") from None
    return AgentInfo(protocol_version=proto, is_pid1=bool(flags & 1), stdio=bool(flags & 2),
                     oom_source={0: None, 1: "cgroup-v1", 2: "cgroup-v2", 3: "kernel"}.get(oom), pid=pid, uid=uid,
                     gid=gid, max_payload=max_payload, agent_version=_text(ver))
