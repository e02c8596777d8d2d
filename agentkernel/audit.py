"""Append-only audit log of lifecycle and exec events: JSON lines, rotated by size.

Each event is one ``write(2)`` of one line to a file opened with O_APPEND, so concurrent writers
(CLI processes, the daemon) never interleave within a line. When the file passes ``MAX_BYTES`` it is
rotated (audit.jsonl -> audit.jsonl.1 -> ... -> .KEEP) under an exclusive flock so two processes
cannot rotate at once. ``AGENTKERNEL_AUDIT=0`` disables logging.

A long-lived process serving many runs (the daemon) may ``defer()`` its events: they are collected on
its event loop and written by ``flush()`` when its ``schedule`` says (the daemon: 5 ms after the first of a
batch), many lines in one ``write(2)`` (still whole lines, O_APPEND), instead of an open/write/close per
event.
"""

from __future__ import annotations

import os
import time
from _json import encode_basestring_ascii as _quote
from _json import make_encoder as _c_make_encoder
from _thread import get_ident  # not threading: the CLI's warm path imports little

from . import paths

MAX_BYTES = 10 * 1024 * 1024
KEEP = 5


def enabled() -> bool:
    return os.environ.get("AGENTKERNEL_AUDIT", "1").lower() not in ("0", "false", "no", "off")


_deferred: list[bytes] = []
_defer_thread: int | None = None  # the thread whose events wait for flush() (None: none do)
_schedule = None  # called when the first deferred event of a batch arrives


def defer(schedule) -> None:
    """From now on, events logged on this thread wait in memory until ``flush()``; ``schedule()`` is
    called when the first one of a batch arrives (e.g. ``lambda: loop.call_soon(audit.flush)``).
    ``defer(None)`` writes what is waiting and logs directly again."""
    global _defer_thread, _schedule
    if schedule is None:
        _defer_thread = _schedule = None
        flush()
        return
    _defer_thread, _schedule = get_ident(), schedule


def log(event: str, **fields: object) -> None:
    """Record one event. Never raises: auditing must not break the operation it records."""
    if not enabled():
        return
    try:
        entry = {"ts": round(time.time(), 6), "event": event, "pid": os.getpid(), "uid": os.getuid()}
        entry.update(fields)
        try:
            text = "".join(_encode(entry, 0))
        except (TypeError, ValueError):  # a key JSON cannot carry, a NaN: the slow, forgiving way
            from ._fastjson import dumps

            text = dumps(_plain(entry))
        line = (text + "\n").encode()
        if _defer_thread is not None and get_ident() == _defer_thread:
            _deferred.append(line)
            if len(_deferred) == 1:
                try:
                    _schedule()
                except RuntimeError:  # the loop is closed: nothing would flush
                    flush()
            return
        _write(line)
    except (OSError, TypeError, ValueError):  # a NaN is not JSON either
        pass


def flush() -> None:
    """Write the deferred events (one write). Never raises."""
    if not _deferred:
        return
    data = b"".join(_deferred)
    _deferred.clear()
    try:
        _write(data)
    except OSError:
        pass


def _write(data: bytes) -> None:
    path = paths.audit_path()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        _rotate(path)


# CPython's C JSON encoder (what json.dumps uses), without importing json (its import costs ~5 ms on every
# audited CLI run): compact, ASCII, and str() of anything JSON cannot carry (json.dumps(default=str))
_encode = _c_make_encoder(None, str, _quote, None, ":", ",", False, False, False)


def _plain(o: object) -> object:
    """Anything JSON cannot carry becomes its str() (as json.dumps(default=str) would)."""
    if o is None or isinstance(o, bool | int | float | str):
        return o
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    return str(o)


def _rotate(path: str) -> None:
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.getsize(path) <= MAX_BYTES:  # someone else rotated meanwhile
                return
        except OSError:
            return
        for i in range(KEEP - 1, 0, -1):
            src = f"{path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{path}.{i + 1}")
        os.replace(path, f"{path}.1")


def read(sandbox: str | None = None, last: int | None = None) -> list[dict]:
    """Events from the current file (newest last), optionally for one sandbox name or id."""
    import json

    out = []
    try:
        with open(paths.audit_path()) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if sandbox is None or sandbox in (e.get("sandbox"), e.get("name"), e.get("id")):
                    out.append(e)
    except OSError:
        return []
    return out[-last:] if last else out
