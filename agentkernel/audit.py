"""Append-only audit log of lifecycle and exec events: JSON lines, rotated by size.

Each event is one ``write(2)`` of one line to a file opened with O_APPEND, so concurrent writers
(CLI processes, the daemon) never interleave within a line. When the file passes ``MAX_BYTES`` it is
rotated (audit.jsonl -> audit.jsonl.1 -> ... -> .KEEP) under an exclusive flock so two processes
cannot rotate at once. ``AGENTKERNEL_AUDIT=0`` disables logging.
"""

from __future__ import annotations

import os
import time

from . import paths

MAX_BYTES = 10 * 1024 * 1024
KEEP = 5


def enabled() -> bool:
    return os.environ.get("AGENTKERNEL_AUDIT", "1").lower() not in ("0", "false", "no", "off")


def log(event: str, **fields: object) -> None:
    """Record one event. Never raises: auditing must not break the operation it records."""
    if not enabled():
        return
    try:
        from ._fastjson import dumps  # not json: its import costs ~5 ms on every audited CLI run

        path = paths.audit_path()
        entry = {"ts": round(time.time(), 6), "event": event, "pid": os.getpid(), "uid": os.getuid()}
        entry.update(fields)
        line = (dumps(_plain(entry)) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_BYTES:
            _rotate(path)
    except OSError:
        pass


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
