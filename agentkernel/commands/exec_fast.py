"""``agentkernel exec`` fast path: straight to the sandbox agent's socket, no asyncio, no engine call.

The store says where the sandbox's agent listens (its run dir); the blocking agent client streams the
command's output straight to our fds. Anything unusual (sandbox unknown, not running, no agent socket)
returns None and the general path produces the right error.
"""

from __future__ import annotations

import os


def try_exec_fast(args, command: list[str]) -> int | None:
    from ..store import Store

    try:
        rec = Store(readonly=True).find(args.name)
    except Exception:  # no store yet, or an older schema: the general path reports it properly
        return None
    if rec is None or rec.state not in ("running", "created"):
        return None
    run_dir = rec.handle.get("run_dir")
    if not run_dir:
        return None
    sock = os.path.join(run_dir, "agent.sock")
    from ..agent.sync_client import SyncAgentClient
    from ..safefs import UnsafeFile

    try:
        client = SyncAgentClient.connect_unix(sock)
    except UnsafeFile as exc:  # the sandbox replaced its socket: never connect through it
        from ..errors import SandboxError

        raise SandboxError(f"sandbox {args.name}: refusing to connect to its agent: {exc} (something inside "
                           "the sandbox replaced it)", hint=f"agentkernel rm {args.name}") from None
    except OSError:
        return None
    from ..backends._agentexec import exec_env
    from ..termio import stdin_forwardable
    from .daemon_client import exec_via_agent_socket, exit_code_of

    spec = rec.spec
    code, sig, timed_out, oom, error = exec_via_agent_socket(
        client, command, env=exec_env(rec.handle.get("env"), spec.get("env") or {}, dict(args.env)),
        cwd=args.workdir or spec.get("workdir"), timeout=args.timeout, forward_stdin=stdin_forwardable(),
        sandbox=args.name)
    from .. import audit

    mem = (spec.get("resources") or {}).get("memory_mb")
    rc = exit_code_of(code, sig, timed_out, oom, error, args.timeout, mem)
    audit.log("command_executed", sandbox=args.name, id=rec.id, argv=command, exit_code=rc, timed_out=timed_out,
              oom_killed=oom)
    return rc
