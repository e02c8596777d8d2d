"""Repeated lifecycles with statistics (the reference's tests/benchmark_test.rs), per backend.

- ``BENCH_ITERATIONS`` iterations (default 10) of ``BENCH_SANDBOXES`` (default 10) parallel CLI
  lifecycles (at most ``BENCH_MAX_CONCURRENT`` in flight): total wall, success rate, average per
  operation, p50/p95/p99 of the whole lifecycle, sandboxes/s; then a pooled phase per iteration
  (``BENCH_SANDBOXES`` x ``agentkernel run`` through the daemon): min/max/avg/p50/p95/p99, commands/s.
  Without --quick a 5 x 2 configuration runs first as well (the reference's "10 cycles, 5x2" table);
  the configured one fills its "100 cycles, 10x10" table.
- **single**: ``single_iterations`` (5) lifecycles one after the other (the reference's "Single
  sandbox lifecycle" table: create, start, exec, stop, total).
- a leak check after each backend, as in the stress suite.
"""

from __future__ import annotations

from .. import leaks, stats
from ..harness import BenchContext, BenchDaemon, Sample
from .concurrency import batch
from .headline import ours_warm
from .lifecycle_common import cli_lifecycle, parallel_lifecycles, record_ops, run_per_backend, summarize_rows

SUITE = "lifecycle"


def configs(ctx: BenchContext) -> list[tuple[int, int]]:
    cfg = ctx.cfg
    main = (cfg.bench_sandboxes, cfg.bench_iterations)
    out = [] if cfg.quick else [(5, 2)]
    if main not in out:
        out.append(main)
    return out


def run(ctx: BenchContext) -> None:
    run_per_backend(ctx, SUITE, run_backend)


def run_backend(ctx: BenchContext, backend: str) -> None:
    cfg = ctx.cfg
    scope = leaks.LeakScope.for_context(ctx)
    base = leaks.snapshot(scope)
    out: dict = {"available": True, "reason": None, "runs": []}
    tag = ctx.run_id[-6:]
    # single sandbox, sequential
    single = []
    st = ctx.progress.stage(f"lifecycle {backend} single", cfg.single_iterations)
    for i in range(cfg.single_iterations):
        single.append(cli_lifecycle(ctx, backend, f"akbench-lc-{tag}-{backend[:6]}-s{i}"))
        st.advance()
    out["single"] = {**summarize_rows(single, sum(r["total_ms"] or 0 for r in single)), "details": single}
    record_ops(ctx, SUITE, backend, single, prefix="single_")
    for sandboxes, iterations in configs(ctx):
        rows_all: list[dict] = []
        walls: list[float] = []
        st = ctx.progress.stage(f"lifecycle {backend} {sandboxes}x{iterations}", sandboxes * iterations * 2)
        for it in range(iterations):
            names = [f"akbench-lc-{tag}-{backend[:6]}-{sandboxes}x{iterations}-{it}-{i}" for i in range(sandboxes)]
            rows, wall = parallel_lifecycles(ctx, backend, names, cfg.bench_max_concurrent, on_done=st.advance)
            for r in rows:
                r["iteration"] = it
            rows_all += rows
            walls.append(wall)
        summary = summarize_rows(rows_all, sum(walls))
        run = {"sandboxes": sandboxes, "iterations": iterations, "cycles": sandboxes * iterations, **summary,
               "iteration_wall_ms": [round(w, 3) for w in walls], "details": rows_all}
        pooled_samples: list[Sample] = []
        pooled_wall = 0.0
        pool_info: dict = {}
        if "pool" in ctx.features(backend):
            pmin = min(sandboxes, 10)
            d = BenchDaemon(ctx, [backend], pool_min=pmin, pool_max=max(pmin, min(2 * sandboxes, 50)))
            try:
                d.start()
                w = ours_warm(ctx, backend, d)
                m0 = d.metrics(backend)
                for _ in range(iterations):
                    d.wait_ready(backend, timeout=60)
                    samples, wall = batch(ctx, w, sandboxes, cfg.bench_max_concurrent)
                    pooled_samples += samples
                    pooled_wall += wall
                    st.advance(sandboxes)
                m1 = d.metrics(backend)
                pool_info = {"pool_hits": m1["hits"] - m0["hits"], "pool_misses": m1["misses"] - m0["misses"]}
            except Exception as exc:
                pool_info = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                d.stop()
        st.finish()
        name = f"{sandboxes}x{iterations}"
        record_ops(ctx, SUITE, backend, rows_all, prefix=f"{name}_")
        if pooled_samples:
            m = ctx.add_measurement(suite=SUITE, backend=backend, name=f"{name}_pooled",
                                    label=f"{name} pooled run (CLI)", mode="warm", samples=pooled_samples,
                                    image=ctx.image(backend),
                                    extra={"wall_ms": round(pooled_wall, 3), **pool_info})
            okn = m["stats"]["n"]
            run["pooled"] = {"total": len(pooled_samples), "successful": okn, "wall_ms": round(pooled_wall, 3),
                             "min_ms": m["stats"]["min_ms"], "max_ms": m["stats"]["max_ms"],
                             "avg_ms": m["stats"]["mean_ms"], "p50_ms": m["stats"]["p50_ms"],
                             "p95_ms": m["stats"]["p95_ms"], "p99_ms": m["stats"]["p99_ms"],
                             "commands_per_s": stats.per_second(okn, pooled_wall), **pool_info}
        else:
            run["pooled"] = pool_info or None
        out["runs"].append(run)
    rep = leaks.check(scope, base, settle_s=cfg.settle_s, label=f"lifecycle {backend}")
    rep["suite"], rep["backend"] = SUITE, backend
    rep["removed"] = leaks.cleanup(rep, scope)
    ctx.doc["leak_checks"].append(rep)
    out["leak_check"] = {"clean": rep["clean"], "leak_count": rep["leak_count"],
                         "attributed_count": rep["attributed_count"]}
    if not rep["clean"]:
        ctx.progress.note(leaks.format_report(rep))
    ctx.set_result(SUITE, backend, out)
