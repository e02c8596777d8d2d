"""Suite ``inproc``: in-process ``Sandbox.run`` without a pool vs the CLI's one-shot, per backend (DESIGN.md's
goal "in-process ``Sandbox.run`` without a pool: no slower than the CLI's one-shot on the same backend").

One interleaved block per backend with a one-shot (and ``oci`` once more under ``-o runtime=runsc``):

- ``run_cli``: ``agentkernel run --backend B --no-daemon -- echo hello``, a new CLI process per sample;
- ``run_inproc``: ``Sandbox.run(["echo", "hello"], backend=B)`` in this process, on one event loop kept
  across samples (an embedding application's), each sample resolving the spec and making its manager as
  the public call does. Same image, same default policy, same config (what the CLI finds in the bench's
  working directory: none).

The ratio in-process / CLI (p50) goes to ``ratios`` and the goals table (pass at <= 1).
"""

from __future__ import annotations

import asyncio
import time

from ..harness import HELLO, BenchContext, Cmd, Sample

SUITE = "inproc"
GOAL = "in-process Sandbox.run <= CLI one-shot"


def variants(ctx: BenchContext, backend: str) -> list[tuple[str, dict[str, str] | None]]:
    """(name suffix, options) to measure on ``backend``: its defaults; ``oci`` also under runsc when installed."""
    out: list[tuple[str, dict[str, str] | None]] = [("", None)]
    if backend == "oci":
        from ...oci import runtime as rt

        if rt.binary("runsc") is not None:
            out.append(("_runsc", {"runtime": "runsc"}))
    return out


def run(ctx: BenchContext) -> None:
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if "oneshot" not in ctx.features(backend):
            continue
        if not ok:
            ctx.add_unavailable(suite=SUITE, backend=backend, name="run_inproc", label="Sandbox.run (in-process)",
                                mode="inproc", reason=reason)
            continue
        for suffix, options in variants(ctx, backend):
            try:
                compare(ctx, backend, suffix, options)
            except Exception as exc:
                ctx.error(SUITE, backend, f"{suffix.lstrip('_') or 'default'}: {type(exc).__name__}: {exc}")


def compare(ctx: BenchContext, backend: str, suffix: str = "", options: dict[str, str] | None = None) -> None:
    image = ctx.image(backend)
    opt_args = [a for k, v in (options or {}).items() for a in ("-o", f"{k}={v}")]
    where = f"{backend}{' -o ' + ' '.join(opt_args[1::2]) if opt_args else ''}"
    from ... import config

    # the configuration the CLI finds in its working directory (the bench's), not this process's cwd's
    inproc = InProcRun(backend, options, config.load_config(config.find_config(None, ctx.workdir)))
    try:
        cmds = [Cmd(f"run_cli{suffix}", ctx.ak("run", "--backend", backend, "--no-daemon", *opt_args, "--", "echo",
                                               "hello"),
                    label=f"agentkernel run --backend {where} --no-daemon (CLI one-shot)", backend=backend,
                    mode="cold", image=image),
                Cmd(f"run_inproc{suffix}", ["Sandbox.run", "echo", "hello", f"backend={where}"], call=inproc.one,
                    label=f"Sandbox.run (in-process, no pool), {where}", backend=backend, mode="inproc",
                    image=image)]
        res = ctx.interleave(cmds, ctx.cfg.iterations, ctx.cfg.warmup, f"inproc vs CLI one-shot {where}")
        ctx.add_cmd_results(SUITE, cmds, res, extra={f"run_inproc{suffix}": {
            "paired_ratio_median": paired_ratio(res[f"run_inproc{suffix}"][0], res[f"run_cli{suffix}"][0])}})
        ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/run_inproc{suffix}",
                      raw=f"{SUITE}/{backend}/run_cli{suffix}",
                      label=f"in-process Sandbox.run vs CLI one-shot ({where})")
    finally:
        inproc.close()


def paired_ratio(ours: list[Sample], cli: list[Sample]) -> float | None:
    """The median of the per-round ratios (round i's in-process sample / its CLI sample, both successful):
    a load swing on this shared machine moves both samples of a round, so it cancels out of each ratio."""
    import statistics

    rs = [a.ms / b.ms for a, b in zip(ours, cli, strict=False) if a.ok and b.ok and a.ms and b.ms]
    return round(statistics.median(rs), 4) if rs else None


class InProcRun:
    """``Sandbox.run`` on one event loop kept across samples, driven one sample at a time between the CLI's."""

    def __init__(self, backend: str, options: dict[str, str] | None, config: dict) -> None:
        self.flags = {"backend": backend, "config": config, **({"options": dict(options)} if options else {})}
        self.loop = asyncio.new_event_loop()

    def one(self) -> Sample:
        from ...sandbox import Sandbox

        t0 = time.perf_counter()
        try:
            r = self.loop.run_until_complete(Sandbox.run(["echo", "hello"], **self.flags))
        except Exception as exc:
            return Sample(False, None, f"{type(exc).__name__}: {exc}")
        ms = (time.perf_counter() - t0) * 1e3
        if r.exit_code != 0 or r.stdout != HELLO:
            return Sample(False, ms, f"exit {r.exit_code} stdout {r.stdout[:60]!r} stderr {r.stderr[:120]!r}")
        return Sample(True, ms)

    def close(self) -> None:
        self.loop.close()
