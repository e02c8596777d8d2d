"""Server routes: liveness, metrics, and the API description (behind the token when tokens are set)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from .. import models as M
from ..deps import Svc, Tenant

router = APIRouter()


@router.get("/health", tags=["server"], response_model=M.Envelope[str])
async def health():
    """Liveness (no authentication): ``{"success": true, "data": "ok"}``."""
    return M.envelope("ok")


@router.get("/metrics", tags=["server"], response_class=PlainTextResponse)
async def metrics(tenant: Tenant, svc: Svc):
    """Prometheus text. An admin token (``[api] admins``; the local user when no token is configured)
    sees the whole server: pools, requests, runs, sandboxes. Any other token sees only its own
    tenant's runs and sandboxes."""
    whole = svc.policy.is_admin(tenant)
    try:
        boxes = await svc.manager.list(all_tenants=True) if whole else await svc.manager.list(tenant)
    except Exception:
        boxes = []
    text = svc.metrics.render(svc.pools() if whole else [], boxes,
                              svc.active if whole else svc.admission.runs_by.get(tenant, 0),
                              tenant=None if whole else tenant)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request, tenant: Tenant):
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(tenant: Tenant) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="agentkernel API")
