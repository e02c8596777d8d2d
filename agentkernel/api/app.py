"""The FastAPI application behind ``agentkernel serve``: assembly only.

One ``Service`` (one embedded daemon with the warm pools + one sandbox manager + the server's policy
for remote callers) is created at start-up and closed at shutdown; every route uses it. The routes
live in ``api/routes/`` (one module per resource group), the request guard (Origin, loopback, body
size) in ``api/guard.py``, the MCP server mounted at ``/mcp`` in ``api/mcp.py``. See docs/api.md.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AgentKernelError, TooManyRequests
from . import models as M
from . import refops, refroutes
from .auth import TokenSet
from .deps import UNAUTHORIZED, ClientGone, Unauthorized, describe_validation
from .guard import JSON_BODY_LIMIT, RAW_FILE_LIMIT, RequestGuard
from .policy import ServerPolicy
from .routes import ROUTERS
from .service import Service

log = logging.getLogger("agentkernel.api")

_REF = "#/components/schemas/"
_ERROR_RESPONSES = {
    "400": "malformed JSON, unknown fields, invalid names/paths/values",
    "403": "not allowed by the server's policy for this caller (backend, profile, network, resources), a "
           "browser Origin not in [api] allowed_origins, or (without a token) a non-loopback Host/Origin",
    "404": "no such sandbox (for this token), file or route",
    "409": "name taken, or the sandbox is not in a state that allows this",
    "413": "request body (or a file returned as JSON) too large",
    "422": "the backend cannot enforce the requested policy, or an unsupported field was set",
    "429": "a limit on live sandboxes, concurrent runs or batch size (per token or server-wide): see Retry-After",
    "500": "internal error (details in the server log only)",
    "503": "the backend's engine is unavailable",
}
_NO_BODY_GETS = ("/health", "/metrics", "/sandboxes")


class Settings:
    def __init__(self, *, tokens: TokenSet | None = None, config: dict | None = None, pool_min: int | None = None,
                 pool_max: int | None = None, warm: list[str] | None = None, raw_file_limit: int = RAW_FILE_LIMIT,
                 json_limit: int = JSON_BODY_LIMIT, default_timeout: float | None = None, mcp: bool = True,
                 with_daemon: bool = True, bind_host: str = "127.0.0.1", policy: ServerPolicy | None = None) -> None:
        self.bind_host = bind_host
        self.tokens = tokens or TokenSet()
        self.config = config or {}
        self.pool_min, self.pool_max, self.warm = pool_min, pool_max, warm
        self.raw_file_limit = raw_file_limit
        self.json_limit = json_limit
        self.default_timeout = default_timeout
        self.mcp = mcp
        self.with_daemon = with_daemon
        self.policy = policy or ServerPolicy.from_config(self.config, local_tenant=None if self.tokens else "local")


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = service or Service(config=settings.config, pool_min=settings.pool_min, pool_max=settings.pool_max,
                             warm=settings.warm, with_daemon=settings.with_daemon, policy=settings.policy,
                             **({"default_timeout": settings.default_timeout} if settings.default_timeout else {}))
    mcp_app = mcp_manager = None
    if settings.mcp:
        try:
            from .mcp import build_server, mcp_auth

            mcp_server = build_server(svc, settings.tokens)
            mcp_app = mcp_server.streamable_http_app(streamable_http_path="/", stateless_http=True, host="0.0.0.0")
            mcp_manager = mcp_server.session_manager
        except ImportError:
            mcp_app = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        await refops.startup(svc)
        try:
            if mcp_manager is not None:
                async with mcp_manager.run():
                    yield
            else:
                yield
        finally:
            await refops.shutdown(svc)
            await svc.close()

    app = FastAPI(
        title="agentkernel",
        version=__version__,
        description="Run untrusted commands in isolated sandboxes. Responses use the envelope "
        "`{success, data, error}`; see docs/api.md.",
        lifespan=lifespan,
        responses={401: {"model": M.ErrorEnvelope, "description": "missing or wrong bearer token"}},
        docs_url=None, redoc_url=None, openapi_url=None,  # served by routes/server.py, behind the token
    )
    app.state.service = svc
    app.state.settings = settings
    app.state.guard = dict(tokens=settings.tokens, allowed_origins=settings.policy.allowed_origins,
                           metrics=svc.metrics, json_limit=settings.json_limit, raw_file_limit=settings.raw_file_limit)
    app.add_middleware(RequestGuard, **app.state.guard)
    _error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(refroutes.router)  # the reference clients' later routes
    if mcp_app is not None:
        app.mount("/mcp", mcp_auth(mcp_app, settings.tokens, svc))
    app.openapi = _openapi(app)
    return app


def serve_app(settings: Settings | None = None):
    """What ``agentkernel serve`` runs: the application behind its fast path (``fastpath.py``: ``/run`` and
    exec without the framework's per-request machinery), unless ``AGENTKERNEL_API_FASTPATH=0``."""
    import os

    from .fastpath import FastPath

    app = create_app(settings)
    return app if os.environ.get("AGENTKERNEL_API_FASTPATH", "1") == "0" else FastPath(app)


def _error_handlers(app: FastAPI) -> None:
    """The envelope everywhere, no tracebacks."""

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: Exception):
        return JSONResponse({"success": False, "error": "client disconnected"}, status_code=499)

    @app.exception_handler(Unauthorized)
    async def _unauth(request: Request, exc: Unauthorized):
        return JSONResponse(UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(AgentKernelError)
    async def _ak_error(request: Request, exc: AgentKernelError):
        body = {"success": False, "error": exc.message}
        if exc.hint:
            body["hint"] = exc.hint
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyRequests) else None
        return JSONResponse(body, status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"success": False, "error": describe_validation(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"success": False, "error": msg}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"success": False, "error": "internal error"}, status_code=500)


def _openapi(app: FastAPI):
    """The generated schema plus the error responses and the schema components referenced by hand."""
    generated = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = generated()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        err = {"content": {"application/json": {"schema": {"$ref": _REF + "ErrorEnvelope"}}}}
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                resp = op.setdefault("responses", {})
                resp.pop("422", None)
                if path != "/health":
                    resp.setdefault("401", {"description": "missing or wrong bearer token", **err})
                for code, what in _ERROR_RESPONSES.items():
                    if code == "400" and method == "get" and path in _NO_BODY_GETS:
                        continue
                    resp.setdefault(code, {"description": what, **err})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        comps.setdefault("FileWriteRequest", M.FileWriteRequest.model_json_schema(ref_template=_REF + "{model}"))
        env = M.Envelope[M.FileReadResponse].model_json_schema(ref_template=_REF + "{model}")
        for k, v in env.pop("$defs", {}).items():
            comps.setdefault(k, v)
        comps.setdefault("FileReadEnvelope", env)
        app.openapi_schema = schema
        return schema

    return openapi
