"""HTTP/1.1 client message framing, sans-IO: the request bytes out, a response parsed from bytes in.

Just the part of RFC 9112 a client of a local engine API needs: ``Content-Length``, ``chunked`` and
read-until-close bodies, 1xx responses (``101 Switching Protocols`` ends the exchange and hands back
whatever arrived after the head: the raw stream of a hijacked connection), keep-alive, ``HEAD`` and
204/304 responses without a body. Anything malformed raises ``HTTPProtocolError``.

Why not h11: importing h11 costs ~30 ms on our machines (it compiles its grammar's regular expressions
at import), a fifth of a whole daemon-less ``agentkernel run --backend docker``. This module imports
nothing. The async and blocking drivers in ``docker_api`` both use it.
"""

from __future__ import annotations

MAX_HEAD = 64 * 1024  # bytes of status line + headers (and of one chunk-size or trailer line)

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HTTPProtocolError(Exception):
    """The peer sent something that is not a valid HTTP/1.1 response (or closed mid-response)."""


def _is_token(s: str) -> bool:
    b = s.encode("latin-1", "replace")
    return bool(b) and all(c in _TOKEN for c in b)


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """One request: request line, headers (plus ``Content-Length`` unless a bodiless GET or HEAD), blank
    line, body. Refuses values that would split the message."""
    if not _is_token(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not target or any(c <= " " or c == "\x7f" for c in target):
        raise ValueError(f"invalid request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if not _is_token(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}: {value!r}")
        lines.append(f"{name}: {value}")
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseParser:
    """Parses one response. ``on_head(status, headers)`` is called once the final head is in (and for a
    101), ``on_data(bytes)`` for each piece of the body. Feed ``b""`` at end of stream.

    After ``done``: ``upgraded`` (a 101 arrived; ``trailing`` holds the raw bytes after it) and
    ``reusable`` (the connection may carry the next request)."""

    __slots__ = ("_buf", "_head_only", "_keep_alive", "_on_data", "_on_head", "_remaining", "_state",
                 "status", "trailing", "upgraded")

    def __init__(self, method: str, on_head, on_data) -> None:
        self._buf = bytearray()
        self._head_only = method == "HEAD"
        self._keep_alive = False
        self._on_head = on_head
        self._on_data = on_data
        self._remaining = 0
        self._state = _HEAD
        self.status = 0
        self.trailing = b""
        self.upgraded = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def reusable(self) -> bool:
        return self._state == _DONE and self._keep_alive and not self.upgraded and not self._buf

    def feed(self, data: bytes) -> None:
        if not data:
            if self._state == _UNTIL_CLOSE:
                self._state = _DONE
            elif self._state != _DONE:
                raise HTTPProtocolError("the connection closed in the middle of a response")
            return
        if self._state == _DONE:
            self._buf += data  # unexpected bytes after the response: the connection is not reusable
            return
        self._buf += data
        while self._state != _DONE and self._step():
            pass

    # -- the state machine: each step consumes what it can; False when it needs more bytes --
    def _line(self) -> bytes | None:
        i = self._buf.find(b"\r\n")
        if i < 0:
            if len(self._buf) > MAX_HEAD:
                raise HTTPProtocolError("line too long")
            return None
        line = bytes(self._buf[:i])
        del self._buf[:i + 2]
        return line

    def _step(self) -> bool:
        st = self._state
        buf = self._buf
        if st == _HEAD:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    raise HTTPProtocolError(f"response head larger than {MAX_HEAD} bytes")
                return False
            head = bytes(buf[:i])
            del buf[:i + 4]
            self._head(head)
            return True
        if st in (_LENGTH, _CHUNK_DATA, _UNTIL_CLOSE):
            if not buf:
                return False
            take = len(buf) if st == _UNTIL_CLOSE else min(len(buf), self._remaining)
            piece = bytes(buf[:take])
            del buf[:take]
            self._on_data(piece)
            if st != _UNTIL_CLOSE:
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DONE if st == _LENGTH else _CHUNK_END
            return True
        if st == _CHUNK_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise HTTPProtocolError("chunk data not followed by CRLF")
            del buf[:2]
            self._state = _CHUNK_SIZE
            return True
        line = self._line()
        if line is None:
            return False
        if st == _CHUNK_SIZE:
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or not all(c in _HEX for c in size) or len(size) > 16:
                raise HTTPProtocolError(f"bad chunk size line {line[:40]!r}")
            self._remaining = int(size, 16)
            self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        elif not line:  # _TRAILERS: the blank line ends the message (trailer fields are ignored)
            self._state = _DONE
        return True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise HTTPProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep or not name or raw[:1] in (b" ", b"\t") or not all(c in _TOKEN for c in name):
                raise HTTPProtocolError(f"bad header line {raw[:80]!r}")
            key = name.decode("ascii").lower()
            v = value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {v}" if key in headers else v
        if 100 <= status < 200:
            if status != 101:
                return  # 100 Continue and friends: the final response follows
            self.status = 101
            self.upgraded = True
            self.trailing = bytes(self._buf)
            self._buf.clear()
            self._state = _DONE
            self._on_head(status, headers)
            return
        self.status = status
        conn = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self._keep_alive = parts[0] == b"HTTP/1.1" and "close" not in conn
        te = headers.get("transfer-encoding")
        if self._head_only or status in (204, 304):
            self._state = _DONE
        elif te is not None:
            if te.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
        elif "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            if len(values) != 1 or not next(iter(values)).isascii() or not next(iter(values)).isdigit():
                raise HTTPProtocolError(f"bad Content-Length {headers['content-length']!r}")
            self._remaining = int(values.pop())
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False
        self._on_head(status, headers)
