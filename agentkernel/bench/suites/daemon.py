"""Daemon vs ephemeral (the reference's "Daemon mode" table), per backend with a warm pool.

- **first command**: ephemeral = one ``agentkernel run --no-daemon`` right after the daemon of the
  previous block stopped; daemon = the first ``agentkernel run`` once a freshly started daemon reports
  its pool warm (its start-up and warm-up times are reported beside it: ``daemon_start_ms`` until the
  daemon answers, ``daemon_ready_ms`` until its pool is full).
- **subsequent**: ``cfg.iterations`` more of each, interleaved, the daemon idle and full before each.
- **10 sequential**: wall time of 10 back-to-back runs (no waiting: the pool refills only as fast as it
  can, so misses show up here), ``trials`` times; the hit rate is the pool's hits / (hits + misses) over
  those runs (the reference's "VM reuse rate"; our members are never reused, a hit is a pre-started one).
"""

from __future__ import annotations

import time

from ..harness import BenchContext, BenchDaemon, Cmd, Sample
from .headline import ours_cold, ours_warm

SUITE = "daemon"


def run(ctx: BenchContext) -> None:
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok or "pool" not in ctx.features(backend):
            why = reason if not ok else f"backend {backend} has no warm pool"
            ctx.add_unavailable(suite=SUITE, backend=backend, name="subsequent_daemon", label="daemon, subsequent",
                                mode="warm", reason=why)
            continue
        try:
            run_backend(ctx, backend)
        except Exception as exc:
            ctx.error(SUITE, backend, f"{type(exc).__name__}: {exc}")


def _batch(ctx: BenchContext, cmd: Cmd, n: int) -> tuple[Sample, list[Sample]]:
    """n runs back to back: (one Sample for the wall time, the per-run samples)."""
    runs = []
    t0 = time.perf_counter()
    for _ in range(n):
        runs.append(ctx.time_command(cmd.argv, expect=cmd.expect))
    wall = (time.perf_counter() - t0) * 1e3
    ok = all(s.ok for s in runs)
    return Sample(ok, wall, None if ok else next(s.error for s in runs if not s.ok)), runs


def run_backend(ctx: BenchContext, backend: str) -> None:
    cfg = ctx.cfg
    trials = 1 if cfg.quick else 3
    seq = 10
    cold = ours_cold(ctx, backend)
    st = ctx.progress.stage(f"daemon vs ephemeral {backend}", 2 + 2 * cfg.iterations + 2 * trials * seq)
    first_eph = ctx.time_command(cold.argv)
    st.advance()
    daemon = BenchDaemon(ctx, [backend], pool_min=2, pool_max=4)
    daemon.start()
    try:
        warm = ours_warm(ctx, backend, daemon)
        first_d = ctx.time_command(warm.argv)
        st.advance()
        settle = lambda: daemon.wait_ready(backend, timeout=30)  # noqa: E731
        settle()
        cold.before = settle
        warm.before = settle
        m0 = daemon.metrics(backend)
        res = ctx.interleave([cold, warm], cfg.iterations, 0, f"daemon subsequent {backend}")
        m1 = daemon.metrics(backend)
        st.advance(2 * cfg.iterations)
        seq_d: list[Sample] = []
        seq_e: list[Sample] = []
        hits = misses = 0
        for _ in range(trials):
            settle()
            a = daemon.metrics(backend)
            wall, _ = _batch(ctx, warm, seq)
            b = daemon.metrics(backend)
            hits += b["hits"] - a["hits"]
            misses += b["misses"] - a["misses"]
            seq_d.append(wall)
            st.advance(seq)
            settle()
            wall, _ = _batch(ctx, cold, seq)
            seq_e.append(wall)
            st.advance(seq)
    finally:
        daemon.stop(settle=True)
        st.finish()
    img = ctx.image(backend)
    add = ctx.add_measurement
    add(suite=SUITE, backend=backend, name="first_ephemeral", label="ephemeral, first command", mode="cold",
        samples=[first_eph], command=cold.argv, image=img)
    add(suite=SUITE, backend=backend, name="first_daemon", label="daemon, first command", mode="warm",
        samples=[first_d], command=warm.argv, image=img,
        extra={"daemon_start_ms": round(daemon.start_ms or 0, 3), "daemon_ready_ms": round(daemon.ready_ms or 0, 3)})
    add(suite=SUITE, backend=backend, name="subsequent_ephemeral", label="ephemeral, subsequent", mode="cold",
        samples=res["cold"][0], command=cold.argv, image=img)
    sub_hits, sub_misses = m1["hits"] - m0["hits"], m1["misses"] - m0["misses"]
    add(suite=SUITE, backend=backend, name="subsequent_daemon", label="daemon, subsequent", mode="warm",
        samples=res["warm"][0], command=warm.argv, image=img,
        extra={"pool_hits": sub_hits, "pool_misses": sub_misses})
    add(suite=SUITE, backend=backend, name="seq10_ephemeral", label="ephemeral, 10 sequential (wall)", mode="cold",
        kind="wall", samples=seq_e, command=cold.argv, image=img, extra={"runs_per_trial": seq})
    add(suite=SUITE, backend=backend, name="seq10_daemon", label="daemon, 10 sequential (wall)", mode="warm",
        kind="wall", samples=seq_d, command=warm.argv, image=img,
        extra={"runs_per_trial": seq, "pool_hits": hits, "pool_misses": misses})
    ctx.set_result(SUITE, backend, {
        "daemon_start_ms": round(daemon.start_ms or 0, 3),
        "daemon_ready_ms": round(daemon.ready_ms or 0, 3),
        "hit_rate_subsequent": round(sub_hits / (sub_hits + sub_misses), 4) if sub_hits + sub_misses else None,
        "hit_rate_sequential": round(hits / (hits + misses), 4) if hits + misses else None,
        "pool": {"min": daemon.pool_min, "max": daemon.pool_max},
    })
    for a, b in (("first_daemon", "first_ephemeral"), ("subsequent_daemon", "subsequent_ephemeral"),
                 ("seq10_daemon", "seq10_ephemeral")):
        ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/{a}", raw=f"{SUITE}/{backend}/{b}",
                      label=f"{a.replace('_', ' ')} vs {b.replace('_', ' ')}")
