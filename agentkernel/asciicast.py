"""asciicast v2 recording and replay (https://docs.asciinema.org/manual/asciicast/v2/).

A recording is a JSON header line followed by one JSON line per event: ``[seconds, "o", text]`` for
output, ``[seconds, "i", text]`` for input (only when asked: input may contain secrets), and
``[seconds, "r", "COLSxROWS"]`` for a terminal resize. Every event is written (and flushed) as it
happens, with its real time offset, so a recording cut short by a crash is still a valid prefix.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time
from typing import IO, Any


class Recorder:
    def __init__(self, path: str, *, width: int, height: int, command: str | None = None,
                 title: str | None = None, record_input: bool = False, env: dict[str, str] | None = None) -> None:
        self.path = path
        self.record_input = record_input
        self._f: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        os.chmod(path, 0o600)
        self._t0 = time.monotonic()
        self._dec = {"o": codecs.getincrementaldecoder("utf-8")("replace"),
                     "i": codecs.getincrementaldecoder("utf-8")("replace")}
        header: dict[str, Any] = {"version": 2, "width": int(width), "height": int(height),
                                  "timestamp": int(time.time())}
        if command:
            header["command"] = command
        if title:
            header["title"] = title
        header["env"] = env if env is not None else {k: os.environ[k] for k in ("SHELL", "TERM") if k in os.environ}
        self._write(header)

    def _write(self, obj: Any) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def output(self, data: bytes) -> None:
        text = self._dec["o"].decode(data)
        if text:
            self._write([self._now(), "o", text])

    def input(self, data: bytes) -> None:
        if not self.record_input:
            return
        text = self._dec["i"].decode(data)
        if text:
            self._write([self._now(), "i", text])

    def resize(self, rows: int, cols: int) -> None:
        self._write([self._now(), "r", f"{cols}x{rows}"])

    def close(self) -> None:
        if not self._f.closed:
            tail = self._dec["o"].decode(b"", final=True)
            if tail:
                self._write([self._now(), "o", tail])
            self._f.close()


def load(path: str) -> tuple[dict[str, Any], list[list[Any]]]:
    from .errors import ValidationError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    if not lines:
        raise ValidationError(f"{path} is empty")
    try:
        header = json.loads(lines[0])
        events = [json.loads(ln) for ln in lines[1:]]
    except ValueError as exc:
        raise ValidationError(f"{path} is not an asciicast file: {exc}") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise ValidationError(f"{path}: only asciicast v2 is supported")
    for e in events:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], int | float) and isinstance(e[2], str)):
            raise ValidationError(f"{path}: malformed event {e!r}")
    return header, events


def replay(path: str, *, speed: float = 1.0, max_idle: float | None = 2.0, out: IO[bytes] | None = None,
           sleep=time.sleep) -> int:
    """Write the recording's output events to ``out`` with their timing (divided by ``speed``, each pause
    capped at ``max_idle`` seconds). Returns the number of output events written."""
    header, events = load(path)
    out = out or sys.stdout.buffer
    if max_idle is None:
        max_idle = header.get("idle_time_limit")
    last = 0.0
    n = 0
    for t, kind, data in events:
        if kind != "o":
            continue
        delay = max(0.0, float(t) - last)
        last = float(t)
        if max_idle is not None:
            delay = min(delay, max_idle)
        if speed > 0 and delay > 0:
            sleep(delay / speed)
        out.write(data.encode("utf-8"))
        out.flush()
        n += 1
    return n
