"""Pull progress: one line on a terminal (layers done/total, bytes, rate), nothing otherwise."""

from __future__ import annotations

import sys
import time


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class PullProgress:
    def __init__(self, image: str, *, enabled: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.image = image
        self.layers_total = 0
        self.layers_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def plan(self, layers_total: int, bytes_total: int) -> None:
        self.layers_total, self.bytes_total = layers_total, bytes_total
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        self._draw()

    def layer_done(self) -> None:
        self.layers_done += 1
        self._draw(force=True)

    def status(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K{self.image}: {text}")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        rate = self.bytes_done / max(now - self.t0, 1e-3)
        self.stream.write(f"\r\x1b[Kpulling {self.image}: layers {self.layers_done}/{self.layers_total}  "
                          f"{_mb(self.bytes_done)}/{_mb(self.bytes_total)}  {_mb(rate)}/s")
        self.stream.flush()

    def done(self, text: str = "") -> None:
        if self.enabled:
            secs = time.monotonic() - self.t0
            self.stream.write(f"\r\x1b[Kpulled {self.image} ({_mb(self.bytes_done)} in {secs:.1f} s){text}\n")
            self.stream.flush()

    def fail(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
