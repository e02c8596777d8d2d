"""The wasm backend's own numbers (the reference's "Hyperlight" table), from ``agentkernel.bench.wasm_bench``:
cold start (new process, compiled module from the disk cache), warm pool acquire, function call, N
concurrent ``echo hello`` runs in-process, sustained runs/s. ``wasm_bench`` returns summaries (median,
mean, p95, p99, min), not per-run samples; they are kept verbatim in ``results.wasm`` and the medians
become single-value measurements (``kind: "summary"``) so ``compare`` sees them. Microsecond figures
are converted to milliseconds in the measurements (``results.wasm`` keeps wasm_bench's own units).
"""

from __future__ import annotations

from ..harness import BenchContext

SUITE = "wasm"


def run(ctx: BenchContext) -> None:
    if "wasm" not in ctx.selected():
        return
    ok, reason = ctx.available("wasm")
    if not ok:
        ctx.set_result(SUITE, "wasm", {"available": False, "reason": reason})
        ctx.add_unavailable(suite=SUITE, backend="wasm", name="cold_start", label="cold start", mode="cold",
                            reason=reason)
        return
    from .. import wasm_bench

    q = ctx.cfg.quick
    steps = [
        ("cold_start", lambda: wasm_bench.cold_start(iterations=3 if q else max(7, ctx.cfg.iterations))),
        ("warm_acquire", lambda: wasm_bench.warm_acquire(samples=2000 if q else 20000)),
        ("function_call", lambda: wasm_bench.function_call(iterations=200 if q else 2000)),
        ("concurrent", lambda: wasm_bench.concurrent(n=ctx.cfg.concurrent_n, trials=2 if q else 7)),
        ("throughput", lambda: wasm_bench.throughput(runs=500 if q else 5000)),
    ]
    daemon_runs = 300 if q else 3000
    steps.append(("daemon_throughput", lambda: _through_daemon(ctx, daemon_runs)))
    st = ctx.progress.stage("wasm metrics", len(steps))
    res: dict = {"available": True, "reason": None}
    for key, fn in steps:
        try:
            res[key] = fn()
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            ctx.error(SUITE, "wasm", f"{key}: {type(exc).__name__}: {exc}")
        st.advance()
    ctx.set_result(SUITE, "wasm", res)

    def single(name: str, label: str, value_ms, mode: str, extra=None) -> None:
        if value_ms is None:
            return
        ctx.add_measurement(suite=SUITE, backend="wasm", name=name, label=label, mode=mode, kind="summary",
                            samples_ms=[value_ms], extra={"source": "wasm_bench (median)", **(extra or {})})

    cs = res.get("cold_start") or {}
    single("cold_start", "cold start in a new process (median, in-process part)",
           (cs.get("cold_start") or {}).get("median_ms"), "cold")
    single("cold_start_process", "cold start, whole new process (median)",
           (cs.get("process_wall") or {}).get("median_ms"), "cold")
    inst = (cs.get("breakdown_median_ms") or {}).get("instantiate_ms")
    single("raw_instantiate", "raw wasmtime instantiate (median)", inst, "raw")
    wa = (res.get("warm_acquire") or {}).get("warm_acquire") or {}
    if wa.get("median_us") is not None:
        single("warm_acquire", "warm pool acquire (median)", wa["median_us"] / 1e3, "warm")
    fc = res.get("function_call") or {}
    for k, label in (("call_warm_instance", "function call on a live instance"),
                     ("call_fresh_pooled_instance", "function call on a fresh pooled instance")):
        v = (fc.get(k) or {}).get("median_us")
        if v is not None:
            single(k, f"{label} (median)", v / 1e3, "warm")
    cc = res.get("concurrent") or {}
    tot = (cc.get("total") or {}).get("median_ms")
    n = cc.get("concurrent_n", ctx.cfg.concurrent_n)
    single("concurrent", f"{n} concurrent echo hello, in-process (wall, median)", tot, "warm",
           {"rps_at_median": cc.get("rps_at_median"), "concurrent_n": cc.get("concurrent_n")})
    tp = res.get("throughput") or {}
    if tp.get("per_run_us") is not None:
        single("sustained_run", "sustained sequential run (per run)", tp["per_run_us"] / 1e3, "warm",
               {"runs_per_s": tp.get("runs_per_s")})
    for conc, d in sorted(((res.get("daemon_throughput") or {}).get("by_concurrency") or {}).items()):
        if d.get("runs_per_s"):
            single(f"daemon_run_c{conc}", f"through the daemon, {conc} client(s): time per run (1 / runs/s)",
                   1e3 / d["runs_per_s"], "warm", {"runs_per_s": d["runs_per_s"], "concurrency": int(conc),
                                                   "latency_p50_ms": (d.get("latency") or {}).get("median_ms")})


def _through_daemon(ctx: BenchContext, runs: int) -> dict:
    """wasm_bench.daemon_throughput against the bench's own daemon, warmed for wasm (a 64-instance pool),
    with 1 and 10 client threads."""
    from .. import wasm_bench
    from ..harness import BenchDaemon

    with BenchDaemon(ctx, ["wasm"], pool_min=64, pool_max=64):
        return {"by_concurrency": {str(c): wasm_bench.daemon_throughput(runs, c) for c in (1, 10)}}
