"""What the reference system put into a sandbox at create time: ``[[files]]`` from agentkernel.toml.

``copy_files`` copies them into a running sandbox through the manager (the in-sandbox agent, no shell),
creating parent directories. A sandbox created without starting it is started for the copy and stopped
again, so the files are there whenever it runs (the container keeps its filesystem across stop/start).
"""

from __future__ import annotations

from typing import Any

from .backends.base import ExecRequest


async def copy_files(manager, name: str, files: list[dict[str, Any]], tenant: str | None = None) -> int:
    """Copy each ``{source, dest, mode}`` into the named (running) sandbox; returns how many."""
    parents = sorted({f["dest"].rsplit("/", 1)[0] or "/" for f in files} - {"/"})
    if parents:
        r = await manager.exec(name, ExecRequest(["mkdir", "-p", "--", *parents], timeout=60), tenant)
        if r.exit_code != 0:
            from .errors import SandboxError

            raise SandboxError(f"[[files]]: cannot create {', '.join(parents)} in sandbox {name}: "
                               f"{r.stderr.decode(errors='replace').strip()}",
                               hint="the sandbox's user must be able to write there (or use /tmp, /workspace)")
    for f in files:
        with open(f["source"], "rb") as fh:
            data = fh.read()
        await manager.write_file(name, f["dest"], data, f["mode"], tenant)
    return len(files)


async def after_create(manager, name: str, cfg: dict[str, Any], *, started: bool, tenant: str | None = None) -> None:
    files = cfg.get("files") or []
    if not files:
        return
    if not started:
        await manager.start(name, tenant)
    await copy_files(manager, name, files, tenant)
    if not started:
        await manager.stop(name, tenant)
