"""What the reference system put into a sandbox at create time: ``[[files]]`` from agentkernel.toml.

``copy_files`` copies them into a running named sandbox through the manager, ``copy_files_ref`` into a
one-shot's sandbox through its backend (both: the in-sandbox agent or the engine, no shell), creating
parent directories first. A named sandbox created without starting it is started for the copy and
stopped again, so the files are there whenever it runs (the container keeps its filesystem across
stop/start). A one-shot run copies them in after its sandbox started and before its command runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .backends.base import ExecRequest


async def _copy(label: str, exec_argv: Callable[[list[str]], Awaitable[Any]],
                write: Callable[[str, bytes, int], Awaitable[Any]], files: list[dict[str, Any]]) -> int:
    parents = sorted({f["dest"].rsplit("/", 1)[0] or "/" for f in files} - {"/"})
    if parents:
        r = await exec_argv(["mkdir", "-p", "--", *parents])
        if r.exit_code != 0:
            from .errors import SandboxError

            raise SandboxError(f"[[files]]: cannot create {', '.join(parents)} in {label}: "
                               f"{r.stderr.decode(errors='replace').strip()}",
                               hint="the sandbox's user must be able to write there (or use /tmp, /workspace)")
    for f in files:
        with open(f["source"], "rb") as fh:
            data = fh.read()
        await write(f["dest"], data, f["mode"])
    return len(files)


async def copy_files(manager, name: str, files: list[dict[str, Any]], tenant: str | None = None) -> int:
    """Copy each ``{source, dest, mode}`` into the named (running) sandbox; returns how many."""
    return await _copy(f"sandbox {name}",
                       lambda argv: manager.exec(name, ExecRequest(argv, cwd="/", timeout=60), tenant),
                       lambda dest, data, mode: manager.write_file(name, dest, data, mode, tenant), files)


async def copy_files_ref(backend, ref, files: list[dict[str, Any]]) -> int:
    """The same into a started sandbox the caller owns directly (a one-shot run's)."""
    return await _copy("the run's sandbox", lambda argv: backend.exec(ref, ExecRequest(argv, cwd="/", timeout=60)),
                       lambda dest, data, mode: backend.write_file(ref, dest, data, mode), files)


async def after_create(manager, name: str, cfg: dict[str, Any], *, started: bool, tenant: str | None = None) -> None:
    files = cfg.get("files") or []
    if not files:
        return
    if not started:
        await manager.start(name, tenant)
    await copy_files(manager, name, files, tenant)
    if not started:
        await manager.stop(name, tenant)
