"""Throughput and concurrency.

- **throughput** (``scripts/stress-test.sh TOTAL CONCURRENCY``; default 100 runs at 10 concurrent):
  ``TOTAL`` new ``agentkernel run -- echo hello`` processes, at most ``CONCURRENCY`` at a time, per
  backend: cold (``--no-daemon``), through the daemon's warm pool (pool min = the concurrency, at most
  20), and the raw engine's plain one-shot (``podman run --rm``, ``docker run --rm``, podman + runsc,
  ``crun run``, a new wasmtime process). Wall time, runs/s, success rate, per-run latencies.
- **concurrency**: ``concurrent_n`` (100) runs all at once (the reference's "100 concurrent" table), the
  same three modes; and **concurrent scale** (5/10/20 sandboxes alive): that many named sandboxes
  created concurrently, started concurrently, counted running, one exec in each in parallel, removed
  (in-process ``SandboxManager``; the columns of the reference's "Concurrent scale" tables).

The batches of one backend run one after the other (cold, raw, warm), not interleaved: each batch
saturates the machine by design.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from .. import stats
from ..harness import BenchContext, BenchDaemon, Cmd, Sample
from . import raw
from .headline import ours_cold, ours_warm

RAW_FOR = {"podman": "raw_podman", "docker": "raw_docker", "gvisor": "raw_podman_runsc", "oci": "raw_crun",
           "wasm": "raw_wasmtime"}


def batch(ctx: BenchContext, cmd: Cmd, total: int, conc: int, timeout: float | None = None
          ) -> tuple[list[Sample], float]:
    """``total`` runs of ``cmd``, ``conc`` at a time: (per-run samples, wall ms). ``timeout``: per run
    (default the harness's)."""
    t0 = time.perf_counter()
    kw = {} if timeout is None else {"timeout": timeout}
    with ThreadPoolExecutor(max_workers=max(1, conc)) as pool:
        futs = [pool.submit(ctx.time_command, cmd.next_argv(), expect=cmd.expect, check=cmd.check, **kw)
                for _ in range(total)]
        samples = [f.result() for f in futs]
    return samples, (time.perf_counter() - t0) * 1e3


def _modes(ctx: BenchContext, suite: str, backend: str, total: int, conc: int, tag: str) -> None:
    ok, reason = ctx.available(backend)
    if not ok:
        ctx.add_unavailable(suite=suite, backend=backend, name=f"{tag}_cold", label=f"{total} runs, {conc} concurrent",
                            mode="cold", reason=reason)
        return
    cmds: list[Cmd] = [ours_cold(ctx, backend)]
    raw_cmds, _ = raw.oneshot_baselines(ctx, backend)
    want = RAW_FOR.get(backend)
    cmds += [c for c in raw_cmds if c.name == want]
    st = ctx.progress.stage(f"{suite} {backend} ({total} runs, {conc} concurrent)", total * (len(cmds) + 1))
    results = []
    for c in cmds:
        samples, wall = batch(ctx, c, total, conc)
        st.advance(total)
        results.append((c, samples, wall, {}))
    if "pool" in ctx.features(backend):
        pmin = min(conc, 20)
        d = BenchDaemon(ctx, [backend], pool_min=pmin, pool_max=max(pmin, min(2 * conc, 100)))
        try:
            d.start()
            w = ours_warm(ctx, backend, d)
            d.wait_ready(backend, timeout=120)
            m0 = d.metrics(backend)
            samples, wall = batch(ctx, w, total, conc)
            m1 = d.metrics(backend)
            hits, misses = m1["hits"] - m0["hits"], m1["misses"] - m0["misses"]
            results.append((w, samples, wall, {"pool_hits": hits, "pool_misses": misses,
                                               "pool_min": d.pool_min, "pool_max": d.pool_max}))
        except Exception as exc:
            ctx.add_unavailable(suite=suite, backend=backend, name=f"{tag}_warm",
                                label=f"{total} runs, {conc} concurrent", mode="warm", reason=f"daemon: {exc}")
        finally:
            d.stop()
    st.finish()
    rows = {}
    for c, samples, wall, extra in results:
        okn = sum(1 for s in samples if s.ok)
        m = ctx.add_measurement(
            suite=suite, backend=backend, name=f"{tag}_{c.name}", label=f"{c.label}: {total} runs, {conc} concurrent",
            mode=c.mode, samples=samples, command=c.argv, image=c.image,
            extra={"wall_ms": round(wall, 3), "total": total, "concurrency": conc,
                   "runs_per_s": stats.per_second(okn, wall), **extra})
        rows[c.name] = m["id"]
    ctx.set_result(suite, f"{backend}:{tag}", {"total": total, "concurrency": conc, "measurements": rows})


def run_throughput(ctx: BenchContext) -> None:
    for backend in ctx.selected():
        try:
            _modes(ctx, "throughput", backend, ctx.cfg.runs_total, ctx.cfg.runs_concurrency, "runs")
        except Exception as exc:
            ctx.error("throughput", backend, f"{type(exc).__name__}: {exc}")


def run_concurrency(ctx: BenchContext) -> None:
    n = ctx.cfg.concurrent_n
    for backend in ctx.selected():
        try:
            _modes(ctx, "concurrency", backend, n, n, f"c{n}")
        except Exception as exc:
            ctx.error("concurrency", backend, f"{type(exc).__name__}: {exc}")
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok or "exec" not in ctx.features(backend):
            ctx.set_result("concurrency", f"{backend}:scale", {"available": False,
                                                               "reason": reason or "no named sandboxes"})
            continue
        try:
            rows = asyncio.run(_scale(ctx, backend))
            ctx.set_result("concurrency", f"{backend}:scale", {"available": True, "reason": None, "rows": rows})
        except Exception as exc:
            ctx.error("concurrency", backend, f"scale: {type(exc).__name__}: {exc}")


async def _timed_all(coros) -> tuple[float, list]:
    t0 = time.perf_counter()
    res = await asyncio.gather(*coros, return_exceptions=True)
    return (time.perf_counter() - t0) * 1e3, res


async def _scale(ctx: BenchContext, backend: str) -> list[dict]:
    from ...backends.base import ExecRequest
    from ...manager import SandboxManager

    spec = ctx.spec_for(backend)
    rows = []
    st = ctx.progress.stage(f"concurrent scale {backend}", len(ctx.cfg.scale_counts))
    for count in ctx.cfg.scale_counts:
        mgr = SandboxManager()
        names = [f"akbench-sc-{ctx.run_id[-6:]}-{count}-{i}" for i in range(count)]
        errors: list[str] = []
        try:
            create_ms, res = await _timed_all([mgr.create(spec.replace(name=n)) for n in names])
            created = [n for n, r in zip(names, res, strict=True) if not isinstance(r, BaseException)]
            errors += [f"create: {r}" for r in res if isinstance(r, BaseException)]
            start_ms, res = await _timed_all([mgr.start(n) for n in created])
            errors += [f"start: {r}" for r in res if isinstance(r, BaseException)]
            states = await asyncio.gather(*(mgr.status(n) for n in created), return_exceptions=True)
            running = [n for n, s in zip(created, states, strict=True) if s == "running"]
            exec_ms, res = await _timed_all([mgr.exec(n, ExecRequest(["echo", "hello"])) for n in running])
            exec_ok = sum(1 for r in res
                          if not isinstance(r, BaseException) and r.exit_code == 0 and r.stdout == b"hello\n")
            errors += [f"exec: {r}" for r in res if isinstance(r, BaseException)]
            remove_ms, res = await _timed_all([mgr.remove(n) for n in created])
            errors += [f"remove: {r}" for r in res if isinstance(r, BaseException)]
            row = {"count": count, "create_ms": round(create_ms, 3), "start_ms": round(start_ms, 3),
                   "running": len(running), "parallel_exec_ms": round(exec_ms, 3), "exec_ok": exec_ok,
                   "remove_ms": round(remove_ms, 3), "create_avg_ms": round(create_ms / count, 3),
                   "errors": list(dict.fromkeys(str(e)[:300] for e in errors))[:5]}
        finally:
            for n in names:  # whatever is left of a failed step
                try:
                    mgr.get(n)
                except Exception:
                    continue
                try:
                    await mgr.remove(n)
                except Exception:
                    pass
            await mgr.aclose()
        rows.append(row)
        for k in ("create", "start", "parallel_exec"):
            ctx.add_measurement(suite="concurrency", backend=backend, name=f"scale{count}_{k}",
                                label=f"{count} sandboxes: {k.replace('_', ' ')} (wall)", mode="inproc", kind="wall",
                                samples_ms=[row[f"{k}_ms"]], image=ctx.image(backend),
                                extra={"count": count, "running": row["running"]})
        st.advance()
    return rows
