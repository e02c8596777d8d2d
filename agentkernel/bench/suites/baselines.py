"""Baselines beyond the one-shot ones of the headline block:

- **floors** (backend ``host``): ``/bin/echo hello`` (process spawn), the CLI's interpreter doing
  nothing (``python -c pass``: the interpreter's start-up) and ``agentkernel --version`` (interpreter +
  the CLI's import floor). Nothing with a sandbox can be faster than the floor of its own process.
- **exec in a running sandbox**, new process per call, interleaved: ``agentkernel exec NAME -- echo hello``
  (a started named sandbox) vs the engine's own exec into a plain long-lived container of the same
  image: ``podman exec``, ``docker exec``, ``podman exec`` on a runsc container (gvisor), ``crun exec``
  on a plain bundle (oci). ``cfg.exec_calls`` calls each (50 by default: the reference's "exec
  throughput, 50 sequential exec calls" table comes from these samples).
- **exec in a running sandbox, in-process**, interleaved with the two above on the same sandbox:
  ``SandboxManager.exec`` (the path of the daemon's HTTP API and the Python API: the sandbox's shared
  agent connection) one at a time (``exec_inproc``, with its median against the raw engine exec as a
  ratio) and 10 at once (``exec_inproc_c10``: one sample = the batch; ``calls_per_s`` = execs per
  second).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from ..harness import HELLO, BenchContext, Cmd, Sample
from . import raw

SUITE = "baselines"


def run(ctx: BenchContext) -> None:
    try:
        floors(ctx)
    except Exception as exc:
        ctx.error(SUITE, "host", f"{type(exc).__name__}: {exc}")
    for backend in ctx.selected():
        ok, reason = ctx.available(backend)
        if not ok:
            ctx.add_unavailable(suite=SUITE, backend=backend, name="exec_cli", label="agentkernel exec (CLI)",
                                mode="exec", reason=reason)
            continue
        if "exec" not in ctx.features(backend):
            continue
        try:
            exec_compare(ctx, backend)
        except Exception as exc:
            ctx.error(SUITE, backend, f"{type(exc).__name__}: {exc}")


def _interpreter() -> str:
    import sys

    cli = os.path.join(os.path.dirname(sys.executable), "agentkernel")
    try:
        with open(cli) as f:
            first = f.readline()
        if first.startswith("#!"):
            return first[2:].strip().split()[0]
    except OSError:
        pass
    return sys.executable


def floors(ctx: BenchContext) -> None:
    from ... import __version__

    cmds = [
        Cmd("floor_echo", ["/bin/echo", "hello"], label="/bin/echo hello (process spawn)", backend="host", mode="raw"),
        Cmd("floor_python", [_interpreter(), "-c", "pass"], label="CLI interpreter start-up (python -c pass)",
            backend="host", mode="raw", expect=b""),
        Cmd("floor_cli", ctx.ak("--version"), label="agentkernel --version (interpreter + CLI import)",
            backend="host", mode="raw", expect=f"agentkernel {__version__}\n".encode()),
    ]
    res = ctx.interleave(cmds, ctx.cfg.iterations, ctx.cfg.warmup, "baselines floors")
    ctx.add_cmd_results(SUITE, cmds, res)


class _CrunExec:
    """A plain bundle running ``sleep 3600`` detached under crun, for ``crun exec``."""

    def __init__(self, ctx: BenchContext, image: str) -> None:
        self.ctx, self.image = ctx, image
        self.base = raw.runtime_base(ctx, "crun")
        self.cid = f"akbench-{ctx.run_id}-crun-exec"
        self.error: str | None = None
        self.ok = False

    def __enter__(self) -> _CrunExec:
        if self.base is None:
            self.error = "crun is not installed"
            return self
        argv_fn, why = raw.plain_bundle(self.ctx, "crun", self.image, args=["sleep", "3600"], tag="-exec")
        if argv_fn is None:
            self.error = why
            return self
        argv = argv_fn()
        argv[-1] = self.cid
        argv.insert(argv.index("run") + 1, "--detach")
        # --detach with our pipes open would hang the caller: the container gets /dev/null
        # (stderr to a file, not a pipe: the container inherits it)
        log = os.path.join(self.ctx.tmp, "raw", "crun-exec.log")
        with open(log, "wb") as errf:
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                                   timeout=60, cwd=self.ctx.workdir)
                self.ok = r.returncode == 0
            except subprocess.TimeoutExpired:
                self.ok = False
        if not self.ok:
            with open(log, "rb") as f:
                self.error = f.read().decode(errors="replace").strip()[-300:] or "crun run --detach failed"
        return self

    def exec_argv(self) -> list[str]:
        return [*self.base, "exec", self.cid, "echo", "hello"]

    def __exit__(self, *exc) -> None:
        if self.base is None:
            return
        for args in (["kill", self.cid, "KILL"], ["delete", "--force", self.cid]):
            subprocess.run([*self.base, *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def exec_compare(ctx: BenchContext, backend: str) -> None:
    image = ctx.image(backend) or "agentkernel/busybox"
    name = f"akbench-ex-{ctx.run_id[-6:]}-{backend}"
    r = ctx.run_quiet(ctx.ak("create", name, "--backend", backend, "--start"), timeout=180)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).decode(errors="replace").strip()[-300:]
        ctx.add_unavailable(suite=SUITE, backend=backend, name="exec_cli", label="agentkernel exec (CLI)", mode="exec",
                            reason=f"could not create a named sandbox: {why}")
        ctx.run_quiet(ctx.ak("rm", name), timeout=120)
        return
    raw_ctx = None
    inproc = _InProcExec(name)
    try:
        cmds = [Cmd("exec_cli", ctx.ak("exec", name, "--", "echo", "hello"), label="agentkernel exec NAME (CLI)",
                    backend=backend, mode="exec", image=image),
                Cmd("exec_inproc", ["SandboxManager.exec", name, "echo", "hello"], call=inproc.one,
                    label="exec in a running sandbox (in-process, shared agent connection)", backend=backend,
                    mode="inproc", image=image),
                Cmd("exec_inproc_c10", ["SandboxManager.exec", name, "echo", "hello", "x10 concurrent"],
                    call=inproc.ten, label=f"{CONCURRENT} concurrent execs in one sandbox (in-process, batch)",
                    backend=backend, mode="inproc", image=image)]
        raw_label = None
        if backend == "podman":
            raw_ctx, raw_label = raw.RawExecContainer(ctx, "podman", image), "podman exec"
        elif backend == "docker":
            raw_ctx, raw_label = raw.RawExecContainer(ctx, "docker", image), "docker exec"
        elif backend == "gvisor":
            raw_ctx, raw_label = raw.RawExecContainer(ctx, "podman", image, raw.RUNSC_PLAIN), "podman exec (runsc)"
        elif backend == "oci":
            raw_ctx, raw_label = _CrunExec(ctx, image), "crun exec"
        if raw_ctx is not None:
            raw_ctx.__enter__()
            if raw_ctx.ok:
                cmds.append(Cmd("exec_raw", raw_ctx.exec_argv(), label=raw_label, backend=backend, mode="raw",
                                image=image))
            else:
                ctx.add_unavailable(suite=SUITE, backend=backend, name="exec_raw", label=raw_label, mode="raw",
                                    reason=f"could not start the raw container: {raw_ctx.error}")
        res = ctx.interleave(cmds, ctx.cfg.exec_calls, ctx.cfg.warmup, f"baselines exec {backend}")
        ms = ctx.add_cmd_results(SUITE, cmds, res)
        for key, m in ms.items():
            mean = m["stats"]["mean_ms"]
            per = CONCURRENT if key == "exec_inproc_c10" else 1
            m["extra"]["calls_per_s"] = round(per * 1000.0 / mean, 3) if mean else None
        if "exec_raw" in ms:
            ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/exec_cli",
                          raw=f"{SUITE}/{backend}/exec_raw", label=f"agentkernel exec vs {raw_label}")
            ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/exec_inproc",
                          raw=f"{SUITE}/{backend}/exec_raw", label=f"in-process exec vs {raw_label}")
    finally:
        inproc.close()
        if raw_ctx is not None:
            raw_ctx.__exit__(None, None, None)
        ctx.run_quiet(ctx.ak("rm", name), timeout=120)


CONCURRENT = 10


class _InProcExec:
    """``SandboxManager.exec`` on one event loop kept across samples (so the sandbox's agent connection
    persists between them, as in a daemon), driven one sample at a time between the commands."""

    def __init__(self, name: str) -> None:
        from ...manager import SandboxManager

        self.name = name
        self.loop = asyncio.new_event_loop()
        self.mgr = SandboxManager()

    def _time(self, n: int) -> Sample:
        from ...backends.base import ExecRequest

        async def go():
            return await asyncio.gather(*(self.mgr.exec(self.name, ExecRequest(["echo", "hello"])) for _ in range(n)))

        t0 = time.perf_counter()
        try:
            rs = self.loop.run_until_complete(go())
        except Exception as exc:
            return Sample(False, None, f"{type(exc).__name__}: {exc}")
        ms = (time.perf_counter() - t0) * 1e3
        bad = [r for r in rs if r.exit_code != 0 or r.stdout != HELLO]
        if bad:
            return Sample(False, ms, f"exit {bad[0].exit_code} stdout {bad[0].stdout[:60]!r}")
        return Sample(True, ms)

    def one(self) -> Sample:
        return self._time(1)

    def ten(self) -> Sample:
        return self._time(CONCURRENT)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.mgr.aclose())
        finally:
            self.loop.close()
