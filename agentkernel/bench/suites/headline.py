"""Headline: ``agentkernel run -- echo hello`` as a user sees it, per backend, beside the raw engines.

One interleaved block per backend: ours cold (``--no-daemon``), ours through the bench daemon's warm
pool, and the raw engine baselines of that backend (``suites/raw.py``), round-robin. While the block
runs, the daemon is warm for the backend; before **every** run (of any command) the harness waits,
untimed, until the daemon's pool is full and idle, so no run pays for (or is disturbed by) a refill in
the background. Ratios = ours p50 / raw p50 from the same block.

Snapshot-restore mode: measured for backends whose class declares the ``snapshot`` feature and a
``bench_snapshot_args`` list (the CLI arguments that select restore-from-snapshot; qemu: ``-o
snapshot=on``); such a backend's ``bench_cold_args`` select a real cold start for the cold row (qemu:
``-o snapshot=off``, a full kernel boot). Backends without them say why the row is unavailable.
"""

from __future__ import annotations

from ..harness import BenchContext, BenchDaemon, Cmd
from . import raw

SUITE = "headline"
SNAPSHOT_BACKENDS = ("qemu", "firecracker")

# ours -> raw pairs that make the ratio table, per backend (raw names from raw.oneshot_baselines)
RATIO_PAIRS = {
    "podman": ("raw_podman", "raw_podman_hardened"),
    "docker": ("raw_docker", "raw_docker_hardened"),
    "gvisor": ("raw_podman_runsc", "raw_podman_runsc_hardened", "raw_runsc"),
    "oci": ("raw_crun", "raw_podman"),
    "wasm": ("raw_wasmtime",),
}


def ours_cold(ctx: BenchContext, backend: str) -> Cmd:
    # backends whose default start is not a cold one (qemu restores a snapshot) name their cold mode
    cold_args = tuple(getattr(_cls(backend), "bench_cold_args", ()))
    return Cmd("cold", ctx.ak("run", "--backend", backend, "--no-daemon", *cold_args, "--", "echo", "hello"),
               label=f"agentkernel run --backend {backend} --no-daemon", backend=backend, mode="cold",
               image=ctx.image(backend))


def ours_warm(ctx: BenchContext, backend: str, daemon: BenchDaemon) -> Cmd:
    return Cmd("warm", ctx.ak("run", "--backend", backend, "--", "echo", "hello"),
               label=f"agentkernel run --backend {backend} (daemon warm pool)", backend=backend, mode="warm",
               image=ctx.image(backend))


def run(ctx: BenchContext) -> None:
    for backend in ctx.selected():
        try:
            run_backend(ctx, backend)
        except Exception as exc:
            ctx.error(SUITE, backend, f"{type(exc).__name__}: {exc}")


def run_backend(ctx: BenchContext, backend: str) -> None:
    ok, reason = ctx.available(backend)
    feats = ctx.features(backend)
    if not ok:
        ctx.add_unavailable(suite=SUITE, backend=backend, name="cold", label="agentkernel run (cold)",
                            mode="cold", reason=reason)
        ctx.add_unavailable(suite=SUITE, backend=backend, name="warm", label="agentkernel run (daemon warm pool)",
                            mode="warm", reason=reason)
        if backend in SNAPSHOT_BACKENDS:
            ctx.add_unavailable(suite=SUITE, backend=backend, name="snapshot",
                                label="agentkernel run (snapshot restore)", mode="snapshot", reason=reason)
        _, missing = raw.oneshot_baselines(ctx, backend)
        for m in missing:
            ctx.add_unavailable(suite=SUITE, backend=backend, name=m["name"], label=m["label"], mode="raw",
                                reason=m["reason"])
        return
    cfg = ctx.cfg
    cmds = [ours_cold(ctx, backend)]
    raw_cmds, missing = raw.oneshot_baselines(ctx, backend)
    for m in missing:
        ctx.add_unavailable(suite=SUITE, backend=backend, name=m["name"], label=m["label"], mode="raw",
                            reason=m["reason"])
    snap_args = getattr(_cls(backend), "bench_snapshot_args", None)
    if "snapshot" in feats and snap_args:
        cmds.append(Cmd("snapshot", ctx.ak("run", "--backend", backend, "--no-daemon", *snap_args, "--", "echo",
                                           "hello"),
                        label=f"agentkernel run --backend {backend} (snapshot restore)", backend=backend,
                        mode="snapshot", image=ctx.image(backend)))
    elif backend in SNAPSHOT_BACKENDS:
        ctx.add_unavailable(suite=SUITE, backend=backend, name="snapshot", label="agentkernel run (snapshot restore)",
                            mode="snapshot", reason="the backend declares no snapshot-restore mode")
    daemon = None
    extra: dict[str, dict] = {}
    if "pool" in feats:
        daemon = BenchDaemon(ctx, [backend], pool_min=2, pool_max=4)
        try:
            daemon.start()
        except Exception as exc:
            ctx.add_unavailable(suite=SUITE, backend=backend, name="warm", label="agentkernel run (daemon warm pool)",
                                mode="warm", reason=f"the daemon could not warm a pool: {exc}")
            daemon.stop()
            daemon = None
    else:
        ctx.add_unavailable(suite=SUITE, backend=backend, name="warm", label="agentkernel run (daemon warm pool)",
                            mode="warm", reason=f"backend {backend} has no warm pool")
    try:
        if daemon is not None:
            cmds.insert(1, ours_warm(ctx, backend, daemon))

            def settle(d: BenchDaemon = daemon) -> None:
                d.wait_ready(backend, timeout=30)

            for c in [*cmds, *raw_cmds]:
                c.before = settle
            m0 = daemon.metrics(backend)
        allc = [*cmds, *raw_cmds]
        res = ctx.interleave(allc, cfg.iterations, cfg.warmup, f"headline {backend}")
        if daemon is not None:
            m1 = daemon.metrics(backend)
            hits, misses = m1["hits"] - m0["hits"], m1["misses"] - m0["misses"]
            extra["warm"] = {"pool_hits": hits, "pool_misses": misses,
                             "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                             "daemon_start_ms": round(daemon.start_ms or 0, 3),
                             "daemon_ready_ms": round(daemon.ready_ms or 0, 3)}
    finally:
        if daemon is not None:
            daemon.stop(settle=True)
    ms = ctx.add_cmd_results(SUITE, allc, res, extra)
    for m in ms.values():
        p50 = m["stats"]["p50_ms"]
        m["extra"]["throughput_per_s"] = round(1000.0 / p50, 3) if p50 else None
    for ours in [c.name for c in cmds]:
        for rawname in RATIO_PAIRS.get(backend, ()) + tuple(c.name for c in raw_cmds
                                                             if c.name not in RATIO_PAIRS.get(backend, ())):
            if rawname in ms:
                ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/{ours}",
                              raw=f"{SUITE}/{backend}/{rawname}",
                              label=f"{ms[ours]['label']} vs {ms[rawname]['label']}")


def _cls(backend: str):
    try:
        from ...backends import get_backend_class

        return get_backend_class(backend)
    except Exception:
        return None
