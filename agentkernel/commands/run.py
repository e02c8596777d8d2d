"""``agentkernel run``: one command in a fresh sandbox. Dispatch only:

- ``--keep``: a named sandbox that outlives the command (the manager);
- the daemon's warm pool when one answers (``daemon_client``);
- otherwise the one-shot runner (``agentkernel.oneshot``) on the chosen backend, which owns the
  claim -> run -> notes -> release -> audit sequence for every backend.
"""

from __future__ import annotations

import os

from .. import paths

# config tables a cached resolution may come from: the others read more files ([build], [[files]]), or act
# on the process as they are read ([daemon] socket), or are the reference's refused keys
_CACHEABLE_TABLES = frozenset({"sandbox", "resources", "security", "env", "images", "pool"})


def _daemon_wanted(args) -> bool:
    return not args.no_daemon and os.environ.get("AGENTKERNEL_NO_DAEMON", "") in ("", "0")


def run(args, command: list[str]) -> int:
    if args.keep or (_daemon_wanted(args) and os.path.exists(paths.daemon_socket())) or \
            args.backend not in (None, "auto", "qemu"):
        return _run(args, command)
    # a daemon-less one-shot: an identical earlier qemu run's VM starts now, while this process resolves the
    # spec (vm/prelaunch.py); the backend takes it only if it is exactly the sandbox this run would start
    from .. import resolvedspec
    from ..vm import prelaunch

    prelaunch.begin(resolvedspec.key(args, command))
    try:
        return _run(args, command)
    finally:
        prelaunch.discard()  # not taken (another backend, a refused policy, an error): removed now


def _run(args, command: list[str]) -> int:
    key = None
    if not args.keep and _daemon_wanted(args):
        # the warm path: the spec an identical earlier run resolved, while every input it read still holds
        # (resolvedspec.py); no socket: no daemon (and no protocol imports)
        from .. import resolvedspec

        key = resolvedspec.key(args, command)
        hit = resolvedspec.load(key)
        if hit is not None and os.path.exists(paths.daemon_socket()):
            from . import daemon_client

            spec_dict, backend, memory_mb = hit
            rc = daemon_client.try_run_resolved(spec_dict, backend, memory_mb, command, args.timeout)
            if rc is not None:
                return rc
    spec, files, checks, cfg = _resolve(args, command, record=key is not None)
    if args.keep:
        return _run_keep(args, spec, command, files)
    # agentkernel.toml's [[files]] are copied into a fresh sandbox (a pooled one was made before this run)
    if not files and _daemon_wanted(args) and os.path.exists(paths.daemon_socket()):
        from . import daemon_client

        if key is not None and _CACHEABLE_TABLES.issuperset(cfg):
            from .. import resolvedspec

            resolvedspec.store(key, checks, (spec.to_dict(), spec.backend, spec.resources.memory_mb))
        rc = daemon_client.try_run(spec, command, args.timeout)
        if rc is not None:
            return rc
    from .. import oneshot, termio
    from ..backends import get_backend

    return oneshot.run(get_backend(spec.backend, spec.options), spec, command, termio.caller_stdio(), args.timeout,
                       files=files)


def _resolve(args, command: list[str], *, record: bool):
    """(spec, [[files]], the inputs the resolution read (``resolvedspec``), the config's tables)."""
    from .. import resolvedspec
    from ..backends import canonical
    from ..cli_flags import spec_and_files_from_args

    if record:
        resolvedspec.start()
    try:
        spec, files, cfg = spec_and_files_from_args(args, command, with_config=True)
    finally:
        checks = resolvedspec.stop() if record else []
    return spec.replace(backend=canonical(spec.backend)), files, checks, cfg


def _run_keep(args, spec, command: list[str], files: list) -> int:
    """--keep: a named sandbox that outlives the command (left running)."""
    import asyncio

    from .. import owner, termio
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
