"""Measuring functions for the wasm backend (the seed's "Hyperlight" table). No CLI: the benchmark suite
calls these and records the dicts. Times are in milliseconds (``*_ms``) or microseconds (``*_us``).

- ``cold_start()``   a new Python process: import, engine, module from the on-disk compiled cache,
                     instantiate, run ``echo hello`` (the one-shot ``agentkernel run --backend wasm``
                     minus the CLI's own start-up); also the whole process wall time.
- ``warm_acquire()`` ``InstancePool.acquire()`` (a list pop) in-process.
- ``function_call()`` an exported function: on a live instance, and on a fresh pooled instance.
- ``concurrent()``   N concurrent ``echo hello`` runs through the backend's async ``run()`` (worker
                     threads, as in the daemon) with a warm pool; total wall time and runs/second.
- ``throughput()``   sustained runs/second over many sequential runs with the pool refilling.
- ``all_metrics()``  all of the above in one dict.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

_FUNCS_WAT = """(module
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1))))"""


def _summary(samples: list[float], unit: str) -> dict[str, Any]:
    s = sorted(samples)
    n = len(s)
    return {
        f"median_{unit}": round(statistics.median(s), 3),
        f"mean_{unit}": round(statistics.fmean(s), 3),
        f"p95_{unit}": round(s[min(n - 1, int(n * 0.95))], 3),
        f"p99_{unit}": round(s[min(n - 1, int(n * 0.99))], 3),
        f"min_{unit}": round(s[0], 3),
        "samples": n,
    }


def _meta() -> dict[str, Any]:
    from ..wasm.cache import wasmtime_version

    return {"backend": "wasm", "engine": f"wasmtime {wasmtime_version().split('-')[0]}", "host": os.uname().nodename,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _aksh() -> str:
    from ..wasm.shell import aksh_path

    return aksh_path()


_COLD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import wasmtime
from agentkernel.wasm import runtime as rt
t1 = time.perf_counter()
rt.get_engine(False)
t2 = time.perf_counter()
lm = rt.load_module(sys.argv[1], name="aksh")
t3 = time.perf_counter()
p = rt.prepare(lm, 512 << 20, rt.FsPlan("scratch", workdir="/workspace"))
t4 = time.perf_counter()
r = rt.run_prepared(p, ["echo", "hello"], {"PWD": "/workspace"})
t5 = time.perf_counter()
p.discard()
assert r.exit_code == 0 and r.stdout == b"hello\n", (r.exit_code, r.stdout, r.stderr)
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "engine_ms": (t2 - t1) * 1e3, "load_ms": (t3 - t2) * 1e3,
                  "instantiate_ms": (t4 - t3) * 1e3, "run_ms": (t5 - t4) * 1e3, "total_ms": (t5 - t0) * 1e3,
                  "source": lm.source}))
"""


def cold_start(iterations: int = 7) -> dict[str, Any]:
    """Cold start in a new process each time (compiled module loaded from the disk cache)."""
    aksh = _aksh()
    # make sure the artifact is in the cache (the first compile is not what we measure)
    subprocess.run([sys.executable, "-c", _COLD_CHILD, aksh], check=True, capture_output=True)
    inproc: list[float] = []
    wall: list[float] = []
    parts: dict[str, list[float]] = {}
    for _ in range(iterations):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _COLD_CHILD, aksh], check=True, capture_output=True, text=True)
        wall.append((time.perf_counter() - t0) * 1e3)
        d = json.loads(out.stdout)
        inproc.append(d["total_ms"])
        for k in ("import_ms", "engine_ms", "load_ms", "instantiate_ms", "run_ms"):
            parts.setdefault(k, []).append(d[k])
        assert d["source"] == "disk"
    return {
        "cold_start": _summary(inproc, "ms"),
        "breakdown_median_ms": {k: round(statistics.median(v), 3) for k, v in parts.items()},
        "process_wall": _summary(wall, "ms"),
        "what": "new process: import wasmtime + engine + compiled aksh from the disk cache + instantiate "
                "+ run `echo hello` (process_wall adds interpreter start-up)",
        **_meta(),
    }


def warm_acquire(samples: int = 20000, pool_size: int = 256) -> dict[str, Any]:
    """InstancePool.acquire() timed one call at a time with perf_counter_ns (timer overhead included)."""
    from ..wasm import runtime as rt
    from ..wasm.pool import InstancePool

    pool = InstancePool(rt.load_module(_aksh(), name="aksh"), size=pool_size,
                        fs=rt.FsPlan("scratch", workdir="/workspace")).start_sync()
    ns = time.perf_counter_ns
    overhead = []
    for _ in range(2000):
        a = ns()
        overhead.append(ns() - a)
    timer_ns = statistics.median(overhead)
    got: list[float] = []
    try:
        while len(got) < samples:
            while pool.stats()["ready"] < pool_size:
                time.sleep(0.005)
            batch = []
            for _ in range(min(pool_size - 8, samples - len(got))):
                a = ns()
                p = pool.acquire()
                got.append((ns() - a) / 1e3)
                batch.append(p)
            for p in batch:
                pool.release(p)
        st = pool.stats()
    finally:
        pool.close()
    return {"warm_acquire": _summary(got, "us"), "timer_overhead_us": round(timer_ns / 1e3, 3),
            "misses": st["misses"], "pool_size": pool_size, **_meta()}


def function_call(iterations: int = 2000) -> dict[str, Any]:
    """Calling an exported function: on a live instance (pure call) and on a fresh pooled instance
    (acquire + set up WASI + call + read the result)."""
    import wasmtime

    from ..wasm import runtime as rt
    from ..wasm.pool import InstancePool

    loaded = rt.load_module(data=wasmtime.wat2wasm(_FUNCS_WAT), name="funcs")
    p = rt.prepare(loaded, 64 << 20, rt.FsPlan(None))
    p.store.set_epoch_deadline(1 << 40)
    add = p.instance.exports(p.store)["add"]
    warm: list[float] = []
    for i in range(iterations):
        a = time.perf_counter_ns()
        v = add(p.store, i, 1)
        warm.append((time.perf_counter_ns() - a) / 1e3)
        assert v == i + 1
    p.discard()
    pool = InstancePool(loaded, size=256, memory_bytes=64 << 20).start_sync()
    fresh: list[float] = []
    try:
        for i in range(iterations):
            if pool.stats()["ready"] < 16:
                time.sleep(0.02)
            a = time.perf_counter_ns()
            r = pool.run_sync(["add"], func="add", func_args=[str(i), "2"])
            fresh.append((time.perf_counter_ns() - a) / 1e3)
            assert r.stdout == f"{i + 2}\n".encode()
    finally:
        pool.close()
    return {"call_warm_instance": _summary(warm, "us"), "call_fresh_pooled_instance": _summary(fresh, "us"),
            **_meta()}


def concurrent(n: int = 100, trials: int = 7, pool_size: int = 256) -> dict[str, Any]:
    """n concurrent `echo hello` runs through WasmBackend.run (asyncio, worker threads, warm pool)."""
    import asyncio

    from ..backends.base import ExecRequest
    from ..backends.wasm import WasmBackend
    from ..spec import SandboxSpec

    async def go() -> tuple[list[float], dict[str, Any]]:
        b = WasmBackend()
        b.inline = False  # as in the daemon: guests on worker threads, never on the event loop
        spec = SandboxSpec(backend="wasm")
        pool = await b.start_pool(spec, size=pool_size)
        walls = []
        for _ in range(trials):
            while pool.stats()["ready"] < pool_size:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            rs = await asyncio.gather(*[b.run(spec, ExecRequest(["echo", "hello"]), sandbox_id="bench", owner={})
                                        for _ in range(n)])
            walls.append((time.perf_counter() - t0) * 1e3)
            assert all(r.exit_code == 0 and r.stdout == b"hello\n" for r in rs)
        st = pool.stats()
        await b.aclose()
        return walls, st

    walls, st = asyncio.run(go())
    med = statistics.median(walls)
    return {"concurrent_n": n, "total": _summary(walls, "ms"), "rps_at_median": round(n / (med / 1e3)),
            "pool_misses": st["misses"], **_meta()}


def throughput(runs: int = 5000, pool_size: int = 64) -> dict[str, Any]:
    """Sustained runs/second: `runs` sequential `echo hello` runs from a pool that refills in the background
    (so instance creation and destruction are included, on the second core where there is one)."""
    from ..wasm import runtime as rt
    from ..wasm.pool import InstancePool

    pool = InstancePool(rt.load_module(_aksh(), name="aksh"), size=pool_size,
                        fs=rt.FsPlan("scratch", workdir="/workspace")).start_sync()
    env = {"PWD": "/workspace"}
    try:
        t0 = time.perf_counter()
        for _ in range(runs):
            r = pool.run_sync(["echo", "hello"], env)
            if r.exit_code != 0:
                raise RuntimeError(f"run failed: {r!r}")
        dt = time.perf_counter() - t0
        st = pool.stats()
    finally:
        pool.close()
    return {"runs": runs, "seconds": round(dt, 3), "runs_per_s": round(runs / dt), "pool_misses": st["misses"],
            "per_run_us": round(dt / runs * 1e6, 1), **_meta()}


def all_metrics() -> dict[str, Any]:
    return {"cold_start": cold_start(), "warm_acquire": warm_acquire(), "function_call": function_call(),
            "concurrent_100": concurrent(), "throughput": throughput()}


def daemon_throughput(runs: int = 2000, concurrency: int = 1) -> dict[str, Any]:
    """Runs/second through a running daemon's wasm pool, without the CLI's process start: ``concurrency``
    client threads, each sending `echo hello` run requests one after another over the daemon protocol
    (a new connection per run, exactly as ``agentkernel run`` does), output checked. The daemon must be
    running with a wasm pool (``agentkernel daemon start --warm wasm``)."""
    import threading

    from ..commands import daemon_client
    from ..daemon import protocol as P
    from ..spec import SandboxSpec

    req = P.oframe(P.REQUEST, {"v": P.PROTOCOL_VERSION, "op": "run", "spec": SandboxSpec(backend="wasm").to_dict(),
                               "argv": ["echo", "hello"], "timeout": None, "stdin": False})
    lat: list[float] = []
    errors: list[str] = []
    per = [runs // concurrency + (1 if i < runs % concurrency else 0) for i in range(concurrency)]

    def one() -> None:
        s = daemon_client.connect()
        if s is None:
            raise RuntimeError("no daemon answers")
        try:
            s.settimeout(30)
            s.sendall(req)
            fr = P.FrameReader()
            out = b""
            while True:
                data = s.recv(1 << 16)
                if not data:
                    raise RuntimeError("the daemon closed the connection before the exit frame")
                for t, payload in fr.feed(data):
                    if t == P.STDOUT:
                        out += payload
                    elif t == P.EXIT:
                        code = P.decode(payload)["exit_code"]
                        if code != 0 or out != b"hello\n":
                            raise RuntimeError(f"exit {code}, stdout {out!r}")
                        return
                    elif t == P.ERROR:
                        raise RuntimeError(P.decode(payload).get("message"))
        finally:
            s.close()

    def worker(n: int) -> None:
        for _ in range(n):
            a = time.perf_counter()
            try:
                one()
            except Exception as exc:
                errors.append(str(exc))
                return
            lat.append((time.perf_counter() - a) * 1e3)

    one()  # the pool for this spec exists and answers
    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed through the daemon: {errors[0]}")
    return {"runs": runs, "concurrency": concurrency, "seconds": round(dt, 3), "runs_per_s": round(runs / dt),
            "latency": _summary(lat, "ms"), **_meta()}


def daemon_pipelined(runs: int = 3000, window: int = 64) -> dict[str, Any]:
    """Runs/second through a running daemon's wasm pool over ONE persistent multiplexed connection
    (``daemon.mux_client``), ``window`` runs in flight (pipelined: each answer submits the next run from
    its done callback, no coroutine per run), output checked. The daemon must be running with a wasm
    pool (``agentkernel daemon start --warm wasm``)."""
    import asyncio

    from ..daemon.mux_client import MuxClient
    from ..spec import SandboxSpec

    spec = SandboxSpec(backend="wasm")
    argv = ["echo", "hello"]
    lat: list[float] = []
    errors: list[str] = []
    perf = time.perf_counter

    async def go() -> float:
        async with await MuxClient.connect() as c:
            await c.run(argv, spec)  # the pool for this spec exists and answers
            done = asyncio.get_running_loop().create_future()
            left = [runs]  # runs still to submit
            finished = [0]

            def submit() -> None:
                left[0] -= 1
                fut = c.submit(argv, spec)
                fut.add_done_callback(lambda f, a=perf(): answered(f, a))

            def answered(f: asyncio.Future, a: float) -> None:
                lat.append((perf() - a) * 1e3)
                if f.cancelled() or f.exception() is not None:
                    errors.append(repr(f.exception()) if not f.cancelled() else "cancelled")
                else:
                    r = f.result()
                    if r["exit_code"] != 0 or r["stdout"] != b"hello\n":
                        errors.append(f"exit {r['exit_code']}, stdout {r['stdout']!r}")
                finished[0] += 1
                if left[0] > 0 and not errors:
                    submit()
                elif (finished[0] == runs or errors) and not done.done():
                    done.set_result(None)

            threads0 = _thread_cpu(c.daemon_pid)
            c0 = time.process_time()
            t0 = perf()
            for _ in range(min(window, runs)):
                submit()
            await done
            dt = perf() - t0
            cpu["client"] = time.process_time() - c0
            cpu["daemon"] = _cpu_delta(threads0, _thread_cpu(c.daemon_pid))
            return dt

    cpu: dict[str, Any] = {}
    dt = asyncio.run(go())
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed through the daemon: {errors[0]}")
    # CPU per run (what bounds the rate on a loaded 2-core machine better than wall time does): the client,
    # the daemon, and the daemon per thread (its event loop is MainThread; the wasm pool's refill thread)
    per_run = {"client_us": round(cpu["client"] / runs * 1e6, 1)}
    if cpu.get("daemon"):
        per_run["daemon_us"] = round(sum(cpu["daemon"].values()) / runs * 1e6, 1)
        per_run["daemon_threads_us"] = {k: round(v / runs * 1e6, 1) for k, v in sorted(cpu["daemon"].items())
                                        if v / runs * 1e6 >= 1}
    return {"runs": runs, "window": window, "seconds": round(dt, 3), "runs_per_s": round(runs / dt),
            "latency": _summary(lat, "ms"), "cpu_per_run": per_run, **_meta()}


def _thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) per thread of process ``pid``, by thread name (Linux /proc; {} elsewhere)."""
    out: dict[str, float] = {}
    if not pid:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        key = "MainThread" if tid == str(pid) else name
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b}
