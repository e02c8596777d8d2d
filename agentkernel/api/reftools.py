"""MCP tools matching the reference system's later ones: TTL, batch file write, detached commands and
snapshots. Registered into api.mcp.TOOLS; the work is in refops.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import refops


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExtendTtlArgs(_Args):
    name: str
    by: str | int = Field(description='duration: "30m", "2h", "1d" or seconds')


class WriteFilesArgs(_Args):
    name: str
    files: dict[str, str] = Field(description="{path: UTF-8 content}; relative to the working directory")


class DetachArgs(_Args):
    name: str
    command: list[str] = Field(min_length=1, description="argv (no shell)")
    env: list[str] | dict[str, str] | None = None
    workdir: str | None = None


class DetachedArgs(_Args):
    name: str
    id: str = Field(description="the detached command's id")


class DetachedLogsArgs(DetachedArgs):
    stream: Literal["stdout", "stderr"] | None = None


class SandboxNameArgs(_Args):
    name: str


class NoArgs(_Args):
    pass


class SnapshotTakeArgs(_Args):
    sandbox: str
    name: str | None = None


class SnapshotNameArgs(_Args):
    name: str


class SnapshotRestoreArgs(_Args):
    name: str
    as_name: str | None = None


TOOLS: dict[str, tuple[type[_Args], str]] = {
    "sandbox_extend_ttl": (ExtendTtlArgs, "Extend a sandbox's time to live (it is removed when it runs out)."),
    "sandbox_write_files": (WriteFilesArgs, "Write several text files into a running sandbox at once."),
    "sandbox_exec_detach": (DetachArgs, "Start a command in the background in a running sandbox; returns its id."),
    "sandbox_exec_status": (DetachedArgs, "Status and exit code of a detached command."),
    "sandbox_exec_logs": (DetachedLogsArgs, "Output of a detached command so far (kept up to 8 MiB per stream)."),
    "sandbox_exec_kill": (DetachedArgs, "Kill a detached command."),
    "sandbox_exec_list": (SandboxNameArgs, "List a sandbox's detached commands."),
    "snapshot_list": (NoArgs, "List snapshots."),
    "snapshot_take": (SnapshotTakeArgs, "Snapshot a sandbox: its filesystem (containers) or, on qemu, its whole "
                      "running memory, devices and disk."),
    "snapshot_get": (SnapshotNameArgs, "Details of one snapshot."),
    "snapshot_delete": (SnapshotNameArgs, "Delete a snapshot."),
    "snapshot_restore": (SnapshotRestoreArgs, "Create a new running sandbox from a snapshot."),
}


async def call(svc, name: str, a: Any, tenant: str) -> tuple[str, Any]:
    if name == "sandbox_extend_ttl":
        d = refops.extend_ttl(svc, tenant, a.name, a.by)
        return f"sandbox {a.name} now expires at {d['expires_at']}", d
    if name == "sandbox_write_files":
        d = await refops.write_files(svc, tenant, a.name, a.files)
        return f"wrote {d['written']} files", d
    if name == "sandbox_exec_detach":
        d = await refops.start_detached(svc, tenant, a.name, a.command, env=a.env, cwd=a.workdir)
        return f"started detached command {d['id']}", d
    if name == "sandbox_exec_status":
        d = refops.detached_status(svc, tenant, a.name, a.id)
        return f"{d['id']}: {d['status']} (exit code {d['exit_code']})", d
    if name == "sandbox_exec_logs":
        d = refops.detached_logs(svc, tenant, a.name, a.id, a.stream)
        return "\n".join(f"--- {k} ---\n{d[k]}" for k in ("stdout", "stderr") if k in d), d
    if name == "sandbox_exec_kill":
        msg = await refops.detached_kill(svc, tenant, a.name, a.id)
        return msg, {"message": msg}
    if name == "sandbox_exec_list":
        items = refops.detached_list(svc, tenant, a.name)
        return "\n".join(f"{d['id']}\t{d['status']}\t{' '.join(d['command'])}" for d in items) or "none", \
            {"commands": items}
    if name == "snapshot_list":
        items = refops.list_snapshots(tenant)
        return "\n".join(f"{s['name']}\t{s['sandbox']}\t{s['created_at']}" for s in items) or "no snapshots", \
            {"snapshots": items}
    if name == "snapshot_take":
        d = await refops.take_snapshot(svc, tenant, a.sandbox, a.name)
        return f"snapshot {d['name']} of {a.sandbox} taken", d
    if name == "snapshot_get":
        d = refops.get_snapshot(tenant, a.name)
        return f"snapshot {d['name']} of {d['sandbox']} ({d['created_at']})", d
    if name == "snapshot_delete":
        await refops.delete_snapshot(tenant, a.name)
        return f"snapshot {a.name} deleted", {"deleted": a.name}
    if name == "snapshot_restore":
        d = await refops.restore_snapshot(svc, tenant, a.name, a.as_name)
        return f"restored snapshot {a.name} as sandbox {d['name']}", d
    raise AssertionError(name)
