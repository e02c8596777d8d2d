"""Interactive attach: a PTY session in a named sandbox over a websocket (Origin checked by the guard; a
session counts against the caller's concurrent runs)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from ...errors import TooManyRequests
from ..auth import LOCAL_TENANT, bearer

router = APIRouter()


@router.websocket("/sandboxes/{name}/attach")
async def attach_ws(websocket: WebSocket, name: str):
    from ...attach import serve_websocket

    settings, svc = websocket.app.state.settings, websocket.app.state.service
    tenant = LOCAL_TENANT
    if settings.tokens:
        tenant = settings.tokens.tenant_for(bearer(websocket.headers.get("authorization")))
        if tenant is None:
            svc.metrics.auth_failures += 1
            await websocket.close(code=1008, reason="unauthorized")
            return
    try:
        ticket = svc.admission.runs(tenant, 1, oneshot=False)  # a session counts as a concurrent run
    except TooManyRequests as exc:
        await websocket.close(code=1013, reason=exc.message[:120])  # 1013: try again later
        return
    try:
        await serve_websocket(websocket, svc, tenant, name)
    finally:
        ticket.release()
