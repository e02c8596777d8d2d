"""The daemon's local protocol (unix socket, one request per connection). Standard library only.

Frames both ways: ``u32 big-endian length of the rest | u8 type | payload``. Structured payloads
(REQUEST, REPLY, DONE, EXIT, ERROR) are Python ``marshal`` data of plain dicts/lists/str/int/float/bool/
None: both ends are this package on the same interpreter, the socket admits only the daemon's own
user (0600 in a 0700 dir), and ``json`` would cost the CLI's warm path ~6 ms of imports (it pulls in
``re``). Every request carries ``"v": PROTOCOL_VERSION``.

Client -> daemon
  REQUEST   {"v": 1, "op": ...}: "run", "status", "stop", "ping"
  STDIN     raw bytes for the command (proxy mode)
  STDIN_EOF (empty)
  SIGNAL    one byte: a signal number to deliver to the command (proxy mode)
  DONE       result summary of a lease-mode run (for metrics and audit)

  MRUN       {"id": int, "argv": [...], "spec_id": int, "spec": {...} (first use of spec_id only),
             "timeout", "stdin": bytes | None, "env", "cwd"} (multiplexed mode, below)
  MCANCEL    {"id": int}: cancel that run (its sandbox is destroyed)

Daemon -> client
  REPLY     : the answer to status/ping/stop, or for "run" either
            {"mode": "lease", "socket": PATH, "env": {...}, "cwd": ..., "sandbox": ID, "hit": bool,
            "journal": [LENT, BACK]} (the client talks to the sandbox's agent itself: no second hop; as it
            ends it renames the member's ownership-journal entry LENT to BACK, two names in its journal
            directory, before DONE) or {"mode": "proxy"}
  STDOUT / STDERR  raw output chunks (proxy mode)
  EXIT       {"exit_code", "signal", "timed_out", "oom_killed", "timings"} (proxy mode)
  ERROR      {"message", "hint", "kind"}

  MRESULT    {"id", "exit_code", "signal", "timed_out", "oom_killed", "stdout", "stderr", "truncated",
             "timings"} (multiplexed mode)
  MERROR     {"id", "message", "hint", "kind"}: that run failed (kind "Cancelled" after MCANCEL)

Multiplexed mode (REQUEST {"op": "mux"}, answered with REPLY {"ok": True}): the connection then carries
any number of MRUN frames, pipelined (a client may send many before reading), each answered by exactly
one MRESULT or MERROR with the same id, in completion order (not request order). Runs execute
concurrently; output is captured (not streamed). A spec is sent once per connection under a client
chosen spec_id and referred to by it afterwards. Closing the connection cancels every run still going.

A lease lasts as long as the client's connection: when it closes (command done, client killed or
disconnected), the daemon destroys that sandbox and refills the pool. Sandboxes are never reused.
"""

from __future__ import annotations

import marshal
import struct

PROTOCOL_VERSION = 1
REQUEST, STDIN, STDIN_EOF, SIGNAL, DONE, MRUN, MCANCEL = 1, 2, 3, 4, 5, 6, 7
REPLY, STDOUT, STDERR, EXIT, ERROR, MRESULT, MERROR = 11, 12, 13, 14, 15, 16, 17
MAX_FRAME = 4 << 20
_HDR = struct.Struct(">IB")


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload) + 1, ftype) + payload


def oframe(ftype: int, obj: dict) -> bytes:
    """A frame carrying a structured object."""
    return frame(ftype, marshal.dumps(obj))


def decode(payload: bytes) -> dict:
    try:
        obj = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        raise ValueError("malformed daemon frame payload") from None
    if not isinstance(obj, dict):
        raise ValueError("daemon frame payload is not an object")
    return obj


class FrameReader:
    """Incremental decoder: feed bytes, get (type, payload) frames. A bulk read holding thousands of small
    frames is cut in one pass (the consumed prefix is dropped once, not after every frame)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data  # the common case: nothing left over from the last read
        out = []
        pos, end = 0, len(buf)
        unpack = _HDR.unpack_from
        while end - pos >= 5:
            n, t = unpack(buf, pos)
            if n < 1 or n > MAX_FRAME:
                raise ValueError(f"bad daemon frame length {n}")
            if end - pos < 4 + n:
                break
            out.append((t, bytes(buf[pos + 5 : pos + 4 + n])))
            pos += 4 + n
        if buf is data:
            if pos < end:
                self.buf = bytearray(data[pos:])
        elif pos:
            del self.buf[:pos]
        return out
