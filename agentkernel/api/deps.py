"""What every route module shares: the service, the caller's tenant (bearer token), the request-level
errors and the helpers that tie a run's lifetime to its client (a disconnect kills the command)."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import AgentKernelError
from .auth import LOCAL_TENANT
from .service import Service, result_dict
from .sse import TextDecoders

log = logging.getLogger("agentkernel.api")

UNAUTHORIZED = {"success": False, "error": "unauthorized"}
JSON_READ_LIMIT = 16 << 20  # files returned inside JSON; larger ones must be downloaded raw

bearer_scheme = HTTPBearer(auto_error=False, description="an API token (AGENTKERNEL_API_TOKENS)")


class Unauthorized(Exception):
    pass


class ClientGone(Exception):
    pass


class TooLarge(AgentKernelError):
    http_status = 413


def service(request: Request) -> Service:
    return request.app.state.service


def tenant_for(request: Request, creds: HTTPAuthorizationCredentials | None) -> str | None:
    """The caller's tenant from its bearer credentials (``bearer_scheme``), or None (not authorized)."""
    tokens = request.app.state.settings.tokens
    if not tokens:
        return LOCAL_TENANT
    return tokens.tenant_for(creds.credentials if creds else None)


def tenant_of(request: Request,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> str:
    tenant = tenant_for(request, creds)
    if tenant is None:
        request.app.state.service.metrics.auth_failures += 1
        raise Unauthorized()
    return tenant


Tenant = Annotated[str, Depends(tenant_of)]
Svc = Annotated[Service, Depends(service)]


async def unless_disconnected(request: Request, svc: Service, aw):
    """Await ``aw`` (a run or exec), cancelling it — which kills the command and, for one-shot runs,
    destroys the sandbox — if the client disconnects first (the body has been read by now, so the
    next ASGI message can only be the disconnect). ``aw`` runs in the caller's own task; a watcher task
    cancels that task on the disconnect (one task per request, not two)."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone = True
                me.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        result = await aw
    except asyncio.CancelledError:
        if not gone:
            raise
        result = None
    finally:
        watcher.cancel()
    if gone:
        me.uncancel()
        svc.metrics.disconnects += 1
        raise ClientGone()
    return result


def count_disconnect(svc: Service):
    def f() -> None:
        svc.metrics.disconnects += 1

    return f


def stream_producer(start, started: dict[str, Any], compat: bool, encoding: str):
    """SSE events for one command: started, then stdout/stderr chunks as they come (plus the reference
    clients' ``output`` events when ``compat``), then exit (the full result minus output) and done."""
    from datetime import UTC, datetime

    async def produce(q: asyncio.Queue) -> None:
        await q.put(("started", {**started, "timestamp": datetime.now(UTC).isoformat()}))
        dec = TextDecoders()

        async def emit(fd: int, text: str | None, raw: bytes) -> None:
            stream = "stdout" if fd == 1 else "stderr"
            if encoding == "base64":
                data = {"data": base64.b64encode(raw).decode(), "stream": stream, "encoding": "base64"}
            else:
                if not text:
                    return
                data = {"data": text, "stream": stream}
            await q.put((stream, data))
            if compat:
                await q.put(("output", data))

        async def on_output(fd: int, data: bytes) -> None:
            await emit(fd, dec.decode(fd, data) if encoding == "text" else None, data)

        try:
            result = await start(on_output)
            if encoding == "text":
                for fd in (1, 2):
                    tail = dec.flush(fd)
                    if tail:
                        await emit(fd, tail, b"")
            d = result_dict(result)
            summary = {k: d[k] for k in ("exit_code", "signal", "timed_out", "oom_killed", "truncated", "timings")}
            await q.put(("exit", summary))
            await q.put(("done", {**summary, "success": result.exit_code == 0}))
        except AgentKernelError as exc:
            await q.put(("error", {"message": exc.message, "hint": exc.hint, "status": exc.http_status}))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream failed")
            await q.put(("error", {"message": "internal error", "status": 500}))

    return produce


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        typ = e.get("type", "")
        if typ == "json_invalid":
            parts.append("malformed JSON body")
        elif typ == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif typ == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


def describe_pydantic(exc: Exception) -> str:
    errs = getattr(exc, "errors", None)
    if callable(errs):
        return describe_validation(RequestValidationError(errs()))
    return "invalid request body"
