"""Named, long-lived sandboxes: create/list/get/remove/start/stop, exec (plain and streamed), logs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ...spec import validate_name
from .. import models as M
from .. import refops
from ..deps import Svc, Tenant, count_disconnect, stream_producer, unless_disconnected
from ..service import STREAM_OUTPUT_LIMIT, result_dict
from ..sse import EventStream

router = APIRouter(tags=["sandboxes"])


@router.get("/sandboxes", response_model=M.Envelope[list[M.SandboxBody]])
async def list_sandboxes(tenant: Tenant, svc: Svc):
    return M.envelope(await svc.list(tenant))


@router.post("/sandboxes", status_code=201, response_model=M.Envelope[M.SandboxBody])
async def create_sandbox(body: M.CreateSandboxRequest, tenant: Tenant, svc: Svc):
    """Create a named, long-lived sandbox (started unless ``start`` is false). A sandbox whose start
    fails is removed again. 429 when the caller (or the server) holds its limit of live sandboxes."""
    refops.check_create(body.source_url, body.source_ref, body.ttl)
    spec = svc.sandbox_spec(tenant, body.name, image=body.image, profile=body.profile, backend=body.backend,
                            network=body.network, allow_hosts=body.allow_hosts, block_hosts=body.block_hosts,
                            secrets=body.secrets, read_only=body.read_only, memory_mb=body.memory_mb,
                            vcpus=body.vcpus, pids=body.pids, disk_mb=body.disk_mb, env=body.env,
                            workdir=body.workdir, options=refops.volume_option(body.volumes),
                            unsupported={"secret_files": body.secret_files})
    info = await svc.create(tenant, spec, start=body.start)
    info |= await refops.after_create(svc, tenant, body.name, source_url=body.source_url, source_ref=body.source_ref,
                                      ttl=body.ttl)
    return M.envelope(info)


@router.get("/sandboxes/{name}", response_model=M.Envelope[M.SandboxBody])
async def get_sandbox(name: str, tenant: Tenant, svc: Svc):
    return M.envelope(await svc.info(tenant, name))


@router.delete("/sandboxes/{name}", response_model=M.Envelope[str])
async def remove_sandbox(name: str, tenant: Tenant, svc: Svc):
    await svc.remove(tenant, name)
    return M.envelope("Sandbox removed")


@router.post("/sandboxes/{name}/start", response_model=M.Envelope[M.SandboxBody])
async def start_sandbox(name: str, tenant: Tenant, svc: Svc):
    return M.envelope(await svc.start_sandbox(tenant, name))


@router.post("/sandboxes/{name}/stop", response_model=M.Envelope[M.SandboxBody])
async def stop_sandbox(name: str, tenant: Tenant, svc: Svc):
    return M.envelope(await svc.stop_sandbox(tenant, name))


def _exec_req(svc, body: M.ExecRequestBody, on_output=None, output_limit=None):
    # sudo was checked by refops.check_sudo (the caller): allowed only where commands already run as root
    return svc.exec_request(body.command, env=body.env, cwd=body.workdir or body.cwd, timeout=body.timeout,
                            stdin=body.stdin, on_output=on_output,
                            output_limit=output_limit if output_limit is not None else body.output_limit)


@router.post("/sandboxes/{name}/exec", response_model=M.Envelope[M.CommandResultBody])
async def exec_in_sandbox(name: str, body: M.ExecRequestBody, tenant: Tenant, svc: Svc, request: Request):
    """Run a command in a running named sandbox. A non-zero exit is a successful request."""
    if body.sudo:
        refops.check_sudo(svc, tenant, name)
    req = _exec_req(svc, body)
    return M.envelope(result_dict(await unless_disconnected(request, svc, svc.exec(tenant, name, req))))


@router.post("/sandboxes/{name}/exec/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def exec_stream(name: str, body: M.ExecRequestBody, tenant: Tenant, svc: Svc, compat: bool = True,
                      encoding: Annotated[str, Query(pattern="^(text|base64)$")] = "text"):
    """Stream an exec as server-sent events; disconnecting kills the command."""
    if body.sudo:
        refops.check_sudo(svc, tenant, name)
    _exec_req(svc, body)  # validate before the stream starts (errors are plain HTTP errors)
    rec = svc.manager.get(validate_name(name), tenant)
    started = {"command": body.command, "sandbox": name, "backend": rec.backend}
    ticket = svc.admission.runs(tenant, 1, oneshot=False)  # a 429 is a plain HTTP error, before the stream

    def start(on_output):
        return svc.exec(tenant, name, _exec_req(svc, body, on_output, STREAM_OUTPUT_LIMIT), admitted=True)

    return EventStream(stream_producer(start, started, compat, encoding), count_disconnect(svc), ticket.release)


@router.get("/sandboxes/{name}/logs", response_model=M.Envelope[list[dict[str, Any]]])
async def sandbox_logs(name: str, tenant: Tenant, svc: Svc,
                       last: Annotated[int | None, Query(ge=1, le=100000)] = None):
    """Audit events of this sandbox (lifecycle, commands, file transfers)."""
    return M.envelope(svc.logs(tenant, name, last))
