"""Speed under sustained load (issue 18), on the default backend (``auto``) with the default daemon:

- suite ``speed``: back-to-back ``agentkernel run -- echo hello`` (runs/s, hit rate), one paced warm run,
  ``serve`` ``/run`` and exec-in-one-sandbox at 10 concurrent, wasm runs through the daemon pipelined on
  one multiplexed connection (next to the same runs in-process), oci cold in a new process, and a daemon
  holding ``SPEED_LIVE`` (default 200) live pooled sandboxes (RSS, fds, PSS per member); every latency
  sits next to the interpreter floor measured in the same run;
- suite ``soak``: ``SOAK_S`` seconds (default 3600; ``--quick`` 20) of mixed run/exec/cp at
  ``SOAK_CONCURRENCY`` (default 10), a per-second series (throughput, p50/p99, pool hit rate, daemon
  RSS) for the chart, and the leak check plus daemon RSS/fds before and after; on the default backend,
  or on each backend ``--backends`` names (one soak after the other).
"""

from __future__ import annotations

import os
import sys
import time

from .. import leaks, sustained
from ..harness import BenchContext, BenchDaemon


def _env_num(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _default_backend(ctx: BenchContext) -> str:
    from ...backends.auto import resolve
    from ...config import default_spec_for

    return resolve(default_spec_for)


SPEED_ROWS = ("back_to_back", "serve", "wasm_pipelined", "oci_cold", "live")  # back_to_back includes "paced"


def speed_rows() -> list[str]:
    """The rows ``SPEED_ROWS`` (env, comma-separated; ``agentkernel bench --speed-rows``) selects; all by default."""
    want = [r.strip() for r in os.environ.get("SPEED_ROWS", "").split(",") if r.strip()]
    bad = [r for r in want if r not in SPEED_ROWS]
    if bad:
        raise ValueError(f"unknown speed row(s) {', '.join(bad)} (known: {', '.join(SPEED_ROWS)})")
    return want or list(SPEED_ROWS)


def run_speed(ctx: BenchContext) -> None:
    q = ctx.cfg.quick
    rows = speed_rows()
    backend = _default_backend(ctx)
    cli = sustained.launcher_argv()  # this code's CLI (the installed launcher may run another checkout)
    res: dict = {"backend": backend, "cli": "launcher form (python -S) of the running package"}
    steps = [("back_to_back", lambda: _warm(ctx, backend, res, cli)),
             ("serve", lambda: _serve(ctx, res)),
             ("wasm_pipelined", lambda: _wasm(ctx, res)),
             ("oci_cold", lambda: res.__setitem__("oci_cold", sustained.cold(
                 cli, "oci", 5 if q else 30, python=sys.executable, env=ctx.env))),
             ("live", lambda: _live(ctx, backend, res))]
    steps = [(key, fn) for key, fn in steps if key in rows]
    st = ctx.progress.stage(f"speed under load ({backend})", len(steps))
    for key, fn in steps:
        if key == "wasm_pipelined" and not ctx.available("wasm")[0]:
            res[key] = {"available": False, "reason": ctx.available("wasm")[1]}
        elif key == "oci_cold" and not ctx.available("oci")[0]:
            res[key] = {"available": False, "reason": ctx.available("oci")[1]}
        else:
            try:
                fn()
            except Exception as exc:
                res[key] = {"error": f"{type(exc).__name__}: {exc}"}
                ctx.error("speed", backend, f"{key}: {type(exc).__name__}: {exc}")
        st.advance()
    ctx.set_result("speed", "default", res)


def _warm(ctx: BenchContext, backend: str, res: dict, cli: list[str]) -> None:
    q = ctx.cfg.quick
    with BenchDaemon(ctx, [backend], pool_min=2, pool_max=32):  # the default daemon's pool sizes
        res["back_to_back"] = sustained.back_to_back(cli, 20 if q else 200, python=sys.executable, env=ctx.env)
        time.sleep(2.0)
        res["paced"] = sustained.paced(cli, 5 if q else 30, python=sys.executable, env=ctx.env)


def _serve(ctx: BenchContext, res: dict) -> None:
    from .. import api_bench

    res.update(api_bench.serve_speed(ctx.cfg.quick))


def _wasm(ctx: BenchContext, res: dict) -> None:
    from .. import wasm_bench

    q = ctx.cfg.quick
    runs = 300 if q else 5000
    with BenchDaemon(ctx, ["wasm"], pool_min=64, pool_max=64):
        res["wasm_pipelined"] = wasm_bench.daemon_pipelined(runs, 64)
        res["wasm_per_connection"] = wasm_bench.daemon_throughput(runs // 3, 1)
    res["wasm_in_process"] = wasm_bench.throughput(runs=runs)  # the same runs without the daemon, same machine


def _live(ctx: BenchContext, backend: str, res: dict) -> None:
    n = int(_env_num("SPEED_LIVE", 10 if ctx.cfg.quick else 200))
    with BenchDaemon(ctx, [backend], pool_min=n, pool_max=n) as d:
        d.wait_ready(timeout=600)
        res["live"] = sustained.live(n, wait_s=60, backend=backend, runtime_dir=ctx.runtime_dir)


def run_live(ctx: BenchContext) -> None:
    """Suite ``live``: for each selected backend with a warm pool, a daemon holding ``SPEED_LIVE`` (default
    200, ``--quick`` 10) live pooled sandboxes: fill time, daemon RSS/fds, PSS and cgroup memory per idle
    member; then the leak check (the daemon stopped)."""
    n = int(_env_num("SPEED_LIVE", 10 if ctx.cfg.quick else 200))
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok or "pool" not in ctx.features(backend):
            ctx.set_result("live", backend, {"available": False, "reason": reason or "no warm pool"})
            continue
        scope = leaks.LeakScope.for_context(ctx)
        base = leaks.snapshot(scope)
        st = ctx.progress.stage(f"live {backend} ({n} pooled sandboxes)", 1)
        d = BenchDaemon(ctx, [backend], pool_min=n, pool_max=n)
        try:
            with d:
                d.wait_ready(timeout=900)
                result = {"available": True, **sustained.live(n, wait_s=60, backend=backend,
                                                              runtime_dir=ctx.runtime_dir)}
                result["daemon_start_to_ready_ms"] = d.ready_ms
            result["daemon_stop_s"], result["daemon_exited"] = d.stop_s, d.exited
        except Exception as exc:
            ctx.error("live", backend, f"{type(exc).__name__}: {exc}")
            result = {"available": True, "error": f"{type(exc).__name__}: {exc}"}
        st.advance()
        st.finish()
        rep = leaks.check(scope, base, settle_s=ctx.cfg.settle_s, label=f"live {backend}")
        rep["suite"], rep["backend"] = "live", backend
        rep["removed"] = leaks.cleanup(rep, scope)
        ctx.doc["leak_checks"].append(rep)
        result["leak_check"] = {"clean": rep["clean"], "leak_count": rep["leak_count"]}
        ctx.set_result("live", backend, result)


def run_soak(ctx: BenchContext) -> None:
    if not ctx.cfg.backends_named:
        _soak_one(ctx, _default_backend(ctx))
        return
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok:
            ctx.set_result("soak", backend, {"available": False, "reason": reason})
            continue
        _soak_one(ctx, backend)


def _soak_one(ctx: BenchContext, backend: str) -> None:
    duration = _env_num("SOAK_S", 20 if ctx.cfg.quick else 3600)
    conc = int(_env_num("SOAK_CONCURRENCY", 10))
    scope = leaks.LeakScope.for_context(ctx)
    base = leaks.snapshot(scope)
    st = ctx.progress.stage(f"soak {backend} ({duration:.0f} s at {conc} concurrent)", 1)
    try:
        with BenchDaemon(ctx, [backend], pool_min=2, pool_max=32):
            result = sustained.soak(ctx.spec_for(backend), duration, conc)
    except Exception as exc:
        ctx.error("soak", backend, f"{type(exc).__name__}: {exc}")
        result = {"error": f"{type(exc).__name__}: {exc}"}
    st.advance()
    rep = leaks.check(scope, base, settle_s=ctx.cfg.settle_s, label=f"soak {backend}")
    rep["suite"], rep["backend"] = "soak", backend
    ctx.doc["leak_checks"].append(rep)
    result["backend"] = backend
    result["leak_check"] = {"clean": rep["clean"], "leak_count": rep["leak_count"],
                            "categories": sorted({x.get("category", "?") for x in rep["leaks"]})}
    if rep["leaks"]:
        leaks.cleanup(rep, scope)
    ctx.set_result("soak", backend, result)
