"""The reference's orchestration tables, for the kubernetes and nomad backends, against whatever cluster
is configured (KUBECONFIG / [orchestrator] kubeconfig, NOMAD_ADDR / [orchestrator] nomad_addr; the test
emulators in tests/emulators when started by tests/cluster/test_orchestration_bench.py or
scripts/bench-clusters.sh):

- **lifecycle**: ``single_iterations`` (5) create -> start -> exec ``echo hello`` -> stop+remove cycles
  through the Python API (the reference's "Single sandbox lifecycle" table; its stop deletes the pod/job).
- **one-shot**: ``agentkernel run --backend B -- echo hello`` as new processes.
- **exec throughput**: 50 sequential ``echo hello`` execs in one running sandbox (avg, per second).
- **concurrent scale**: 5, 10, 20 sandboxes created at once: create time, start time, how many run, one
  parallel exec across all of them.

In-process measurements use the default spec with no pids limit (a pod has none; see docs/backends/
clusters.md); the one-shot CLI passes ``-o pod_pids_limit=$AGENTKERNEL_BENCH_POD_PIDS_LIMIT`` to the
kubernetes backend when that is set (the nodes' kubelet podPidsLimit), and is reported unavailable
otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time

from ..harness import HELLO, BenchContext

SUITE = "orchestration"
CLUSTER_BACKENDS = ("kubernetes", "nomad")


def run(ctx: BenchContext) -> None:
    for backend in CLUSTER_BACKENDS:
        if backend not in ctx.selected():
            continue
        ok, reason = ctx.available(backend)
        if not ok:
            ctx.set_result(SUITE, backend, {"available": False, "reason": reason})
            ctx.add_unavailable(suite=SUITE, backend=backend, name="lifecycle_total", label="lifecycle total",
                                mode="cold", reason=reason)
            continue
        try:
            run_backend(ctx, backend)
        except Exception as exc:
            ctx.error(SUITE, backend, f"{type(exc).__name__}: {exc}")


def _spec(backend: str):
    from ...spec import Resources, SandboxSpec

    return SandboxSpec(backend=backend, image=os.environ.get("AGENTKERNEL_BENCH_CLUSTER_IMAGE", "agentkernel/busybox"),
                       resources=Resources(pids=None))


def run_backend(ctx: BenchContext, backend: str) -> None:
    q = ctx.cfg.quick
    res = asyncio.run(_measure(backend, iterations=2 if q else ctx.cfg.single_iterations,
                               execs=10 if q else 50, scales=(5,) if q else (5, 10, 20),
                               progress=ctx.progress))
    res["available"], res["reason"] = True, None
    for op in ("create", "start", "exec", "stop", "total"):
        ctx.add_measurement(suite=SUITE, backend=backend, name=f"lifecycle_{op}", label=f"lifecycle {op}",
                            mode="cold", samples_ms=[r[op] for r in res["lifecycle"]], kind="latency")
    ctx.add_measurement(suite=SUITE, backend=backend, name="exec_sequential", label="sequential exec (one sandbox)",
                        mode="warm", samples_ms=res["exec_sequential"]["samples_ms"],
                        extra={"per_s": res["exec_sequential"]["per_s"]})
    for row in res["scale"]:
        n = row["count"]
        for op in ("create", "start", "parallel_exec"):
            ctx.add_measurement(suite=SUITE, backend=backend, name=f"scale{n}_{op}", label=f"{n} concurrent: {op}",
                                mode="cold", kind="summary", samples_ms=[row[f"{op}_ms"]],
                                extra={"running": row["running"], "count": n})
    # one-shot through the CLI, as the reference measured it
    argv = ctx.ak("run", "--backend", backend)
    pids = os.environ.get("AGENTKERNEL_BENCH_POD_PIDS_LIMIT")
    if backend == "kubernetes":
        if not pids:
            ctx.add_unavailable(suite=SUITE, backend=backend, name="oneshot", label="one-shot run", mode="cold",
                                reason="set AGENTKERNEL_BENCH_POD_PIDS_LIMIT to the nodes' podPidsLimit")
            ctx.set_result(SUITE, backend, res)
            return
        argv += ["-o", f"pod_pids_limit={pids}"]
    argv += ["--", "echo", "hello"]
    n = 2 if q else max(5, ctx.cfg.single_iterations)
    samples = [ctx.time_command(argv, expect=HELLO) for _ in range(n)]
    ctx.add_measurement(suite=SUITE, backend=backend, name="oneshot", label="one-shot run (new process)",
                        mode="cold", samples=samples, command=argv)
    ctx.set_result(SUITE, backend, res)


async def _measure(backend: str, *, iterations: int, execs: int, scales: tuple[int, ...], progress) -> dict:
    from ...backends import get_backend
    from ...backends.base import ExecRequest
    from ...owner import current_owner, new_id

    b = get_backend(backend)
    spec = _spec(backend)
    owner = current_owner()
    out: dict = {"lifecycle": [], "scale": []}
    hello = ExecRequest(["echo", "hello"])
    try:
        st = progress.stage(f"orchestration {backend} lifecycle", iterations)
        for _ in range(iterations):
            t0 = time.perf_counter()
            ref = await b.create(spec, sandbox_id=new_id("akbench"), owner=owner)
            t1 = time.perf_counter()
            try:
                await b.start(ref)
                t2 = time.perf_counter()
                r = await b.exec(ref, hello)
                t3 = time.perf_counter()
                if r.exit_code != 0 or r.stdout != HELLO:
                    raise RuntimeError(f"echo hello gave {r.exit_code} {r.stdout!r} {r.stderr[-200:]!r}")
            finally:
                t4 = time.perf_counter()
                await b.remove(ref)
            t5 = time.perf_counter()
            out["lifecycle"].append({"create": (t1 - t0) * 1e3, "start": (t2 - t1) * 1e3, "exec": (t3 - t2) * 1e3,
                                     "stop": (t5 - t4) * 1e3, "total": (t5 - t0) * 1e3})
            st.advance()
        st.finish()
        # sequential execs in one sandbox
        ref = await b.create(spec, sandbox_id=new_id("akbench"), owner=owner)
        try:
            await b.start(ref)
            samples = []
            t0 = time.perf_counter()
            for _ in range(execs):
                s0 = time.perf_counter()
                r = await b.exec(ref, hello)
                samples.append((time.perf_counter() - s0) * 1e3)
                if r.exit_code != 0:
                    raise RuntimeError(f"exec failed: {r.stderr[-200:]!r}")
            wall = time.perf_counter() - t0
        finally:
            await b.remove(ref)
        out["exec_sequential"] = {"count": execs, "samples_ms": samples, "avg_ms": sum(samples) / len(samples),
                                  "per_s": execs / wall}
        # concurrent scale
        for n in scales:
            out["scale"].append(await _scale(b, spec, owner, n, hello))
    finally:
        await b.aclose()
    return out


async def _scale(b, spec, owner, n: int, hello) -> dict:
    from ...owner import new_id

    t0 = time.perf_counter()
    made = await asyncio.gather(*(b.create(spec, sandbox_id=new_id("akbench"), owner=owner) for _ in range(n)),
                                return_exceptions=True)
    t1 = time.perf_counter()
    refs = [r for r in made if not isinstance(r, BaseException)]
    started = await asyncio.gather(*(b.start(r) for r in refs), return_exceptions=True)
    t2 = time.perf_counter()
    running = [r for r, s in zip(refs, started, strict=True) if not isinstance(s, BaseException)]
    t3 = time.perf_counter()
    results = await asyncio.gather(*(b.exec(r, hello) for r in running), return_exceptions=True)
    t4 = time.perf_counter()
    await asyncio.gather(*(b.remove(r) for r in refs), return_exceptions=True)
    ok = sum(1 for r in results if not isinstance(r, BaseException) and r.exit_code == 0)
    errors = sorted({f"{type(e).__name__}: {e}"[:200] for e in [*made, *started] if isinstance(e, BaseException)})
    return {"count": n, "create_ms": (t1 - t0) * 1e3, "start_ms": (t2 - t1) * 1e3, "running": len(running),
            "parallel_exec_ms": (t4 - t3) * 1e3, "exec_ok": ok, "errors": errors[:5]}
