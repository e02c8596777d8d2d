"""One named-sandbox lifecycle through the CLI, as a user (or the reference's stress test) runs it:
``agentkernel create NAME --backend B``, ``start NAME``, ``exec NAME -- echo hello`` (stdout must be
exactly ``hello\\n``), ``stop NAME``, ``rm NAME``; each a new process, each timed. A failed step ends the
lifecycle (the rest are not timed) but ``rm`` is always attempted so nothing is left behind."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import stats
from ..harness import HELLO, RUN_TIMEOUT_S, BenchContext

OPS = ("create", "start", "exec", "stop", "remove")


def run_per_backend(ctx: BenchContext, suite: str, run_backend) -> None:
    """``run_backend(ctx, backend)`` for each selected backend that has named sandboxes; the others get an
    "unavailable" result, and a backend that raises gets an error, not the whole suite."""
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok or "exec" not in ctx.features(backend):
            ctx.set_result(suite, backend, {"available": False, "reason": reason or "no named sandboxes"})
            continue
        try:
            run_backend(ctx, backend)
        except Exception as exc:
            ctx.error(suite, backend, f"{type(exc).__name__}: {exc}")


def _any_output(_out: bytes) -> bool:
    return True


def cli_lifecycle(ctx: BenchContext, backend: str, name: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """``timeout``: how long one step may take before the bench gives up on it (kills the CLI)."""
    steps = [
        ("create", ctx.ak("create", name, "--backend", backend), None),
        ("start", ctx.ak("start", name), None),
        ("exec", ctx.ak("exec", name, "--", "echo", "hello"), HELLO),
        ("stop", ctx.ak("stop", name), None),
        ("remove", ctx.ak("rm", name), None),
    ]
    row: dict[str, Any] = {"name": name, **{f"{op}_ms": None for op in OPS}, "total_ms": None,
                           "output_correct": False, "success": False, "error": None}
    t0 = time.perf_counter()
    removed = False
    for op, argv, expect in steps:
        s = ctx.time_command(argv, expect=expect or b"", check=None if expect else _any_output, timeout=timeout)
        row[f"{op}_ms"] = round(s.ms, 3) if s.ms is not None else None
        if op == "exec":
            row["output_correct"] = s.ok
        if not s.ok:
            row["error"] = f"{op}: {s.error}"
            break
        if op == "remove":
            removed = True
    else:
        row["success"] = True
    row["total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    if not removed:
        ctx.run_quiet(ctx.ak("rm", name), timeout=max(timeout, RUN_TIMEOUT_S))
    return row


def parallel_lifecycles(ctx: BenchContext, backend: str, names: list[str], conc: int, on_done=None,
                        timeout: float = RUN_TIMEOUT_S) -> tuple[list[dict[str, Any]], float]:
    def one(n: str) -> dict[str, Any]:
        r = cli_lifecycle(ctx, backend, n, timeout)
        if on_done:
            on_done()
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(conc, len(names)))) as pool:
        rows = list(pool.map(one, names))
    return rows, (time.perf_counter() - t0) * 1e3


def avg(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None and r.get("success")]
    return round(stats.mean(xs), 3) if xs else None


def summarize_rows(rows: list[dict[str, Any]], wall_ms: float) -> dict[str, Any]:
    ok = [r for r in rows if r["success"]]
    totals = [r["total_ms"] for r in ok]
    s = stats.summarize(totals)
    return {
        "count": len(rows),
        "successful": len(ok),
        "failed": len(rows) - len(ok),
        "success_rate": stats.success_rate(len(ok), len(rows)),
        "wall_ms": round(wall_ms, 3),
        **{f"avg_{op}_ms": avg(rows, f"{op}_ms") for op in OPS},
        "avg_lifecycle_ms": s["mean_ms"],
        "p50_ms": s["p50_ms"], "p95_ms": s["p95_ms"], "p99_ms": s["p99_ms"],
        "max_start_ms": max((r["start_ms"] for r in ok if r["start_ms"] is not None), default=None),
        "sandboxes_per_s": stats.per_second(len(ok), wall_ms),
        "errors": list(dict.fromkeys(r["error"] for r in rows if r["error"]))[:10],
    }


def record_ops(ctx: BenchContext, suite: str, backend: str, rows: list[dict[str, Any]], prefix: str = "") -> None:
    """Per-op latency measurements from lifecycle rows (successful lifecycles only, failures counted)."""
    from ..harness import Sample

    fails = [Sample(False, None, r["error"]) for r in rows if not r["success"]]
    for op in (*OPS, "total"):
        key = f"{op}_ms"
        samples = [Sample(True, r[key]) for r in rows if r["success"] and r.get(key) is not None] + fails
        ctx.add_measurement(suite=suite, backend=backend, name=f"{prefix}{op if op != 'total' else 'lifecycle'}",
                            label=f"{prefix.replace('_', ' ')}{op if op != 'total' else 'full lifecycle'} (CLI)",
                            mode="cli", samples=samples, image=ctx.image(backend))
