"""``agentkernel exec`` fast path: straight to the sandbox agent's socket, no asyncio, no engine call.

The store says where the sandbox's agent listens (its run dir); the blocking agent client streams the
command's output straight to our fds. Anything unusual (sandbox unknown, not running, no agent socket)
returns None and the general path produces the right error.
"""

from __future__ import annotations

import _signal as signal  # not `signal`: it imports enum (start-up time)
import os


def try_exec_fast(args, command: list[str]) -> int | None:
    from ..store import Store

    try:
        rec = Store().find(args.name)
    except Exception:
        return None
    if rec is None or rec.state not in ("running", "created"):
        return None
    run_dir = rec.handle.get("run_dir")
    if not run_dir:
        return None
    sock = os.path.join(run_dir, "agent.sock")
    from ..agent.sync_client import SyncAgentClient

    try:
        client = SyncAgentClient.connect_unix(sock)
    except OSError:
        return None
    from ..backends._agentexec import exec_env
    from .run import _forward_stdin

    spec = rec.spec
    env = exec_env(rec.handle.get("env"), spec.get("env") or {}, dict(args.env))
    old = {}

    def fwd(signum, frame):
        client.forward_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        try:
            old[sig] = signal.signal(sig, fwd)
        except (ValueError, OSError):
            pass
    try:
        code, sig, timed_out, oom, error = client.exec_stream(
            command, env=env, cwd=args.workdir or spec.get("workdir"), timeout=args.timeout,
            stdin_fd=0 if _forward_stdin() else None)
    except ConnectionError:
        from .daemon_client import sandbox_died

        raise sandbox_died(args.name) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        client.close()
    from .. import audit
    from .daemon_client import exit_code_of

    mem = (spec.get("resources") or {}).get("memory_mb")
    rc = exit_code_of(code, sig, timed_out, oom, error, args.timeout, mem)
    audit.log("command_executed", sandbox=args.name, id=rec.id, argv=command, exit_code=rc, timed_out=timed_out,
              oom_killed=oom)
    return rc
