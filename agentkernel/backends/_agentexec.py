"""Running commands through the in-sandbox agent: one mapping from ExecRequest to the agent's exec,
and from the agent's exit event to ExecResult, for every backend that uses the agent."""

from __future__ import annotations

import time

TYPE_CHECKING = False  # no typing import at start-up
if TYPE_CHECKING:
    from ..spec import SandboxSpec
    from .base import ExecRequest, ExecResult


def parse_environ(blob: bytes) -> dict[str, str]:
    """/proc/PID/environ -> dict."""
    env = {}
    for item in blob.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def exec_env(base: dict[str, str] | None, spec_env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The command's complete environment: the sandbox's (image + spec, as its PID 1 got it), then the
    request's own variables. Without a recorded base: a default PATH plus the spec's variables."""
    env = dict(base or {})
    if not base:
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(spec_env)
    env.update(extra)
    return env


async def exec_via_agent(client, spec: SandboxSpec, req: ExecRequest, base_env: dict[str, str] | None, *,
                         on_start=None) -> ExecResult:
    """``on_start``: overrides ``req.on_start`` (called with the pid once the command runs)."""
    from .base import ExecResult, OutputCollector

    collector = None
    on_output = req.on_output
    if on_output is None:
        collector = OutputCollector(req.output_limit)
        on_output = collector
    t0 = time.perf_counter()
    r = await client.exec(req.argv, env=exec_env(base_env, spec.env, req.env), cwd=req.cwd or spec.workdir,
                          stdin=req.stdin, timeout=req.timeout, tty=req.tty, tty_size=req.tty_size,
                          on_output=on_output, output_limit=req.output_limit if collector else 0,
                          on_start=on_start or req.on_start)
    ms = (time.perf_counter() - t0) * 1e3
    if r.error and r.start_failed:
        msg = f"{r.error}\n".encode()
        if collector is not None:
            collector(2, msg)
        else:
            res = on_output(2, msg)
            if hasattr(res, "__await__"):
                await res
    return ExecResult(
        r.exit_code, signal=r.signal or None, timed_out=r.timed_out, oom_killed=r.oom,
        stdout=bytes(collector.buf[1]) if collector else b"", stderr=bytes(collector.buf[2]) if collector else b"",
        truncated=bool(collector and collector.truncated) or r.stdout_truncated or r.stderr_truncated,
        timings={"exec_ms": round(ms, 3), "agent_ms": round(r.duration * 1e3, 3)},
    )
