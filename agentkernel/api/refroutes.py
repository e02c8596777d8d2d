"""Routes of the reference system's later API that its published clients (npm ``agentkernel`` 0.18.1,
PyPI ``agentkernel-sdk`` 0.21.0) call: batch file write, detached exec, TTL extension, lookup by UUID and
snapshots. The work is in refops.py; responses keep the shapes those clients read (and add ours)."""


from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from . import models as M
from . import refops
from .deps import Svc, Tenant
from .models import MAX_ARGS, Strict


class WriteFilesRequest(Strict):
    files: dict[str, str] = Field(max_length=10000, description="{path: UTF-8 content}; relative paths are "
                                  "relative to the sandbox's working directory")


class DetachRequest(Strict):
    command: list[str] = Field(min_length=1, max_length=MAX_ARGS)
    env: dict[str, str] | list[str] | None = None
    workdir: str | None = None
    cwd: str | None = None
    sudo: bool | None = None


class ExtendRequest(Strict):
    by: str | int = Field(description='duration: "30m", "2h", "1d" or seconds')


class SnapshotRequest(Strict):
    sandbox: str = Field(min_length=1, max_length=63)
    name: str | None = Field(None, min_length=1, max_length=63)


class RestoreRequest(Strict):
    as_name: str | None = Field(None, min_length=1, max_length=63, description="name of the new sandbox "
                                "(default: the snapshot's name)")


router = APIRouter()


@router.post("/sandboxes/{name}/files", tags=["files"], response_model=M.Envelope[dict[str, Any]])
async def write_files(name: str, body: WriteFilesRequest, tenant: Tenant, svc: Svc):
    """Write several text files in one request: ``{"files": {path: content}}`` -> ``{written}``."""
    return M.envelope(await refops.write_files(svc, tenant, name, body.files))


@router.get("/sandboxes/by-uuid/{uuid}", tags=["sandboxes"], response_model=M.Envelope[M.SandboxBody])
async def by_uuid(uuid: str, tenant: Tenant, svc: Svc):
    return M.envelope(await refops.info_by_uuid(svc, tenant, uuid))


@router.post("/sandboxes/{name}/extend", tags=["sandboxes"], response_model=M.Envelope[dict[str, Any]])
async def extend(name: str, body: ExtendRequest, tenant: Tenant, svc: Svc):
    """Extend (or set) the sandbox's TTL by ``by``; the server removes it when the TTL runs out."""
    return M.envelope(refops.extend_ttl(svc, tenant, name, body.by))


@router.post("/sandboxes/{name}/exec/detach", tags=["detached"], response_model=M.Envelope[dict[str, Any]])
async def detach(name: str, body: DetachRequest, tenant: Tenant, svc: Svc):
    """Start a command in the background. It outlives the request (and the client); its output is kept
    on disk, up to 8 MiB per stream (``truncated`` says when more was dropped)."""
    if body.sudo:
        refops.check_sudo(svc, tenant, name)
    return M.envelope(await refops.start_detached(svc, tenant, name, body.command, env=body.env,
                                                  cwd=body.workdir or body.cwd))


@router.get("/sandboxes/{name}/exec/detached", tags=["detached"], response_model=M.Envelope[list[dict[str, Any]]])
async def detached_list(name: str, tenant: Tenant, svc: Svc):
    return M.envelope(refops.detached_list(svc, tenant, name))


@router.get("/sandboxes/{name}/exec/detached/{cmd_id}", tags=["detached"], response_model=M.Envelope[dict[str, Any]])
async def detached_status(name: str, cmd_id: str, tenant: Tenant, svc: Svc):
    return M.envelope(refops.detached_status(svc, tenant, name, cmd_id))


@router.get("/sandboxes/{name}/exec/detached/{cmd_id}/logs", tags=["detached"],
       response_model=M.Envelope[dict[str, Any]])
async def detached_logs(name: str, cmd_id: str, tenant: Tenant, svc: Svc,
                        stream: Annotated[Literal["stdout", "stderr"] | None, Query()] = None):
    return M.envelope(refops.detached_logs(svc, tenant, name, cmd_id, stream))


@router.delete("/sandboxes/{name}/exec/detached/{cmd_id}", tags=["detached"], response_model=M.Envelope[str])
async def detached_kill(name: str, cmd_id: str, tenant: Tenant, svc: Svc):
    return M.envelope(await refops.detached_kill(svc, tenant, name, cmd_id))


@router.get("/snapshots", tags=["snapshots"], response_model=M.Envelope[list[dict[str, Any]]])
async def snapshots(tenant: Tenant, svc: Svc):
    return M.envelope(refops.list_snapshots(tenant))


@router.post("/snapshots", tags=["snapshots"], response_model=M.Envelope[dict[str, Any]], status_code=201)
async def take(body: SnapshotRequest, tenant: Tenant, svc: Svc):
    """Snapshot a sandbox's filesystem (a committed image of its container)."""
    return M.envelope(await refops.take_snapshot(svc, tenant, body.sandbox, body.name))


@router.get("/snapshots/{name}", tags=["snapshots"], response_model=M.Envelope[dict[str, Any]])
async def get_snapshot(name: str, tenant: Tenant, svc: Svc):
    return M.envelope(refops.get_snapshot(tenant, name))


@router.delete("/snapshots/{name}", tags=["snapshots"], response_model=M.Envelope[str])
async def delete_snapshot(name: str, tenant: Tenant, svc: Svc):
    await refops.delete_snapshot(tenant, name)
    return M.envelope(f"Snapshot {name} deleted")


@router.post("/snapshots/{name}/restore", tags=["snapshots"], response_model=M.Envelope[M.SandboxBody],
        status_code=201)
async def restore(name: str, tenant: Tenant, svc: Svc, body: RestoreRequest | None = None):
    """A new sandbox from the snapshot (named ``as_name``, default the snapshot's name)."""
    return M.envelope(await refops.restore_snapshot(svc, tenant, name, body.as_name if body else None))
