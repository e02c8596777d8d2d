"""``InstancePool``: pre-instantiated, use-once Wasm sandboxes for one module and one configuration.

Each pooled item is a ``runtime.Prepared``: its own Store (memory cap), an instance, a WASI config with
stdout/stderr memfds and, where the plan asks, a fresh scratch directory as ``/``. ``acquire()`` is a
``list.pop()`` (~0.1 us); the caller runs the item once with ``run_prepared`` and hands it back with
``release()``, which only queues it for destruction: nothing of a used instance (memory, files, fds) is
ever seen by another run. A daemon thread refills the pool to ``size`` and destroys released items, so
the event loop never pays for instantiation. A miss (empty pool) prepares an instance inline.

Daemon integration::

    pool = InstancePool(path_or_loaded_module, size=16, memory_bytes=512 << 20, fs=FsPlan("scratch"))
    await pool.start()            # first fill, off the event loop
    p = pool.acquire()            # pop
    try:
        result = run_prepared(p, argv, env, stdin, timeout=...)   # in a worker thread for long runs
    finally:
        pool.release(p)           # destroyed in the background; refill triggered
    pool.stats(); pool.close()
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from .runtime import FsPlan, LoadedModule, Prepared, load_module, prepare, run_prepared

# Used instances waiting for the refill thread to destroy them hold fds (their output memfds and the copies
# wasmtime opened), scratch directories and linear memory. A burst of runs keeps the refill thread backing
# off (``_busy``), and runs from several threads outpace it: measured, 4 threads x 5,000 runs left ~4,000
# in the queue and ~20,000 fds open, which is a daemon's whole fd limit. So the queue is bounded: above
# TRASH_SOFT the refill thread no longer backs off; above TRASH_HARD ``release`` destroys one inline.
TRASH_SOFT = 32
TRASH_HARD = 128


class InstancePool:
    def __init__(self, module: LoadedModule | str, size: int = 8, *, memory_bytes: int | None = 512 << 20,
                 fs: FsPlan | None = None, fuel: bool = False, name: str | None = None,
                 key: str | None = None) -> None:
        if size < 1:
            raise ValueError("pool size must be >= 1")
        self._module_arg = module
        self.loaded: LoadedModule | None = module if isinstance(module, LoadedModule) else None
        self.fuel = fuel
        self.size = size
        self.low_water = max(1, size // 4)
        self.memory_bytes = memory_bytes
        self.fs = fs or FsPlan(None)
        self.name = name or (self.loaded.name if self.loaded else str(module))
        self.key = key or ""
        self._ready: list[Prepared] = []
        self._trash: list[Prepared] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._filled = threading.Event()
        self.misses = 0
        self.released = 0
        self.made = 0
        self.refill_s = 0.0
        self.last_refill_ms = 0.0
        self.errors = 0
        self.last_error: str | None = None

    # -- life cycle --
    def _load(self) -> LoadedModule:
        if self.loaded is None:
            self.loaded = load_module(str(self._module_arg), fuel=self.fuel)
            self.name = self.loaded.name
        return self.loaded

    def start_sync(self) -> InstancePool:
        """Load the module, fill the pool, start the refill thread (blocking)."""
        self._load()
        _shorten_gil_slices()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"ak-wasm-pool-{self.name}", daemon=True)
            self._thread.start()
        self._filled.wait()
        if self.last_error and not self._ready:
            raise RuntimeError(f"wasm pool {self.name}: cannot prepare instances: {self.last_error}")
        return self

    async def start(self) -> InstancePool:
        """Same as start_sync without blocking the event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def work() -> None:
            try:
                self.start_sync()
                loop.call_soon_threadsafe(set_future, fut, None, None)
            except BaseException as exc:  # report to the awaiting coroutine
                loop.call_soon_threadsafe(set_future, fut, None, exc)

        threading.Thread(target=work, name="ak-wasm-pool-start", daemon=True).start()
        await fut
        return self

    def close(self) -> None:
        """Stop refilling and destroy every instance (ready and released)."""
        self._closed = True
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        while self._ready:
            self._ready.pop().discard()
        while self._trash:
            self._trash.pop().discard()

    async def aclose(self) -> None:
        self.close()

    # -- the hot path --
    def acquire(self) -> Prepared:
        """A never-used instance: a list pop (sub-microsecond); prepares one inline on a miss."""
        try:
            return self._ready.pop()
        except IndexError:
            return self._miss()

    def _miss(self) -> Prepared:
        self.misses += 1
        self._wake.set()
        return prepare(self._load(), self.memory_bytes, self.fs)

    def release(self, p: Prepared) -> None:
        """Give back a used instance: it is destroyed (never reused) by the refill thread, or here when the
        queue of used instances is over TRASH_HARD (the refill thread is not keeping up)."""
        self.released += 1
        self._trash.append(p)
        self._wake.set()
        while len(self._trash) > TRASH_HARD:
            try:
                self._trash.pop().discard()
            except IndexError:
                break

    def run_sync(self, argv: list[str], env: dict[str, str] | None = None, stdin: bytes = b"", **kw: Any):
        """acquire + run_prepared + release (convenience for synchronous callers and benchmarks)."""
        p = self.acquire()
        try:
            return run_prepared(p, argv, env, stdin, **kw)
        finally:
            self.release(p)

    # -- background refill --
    def _busy(self) -> bool:
        """True while runs are being served and the pool is not low: refilling now would only compete
        with them for the GIL, so the refill thread backs off (2 ms at a time)."""
        if len(self._ready) <= self.low_water or len(self._trash) >= TRASH_SOFT:
            return False
        seen = self.released + self.misses
        time.sleep(0.002)
        return self.released + self.misses != seen

    def _loop(self) -> None:
        loaded = self._load()
        while not self._closed:
            while not self._closed and self._busy():
                pass
            # destroy used instances, then top up, in small chunks so a new burst is noticed quickly
            for _ in range(8):
                try:
                    self._trash.pop().discard()
                except IndexError:
                    break
            failed = False
            deficit = self.size - len(self._ready)
            if deficit > 0:
                t0 = time.perf_counter()
                for _ in range(min(deficit, 8)):
                    if self._closed:
                        break
                    try:
                        p = prepare(loaded, self.memory_bytes, self.fs)
                    except Exception as exc:  # keep the thread alive; report through stats()
                        self.errors += 1
                        self.last_error = str(exc)
                        failed = True
                        break
                    self._ready.append(p)
                    self.made += 1
                dt = time.perf_counter() - t0
                self.refill_s += dt
                self.last_refill_ms = dt * 1e3
            if not failed and (self._trash or len(self._ready) < self.size):
                continue
            self._filled.set()
            self._wake.wait(0.05 if not failed else 1.0)
            self._wake.clear()

    def status(self) -> dict[str, Any]:
        """The shape of ``agentkernel.pool.WarmPool.status()`` (for the daemon's pool listing)."""
        st = self.stats()
        total = st["hits"] + st["misses"]
        metrics = {"hits": st["hits"], "misses": st["misses"], "cold_starts": st["misses"],
                   "started": st["instances_made"], "destroyed": st["released"] - len(self._trash),
                   "start_failures": st["errors"], "refill_ms_avg": (round(st["refill_us_per_instance"] / 1e3, 3)
                                                                    if st["refill_us_per_instance"] else None),
                   "refill_ms_last": st["refill_ms_last"], "last_error": st["last_error"],
                   "hit_rate": round(st["hits"] / total, 3) if total else None}
        return {"key": self.key, "backend": "wasm", "module": self.name, "ready": st["ready"], "starting": 0,
                "in_use": max(0, st["hits"] + st["misses"] - st["released"]), "config": {"size": self.size},
                "metrics": metrics}

    def stats(self) -> dict[str, Any]:
        taken = self.made - len(self._ready)
        return {
            "module": self.name,
            "size": self.size,
            "ready": len(self._ready),
            "hits": max(0, taken),
            "misses": self.misses,
            "released": self.released,
            "instances_made": self.made,
            "refill_ms_total": round(self.refill_s * 1e3, 3),
            "refill_us_per_instance": round(self.refill_s * 1e6 / self.made, 1) if self.made else None,
            "refill_ms_last": round(self.last_refill_ms, 3),
            "errors": self.errors,
            "last_error": self.last_error,
        }


# The refill thread and the threads serving runs share the GIL, and wasmtime releases it on every call:
# with CPython's default 5 ms switch interval a run coming back from wasmtime waits out the refill thread's
# whole slice. 1 ms measured ~+30% sustained runs/s here (wasm_bench.throughput). The setting is
# process-wide, so it is only ever lowered, never raised.
SWITCH_INTERVAL_S = 0.001


def _shorten_gil_slices() -> None:
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


def set_future(fut: Any, value: Any, exc: BaseException | None) -> None:
    """Complete ``fut`` with ``value`` or ``exc`` unless it is already done (called on its loop)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
