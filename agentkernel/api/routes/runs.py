"""One-shot runs: ``/run``, ``/run/stream`` and ``/batch/run`` (each command in a fresh sandbox)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ...errors import AgentKernelError
from .. import models as M
from ..deps import Svc, Tenant, count_disconnect, stream_producer, unless_disconnected
from ..service import STREAM_OUTPUT_LIMIT, result_dict
from ..sse import EventStream

router = APIRouter(tags=["run"])


def _spec(svc, tenant: str, body: M.RunRequest | M.BatchCommand):
    return svc.run_spec(tenant, body.command, image=body.image, profile=body.profile,
                        backend=getattr(body, "backend", None), network=getattr(body, "network", None),
                        allow_hosts=getattr(body, "allow_hosts", None), block_hosts=getattr(body, "block_hosts", None),
                        secrets=getattr(body, "secrets", None))


def _cwd(body) -> str | None:
    return getattr(body, "cwd", None) or getattr(body, "workdir", None)


@router.post("/run", response_model=M.Envelope[M.CommandResultBody])
async def run(body: M.RunRequest, tenant: Tenant, svc: Svc, request: Request):
    """Run one command in a fresh sandbox (from the warm pool unless ``fast`` is false); the sandbox
    is destroyed afterwards. A non-zero exit is a successful request: see ``exit_code``."""
    spec = _spec(svc, tenant, body)
    req = svc.exec_request(body.command, env=body.env, cwd=_cwd(body), timeout=body.timeout, stdin=body.stdin,
                           output_limit=body.output_limit)
    result = await unless_disconnected(request, svc, svc.run(tenant, spec, req, fast=body.fast is not False))
    return M.envelope(result_dict(result))


@router.post("/run/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "SSE: started, stdout/stderr "
                              "(and reference-compatible output), exit, done; or error"}})
async def run_stream(body: M.RunRequest, tenant: Tenant, svc: Svc, compat: bool = True,
                     encoding: Annotated[str, Query(pattern="^(text|base64)$")] = "text"):
    """Stream a one-shot run as server-sent events. Disconnecting kills the command and destroys
    its sandbox."""
    spec = _spec(svc, tenant, body)
    svc.check_image(spec)  # before the stream starts: errors are plain HTTP errors
    svc.exec_request(body.command, env=body.env, cwd=_cwd(body), timeout=body.timeout, stdin=body.stdin)
    started = {"command": body.command, "fast": body.fast is not False, "backend": spec.backend, "image": spec.image}
    ticket = svc.admission.runs(tenant, 1, oneshot=True)  # a 429 is a plain HTTP error, before the stream

    def start(on_output):
        req = svc.exec_request(body.command, env=body.env, cwd=_cwd(body), timeout=body.timeout,
                               stdin=body.stdin, on_output=on_output, output_limit=STREAM_OUTPUT_LIMIT)
        return svc.run(tenant, spec, req, fast=body.fast is not False, admitted=True)

    return EventStream(stream_producer(start, started, compat, encoding), count_disconnect(svc), ticket.release)


@router.post("/batch/run", response_model=M.Envelope[M.BatchRunResponse])
async def batch_run(body: M.BatchRunRequest, tenant: Tenant, svc: Svc, request: Request):
    """Run several commands in parallel, each in its own fresh sandbox. The batch is admitted whole
    (429 when it would exceed the caller's batch size, concurrent runs or live sandboxes)."""
    jobs: list[Any] = []
    for cmd in body.commands:
        try:
            jobs.append((_spec(svc, tenant, cmd), svc.exec_request(cmd.command, env=cmd.env, cwd=cmd.cwd,
                                                                   timeout=cmd.timeout)))
        except AgentKernelError as exc:
            jobs.append(exc)
    runnable = [j for j in jobs if not isinstance(j, AgentKernelError)]
    outcomes = iter(await unless_disconnected(request, svc, svc.batch(tenant, runnable)) if runnable else [])
    results = []
    for j in jobs:
        r = j if isinstance(j, AgentKernelError) else next(outcomes)
        if isinstance(r, AgentKernelError):
            results.append({"output": None, "error": r.message})
        elif isinstance(r, BaseException):
            raise r
        else:
            d = result_dict(r)
            results.append({k: d[k] for k in ("output", "exit_code", "stdout", "stderr", "timed_out", "truncated",
                                              "timings")} | {"error": None})
    return M.envelope({"results": results})
