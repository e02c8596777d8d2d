"""``agentkernel run``: one command in a fresh sandbox. Dispatch only:

- ``--keep``: a named sandbox that outlives the command (the manager);
- the daemon's warm pool when one answers (``daemon_client``);
- otherwise the one-shot runner (``agentkernel.oneshot``) on the chosen backend, which owns the
  claim -> run -> notes -> release -> audit sequence for every backend.
"""

from __future__ import annotations

import os

from .. import paths, termio
from ..backends import canonical, get_backend


def run(args, command: list[str]) -> int:
    from ..cli_flags import spec_and_files_from_args

    spec, files = spec_and_files_from_args(args, command)
    spec = spec.replace(backend=canonical(spec.backend))
    if args.keep:
        return _run_keep(args, spec, command, files)
    # agentkernel.toml's [[files]] are copied into a fresh sandbox (a pooled one was made before this run)
    if (not files and not args.no_daemon and os.environ.get("AGENTKERNEL_NO_DAEMON", "") in ("", "0")
            and os.path.exists(paths.daemon_socket())):  # no socket: no daemon (and no protocol imports)
        from . import daemon_client

        rc = daemon_client.try_run(spec, command, args.timeout)
        if rc is not None:
            return rc
    from .. import oneshot

    return oneshot.run(get_backend(spec.backend, spec.options), spec, command, termio.caller_stdio(), args.timeout,
                       files=files)


def _run_keep(args, spec, command: list[str], files: list) -> int:
    """--keep: a named sandbox that outlives the command (left running)."""
    import asyncio

    from .. import owner
    from ..backends.base import ExecRequest
    from ..manager import SandboxManager
    from ..outcome import from_result, render

    name = args.name or owner.new_id("run")
    spec = spec.replace(name=name)

    async def go():
        mgr = SandboxManager()
        try:
            await mgr.create(spec, start=True)
            if files:
                from ..refinject import copy_files

                await copy_files(mgr, name, files)
            req = ExecRequest(command, stdin=termio.stdin_chunks() if termio.stdin_forwardable() else None,
                              timeout=args.timeout, on_output=termio.write_all)
            return await mgr.exec(name, req)
        finally:
            await mgr.aclose()

    result = asyncio.run(go())
    termio.note(f"sandbox kept: {name}  (agentkernel exec {name} -- CMD; agentkernel rm {name})")
    return render(from_result(result), timeout=args.timeout, memory_mb=spec.resources.memory_mb)
