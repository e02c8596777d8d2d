"""Phases: where the time goes (boot, ready, exec, shutdown), from the backends' own phase timings.

In-process (no CLI start-up in these numbers), per backend:

- **cold**: ``SandboxManager.run`` (``Backend.run``): its ``ExecResult.timings`` give the phases.
  Mapping (first that applies): the backend's own ``boot_ms``/``ready_ms``/``exec_ms``/``shutdown_ms``;
  else ``create_ms`` -> boot, ``start_ms`` -> ready (engine start + the agent answering),
  ``exec_ms`` -> exec, ``remove_ms`` (+ ``stop_ms``) -> shutdown; else (in-process engines such as
  wasm) ``prepare_us``/``acquire_us`` -> ready, the rest of ``total_ms`` -> exec, boot = shutdown = 0.
- **warm**: the daemon's pool in this process (``Daemon.run``, the same code the HTTP API uses): boot 0
  (paid before the request), ready = ``acquire_ms`` (hand-out + health check), exec = the rest,
  shutdown 0 (the member is destroyed in the background, off the request's path).
- **exec in a running sandbox** via the agent (``SandboxManager.exec`` on a started named sandbox) and
  the named lifecycle create / start / exec / stop / remove, each timed around the call.
- **memory per idle instance**: PSS (``/proc/PID/smaps_rollup``) of every host process of one started,
  idle named sandbox (the engine's helper such as conmon or containerd-shim, the agent, runsc's sandbox
  and gofer), in MiB (reported in ``results.phases.<backend>.idle_pss_mib``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ..harness import HELLO, BenchContext, Sample, pool_idle

SUITE = "phases"
PHASES = ("boot", "ready", "exec", "shutdown")


def phases_of(t: dict[str, float]) -> dict[str, float] | None:
    if all(f"{p}_ms" in t for p in PHASES):
        return {p: float(t[f"{p}_ms"]) for p in PHASES}
    if "create_ms" in t and "start_ms" in t:
        return {"boot": float(t["create_ms"]), "ready": float(t["start_ms"]), "exec": float(t.get("exec_ms", 0.0)),
                "shutdown": float(t.get("remove_ms", 0.0)) + float(t.get("stop_ms", 0.0))}
    if "acquire_ms" in t and "total_ms" in t:
        acq = float(t["acquire_ms"])
        return {"boot": 0.0, "ready": acq, "exec": max(0.0, float(t["total_ms"]) - acq), "shutdown": 0.0}
    us = t.get("acquire_us", t.get("prepare_us"))
    if us is not None and "total_ms" in t:
        ready = float(us) / 1e3
        return {"boot": 0.0, "ready": ready, "exec": max(0.0, float(t["total_ms"]) - ready), "shutdown": 0.0}
    return None


def run(ctx: BenchContext) -> None:
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok:
            for mode in ("cold", "warm"):
                ctx.add_unavailable(suite=SUITE, backend=backend, name=f"{mode}_total", label=f"{mode} total",
                                    mode=mode, reason=reason)
            continue
        try:
            asyncio.run(_backend(ctx, backend))
        except Exception as exc:
            ctx.error(SUITE, backend, f"{type(exc).__name__}: {exc}")


def _ok(r) -> bool:
    return r.exit_code == 0 and r.stdout == HELLO


async def _timed_hello(call) -> tuple[float, Any, dict[str, float] | None, str | None]:
    """Await ``call()``, a run of ``echo hello``: (wall ms, its result or None, its phases, the error or
    None). A run without exact output or without phase timings is an error."""
    t0 = time.perf_counter()
    try:
        r = await call()
        err = None if _ok(r) else f"exit {r.exit_code}, stdout {r.stdout[:80]!r}, stderr {r.stderr[-200:]!r}"
    except Exception as exc:
        r, err = None, f"{type(exc).__name__}: {exc}"
    total = (time.perf_counter() - t0) * 1e3
    ph = phases_of(r.timings) if err is None else None
    if err is None and ph is None:
        err = f"no phase timings in {sorted(r.timings)}"
    return total, r, ph, err


async def _backend(ctx: BenchContext, backend: str) -> None:
    from ...backends.base import ExecRequest
    from ...manager import SandboxManager

    cfg = ctx.cfg
    spec = ctx.spec_for(backend)
    n, w = cfg.iterations, cfg.warmup
    st = ctx.progress.stage(f"phases {backend}", 2 * (n + w) + 2 * n + 5)
    cold: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    fails: list[Sample] = []
    mgr = SandboxManager()
    try:
        for i in range(w + n):
            total, _, ph, err = await _timed_hello(lambda: mgr.run(spec, ExecRequest(["echo", "hello"]), phased=True))
            st.advance()
            if i < w:
                continue
            if err is not None:
                fails.append(Sample(False, total, err))
                continue
            for p in PHASES:
                cold[p].append(ph[p])
            cold["total"].append(total)
        _record(ctx, backend, "cold", cold, fails, "Backend.run (in-process)")
        await _warm(ctx, backend, spec, st)
        if "exec" in ctx.features(backend):
            await _named(ctx, mgr, backend, spec, st)
    finally:
        await mgr.aclose()
        st.finish()


def _record(ctx: BenchContext, backend: str, mode: str, data: dict[str, list[float]], fails: list[Sample],
            how: str, extra: dict[str, Any] | None = None) -> None:
    for p, xs in data.items():
        samples = [Sample(True, x) for x in xs] + (fails if p == "total" else [])
        ctx.add_measurement(suite=SUITE, backend=backend, name=f"{mode}_{p}", label=f"{mode} {p} ({how})",
                            mode=mode, kind="phase", samples=samples, image=ctx.image(backend),
                            extra=(extra or {}) if p == "total" else {})


async def _warm(ctx: BenchContext, backend: str, spec, st) -> None:
    if "pool" not in ctx.features(backend):
        ctx.add_unavailable(suite=SUITE, backend=backend, name="warm_total", label="warm total", mode="warm",
                            reason=f"backend {backend} has no warm pool")
        return
    from ...backends.base import ExecRequest
    from ...daemon.server import Daemon
    from ...pool import PoolConfig

    n, w = ctx.cfg.iterations, ctx.cfg.warmup
    pc = PoolConfig(min_size=2, max_size=4)
    d = Daemon(pool_defaults=pc, warm=[(spec, pc)])
    data: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    fails: list[Sample] = []
    hits = 0
    try:
        await d.start_background()
        for i in range(w + n):
            await _wait_pools(d, backend)
            total, r, ph, err = await _timed_hello(lambda: d.run(spec, ExecRequest(["echo", "hello"])))
            st.advance()
            if i < w:
                continue
            if err is not None:
                fails.append(Sample(False, total, err))
                continue
            if "acquire_ms" not in r.timings:  # in-process pools (wasm): the member was acquired, not booted
                ph["boot"] = 0.0
            hits += int(r.timings.get("pooled", 1.0) or 0)
            for p in PHASES:
                data[p].append(ph[p])
            data["total"].append(total)
        # let the last member's background destroy finish: closing a pool cancels in-flight destroys
        # (their journal entries and run dirs would stay behind until the next reap)
        await _wait_pools(d, backend)
    finally:
        await d.close()
    _record(ctx, backend, "warm", data, fails, "daemon pool, in-process",
            {"pool_hits": hits, "note": "boot and shutdown happen off the request path (refill, background destroy)"})


async def _wait_pools(d, backend: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = [p for p in d.status()["pools"] if p.get("backend") == backend]
        if pools and all(pool_idle(p) for p in pools):
            return
        if not pools and time.monotonic() > deadline - timeout + 1.0:
            return  # nothing pooled up front (in-process pools start on the first run)
        await asyncio.sleep(0.02)


async def _named(ctx: BenchContext, mgr, backend: str, spec, st) -> None:
    """Named lifecycle phases, exec via the agent, idle memory of one instance."""
    from ...backends.base import ExecRequest

    n = ctx.cfg.iterations
    ops: dict[str, list[float]] = {k: [] for k in ("create", "start", "exec", "stop", "remove")}
    errors: list[Sample] = []
    execs: list[Sample] = []
    pss = None
    for i in range(max(1, min(n, 5))):
        name = f"akbench-ph-{ctx.run_id[-6:]}-{i}"
        s = spec.replace(name=name)
        times: dict[str, float] = {}
        created = False
        try:
            t = time.perf_counter()
            await mgr.create(s)
            created = True
            times["create"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            await mgr.start(name)
            times["start"] = (time.perf_counter() - t) * 1e3
            if i == 0:
                pss = await asyncio.to_thread(idle_pss_mib, ctx, mgr, name)
                for _ in range(max(n, 20)):
                    t = time.perf_counter()
                    r = await mgr.exec(name, ExecRequest(["echo", "hello"]))
                    ms = (time.perf_counter() - t) * 1e3
                    execs.append(Sample(_ok(r), ms, None if _ok(r) else f"exit {r.exit_code} {r.stdout[:60]!r}"))
                st.advance(n)
            t = time.perf_counter()
            r = await mgr.exec(name, ExecRequest(["echo", "hello"]))
            times["exec"] = (time.perf_counter() - t) * 1e3
            if not _ok(r):
                raise RuntimeError(f"exec gave exit {r.exit_code} stdout {r.stdout[:60]!r}")
            t = time.perf_counter()
            await mgr.stop(name)
            times["stop"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            await mgr.remove(name)
            created = False
            times["remove"] = (time.perf_counter() - t) * 1e3
            for k, v in times.items():
                ops[k].append(v)
        except Exception as exc:
            errors.append(Sample(False, None, f"{type(exc).__name__}: {exc}"))
        finally:
            if created:
                try:
                    await mgr.remove(name)
                except Exception:
                    pass
        st.advance()
    for k, xs in ops.items():
        ctx.add_measurement(suite=SUITE, backend=backend, name=f"named_{k}", label=f"named sandbox {k} (in-process)",
                            mode="inproc", kind="phase", samples=[Sample(True, x) for x in xs] + errors,
                            image=ctx.image(backend))
    ctx.add_measurement(suite=SUITE, backend=backend, name="exec_agent", label="exec in a running sandbox (in-process)",
                        mode="inproc", kind="latency", samples=execs, image=ctx.image(backend))
    ctx.set_result(SUITE, backend, {"idle_pss_mib": pss})


# ---- memory -------------------------------------------------------------------------------------------


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def idle_pss_mib(ctx: BenchContext, mgr, name: str) -> dict[str, Any] | None:
    """PSS of every host process that exists for one idle sandbox: processes whose command line names
    the sandbox (engine helpers, runsc), and the descendants of those. None when nothing is found."""
    try:
        rec = mgr.get(name)
    except Exception:
        return None
    needles = {str(v).encode() for k, v in (rec.handle or {}).items() if k in ("container_id", "container")}
    needles.add(rec.id.encode())
    needles = {n for n in needles if len(n) >= 8}
    roots: set[int] = set()
    me = os.getpid()
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit() or int(pid_s) == me:
            continue
        try:
            with open(f"/proc/{pid_s}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if any(n in cmd for n in needles):
            roots.add(int(pid_s))
    if rec.backend == "oci":
        try:
            from ...oci.runtime import cgroup_pids

            roots |= set(cgroup_pids(rec.id))
        except Exception:
            pass
    if not roots:
        return None
    kids = _children()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(kids.get(p, []))
    per = {}
    for p in sorted(seen):
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        per[f"{p}:{comm}"] = round(_pss_kib(p) / 1024, 3)
    return {"total": round(sum(per.values()), 3), "processes": per}
