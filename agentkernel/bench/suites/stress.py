"""Stress (the reference's tests/stress_test.rs): ``STRESS_VM_COUNT`` (default 10) sandboxes at once,
at most ``STRESS_MAX_CONCURRENT`` (default 50) in flight, per backend.

- phase 1: each sandbox runs the CLI lifecycle create / start / exec ``echo hello`` / stop / rm (new
  process per step, every step timed, output checked);
- phase 2 (pooled): ``STRESS_VM_COUNT`` x ``agentkernel run -- echo hello`` through the bench daemon's
  warm pool at the same concurrency;
- then the daemon is stopped and the **leak check** runs (nothing of this backend's stress run may be
  left: containers, runtime state, cgroups, processes, journal entries, run dirs, store rows, temp
  dirs). Its report is in ``leak_checks`` (suite ``stress``) and summarised in the stress result;
  leaks attributed to the run are removed after being reported.

A step may take up to ``STEP_TIMEOUT_S`` before the bench gives up on it (kills that CLI process): at
these sizes the engine is overloaded by design, and its calls queue for engine slots
(``backends/_engineslots.py``) rather than fail, so waiting is reported as latency (p50/p95/p99, max
start), not as failure; the timeout only catches a hang.
"""

from __future__ import annotations

from .. import leaks, stats
from ..harness import BenchContext, BenchDaemon
from .concurrency import batch
from .headline import ours_warm
from .lifecycle_common import parallel_lifecycles, record_ops, run_per_backend, summarize_rows

SUITE = "stress"
STEP_TIMEOUT_S = 900.0


def run(ctx: BenchContext) -> None:
    run_per_backend(ctx, SUITE, run_backend)


def run_backend(ctx: BenchContext, backend: str) -> None:
    cfg = ctx.cfg
    n, conc = cfg.stress_count, cfg.stress_concurrency
    scope = leaks.LeakScope.for_context(ctx)
    base = leaks.snapshot(scope)
    st = ctx.progress.stage(f"stress {backend} ({n} sandboxes, {conc} concurrent)", 2 * n)
    names = [f"akbench-st-{ctx.run_id[-6:]}-{backend[:6]}-{i}" for i in range(n)]
    rows, wall = parallel_lifecycles(ctx, backend, names, conc, on_done=st.advance,
                                     timeout=STEP_TIMEOUT_S)
    result = {"available": True, "reason": None, "count": n, "max_concurrent": conc,
              **summarize_rows(rows, wall), "details": rows}
    record_ops(ctx, SUITE, backend, rows)
    pooled = None
    if "pool" in ctx.features(backend):
        pmin = min(n, 10)
        d = BenchDaemon(ctx, [backend], pool_min=pmin, pool_max=max(pmin, min(2 * n, 50)))
        try:
            d.start()
            w = ours_warm(ctx, backend, d)
            m0 = d.metrics(backend)
            samples, pwall = batch(ctx, w, n, conc, timeout=STEP_TIMEOUT_S)
            m1 = d.metrics(backend)
            okn = sum(1 for s in samples if s.ok)
            m = ctx.add_measurement(suite=SUITE, backend=backend, name="pooled_run",
                                    label="pooled agentkernel run (CLI)", mode="warm", samples=samples,
                                    command=w.argv, image=ctx.image(backend),
                                    extra={"wall_ms": round(pwall, 3)})
            pooled = {"total": n, "successful": okn, "failed": n - okn, "wall_ms": round(pwall, 3),
                      "avg_ms": m["stats"]["mean_ms"], "min_ms": m["stats"]["min_ms"], "max_ms": m["stats"]["max_ms"],
                      "p50_ms": m["stats"]["p50_ms"], "p95_ms": m["stats"]["p95_ms"], "p99_ms": m["stats"]["p99_ms"],
                      "commands_per_s": stats.per_second(okn, pwall),
                      "pool_hits": m1["hits"] - m0["hits"], "pool_misses": m1["misses"] - m0["misses"],
                      "errors": m["errors"]}
        except Exception as exc:
            pooled = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            d.stop()
            st.advance(n)
    st.finish()
    result["pooled"] = pooled
    rep = leaks.check(scope, base, settle_s=cfg.settle_s, label=f"stress {backend}")
    rep["suite"], rep["backend"] = SUITE, backend
    rep["removed"] = leaks.cleanup(rep, scope)
    ctx.doc["leak_checks"].append(rep)
    result["leak_check"] = {"clean": rep["clean"], "leak_count": rep["leak_count"],
                            "attributed_count": rep["attributed_count"]}
    if not rep["clean"]:
        ctx.progress.note(leaks.format_report(rep))
    ctx.set_result(SUITE, backend, result)
