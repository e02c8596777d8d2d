"""Interactive attach: a PTY session in a named sandbox over a websocket (Origin checked by the guard)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

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
    await serve_websocket(websocket, svc, tenant, name)
