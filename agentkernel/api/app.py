"""The FastAPI application behind ``agentkernel serve``.

One ``Service`` (one embedded daemon with the warm pools + one sandbox manager) is created at start-up
and closed at shutdown; every route uses it. See docs/api.md for the route table and the notes on
compatibility with the reference system's clients.
"""


import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AgentKernelError, ValidationError
from . import models as M
from . import refops
from .auth import LOCAL_TENANT, TokenSet, bearer
from .service import (
    STREAM_OUTPUT_LIMIT,
    Service,
    check_image,
    file_path,
    refuse_unsupported,
    result_dict,
    sandbox_info,
)
from .sse import EventStream, TextDecoders

log = logging.getLogger("agentkernel.api")

JSON_BODY_LIMIT = 1 << 20  # 1 MiB for JSON requests
JSON_FILE_LIMIT = 64 << 20  # JSON file uploads (base64 content, reference-compatible)
RAW_FILE_LIMIT = 1 << 30  # streamed raw file uploads
JSON_READ_LIMIT = 16 << 20  # files returned inside JSON; larger ones must be downloaded raw

UNAUTHORIZED = {"success": False, "error": "unauthorized"}
_REF = "#/components/schemas/"
_ERROR_RESPONSES = {
    "400": "malformed JSON, unknown fields, invalid names/paths/values",
    "403": "without a token, only loopback Host/Origin headers are accepted",
    "404": "no such sandbox (for this token), file or route",
    "409": "name taken, or the sandbox is not in a state that allows this",
    "413": "request body (or a file returned as JSON) too large",
    "422": "the backend cannot enforce the requested policy, or an unsupported field was set",
    "500": "internal error (details in the server log only)",
    "503": "the backend's engine is unavailable",
}


class Settings:
    def __init__(self, *, tokens: TokenSet | None = None, config: dict | None = None, pool_min: int | None = None,
                 pool_max: int | None = None, warm: list[str] | None = None, raw_file_limit: int = RAW_FILE_LIMIT,
                 json_limit: int = JSON_BODY_LIMIT, default_timeout: float | None = None, mcp: bool = True,
                 with_daemon: bool = True, bind_host: str = "127.0.0.1") -> None:
        self.bind_host = bind_host
        self.tokens = tokens or TokenSet()
        self.config = config or {}
        self.pool_min, self.pool_max, self.warm = pool_min, pool_max, warm
        self.raw_file_limit = raw_file_limit
        self.json_limit = json_limit
        self.default_timeout = default_timeout
        self.mcp = mcp
        self.with_daemon = with_daemon


# ---- body size limits (pure ASGI: counts streamed bodies too) -----------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from receive(): FastAPI re-raises HTTPExceptions met while reading a body (anything else
    would become a 400), and the handler below renders it as a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class LimitsMiddleware:
    def __init__(self, app, settings: Settings, metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    def _limit(self, scope) -> int:
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "PUT" and "/files/" in path:
            ctype = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip()
            return JSON_FILE_LIMIT if ctype == b"application/json" else self.settings.raw_file_limit
        return self.settings.json_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if not self.settings.tokens and not _loopback_request(dict(scope.get("headers") or [])):
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        if not self.settings.tokens and not _loopback_request(headers):
            # no token: only pages/tools on this host may talk to us (DNS-rebinding and cross-site guard)
            await _send_json(send, 403, {"success": False, "error": "forbidden: without an API token only "
                                         "loopback Host/Origin headers are accepted"})
            self.metrics.request(scope.get("method", ""), "(guard)", 403)
            return
        t0 = time.perf_counter()
        status_box = {"status": 500, "started": False}
        try:
            clen = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            clen = 0
        if clen > limit:
            await _send_json(send, 413, {"success": False, "error": f"request body too large (limit {limit} bytes)"})
            self.metrics.request(scope.get("method", ""), "(limit)", 413)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        async def tracking_send(msg):
            if msg["type"] == "http.response.start":
                status_box["status"] = msg["status"]
                status_box["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not status_box["started"]:
                status_box["status"] = 413
                await _send_json(send, 413, {"success": False,
                                             "error": f"request body too large (limit {limit} bytes)"})
        finally:
            route = scope.get("route")
            self.metrics.request(scope.get("method", ""), getattr(route, "path", "(unmatched)"), status_box["status"])
            _ = t0


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _host_only(value: str) -> str:
    v = value.strip().lower()
    if "://" in v:
        v = v.split("://", 1)[1]
    v = v.split("/", 1)[0]
    if v.startswith("["):
        return v.split("]", 1)[0] + "]"
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def _loopback_request(headers: dict[bytes, bytes]) -> bool:
    host = headers.get(b"host", b"").decode("latin-1")
    if host and _host_only(host) not in _LOOPBACK_HOSTS and not _host_only(host).startswith("127."):
        return False
    origin = headers.get(b"origin", b"").decode("latin-1")
    if origin and origin != "null":
        h = _host_only(origin)
        return h in _LOOPBACK_HOSTS or h.startswith("127.")
    return True


async def _send_json(send, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


# ---- the app --------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = service or Service(config=settings.config, pool_min=settings.pool_min, pool_max=settings.pool_max,
                             warm=settings.warm, with_daemon=settings.with_daemon,
                             **({"default_timeout": settings.default_timeout} if settings.default_timeout else {}))
    mcp_app = None
    mcp_manager = None
    if settings.mcp:
        try:
            from ..mcp_server import build_server

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
    )
    app.state.service = svc
    app.state.settings = settings
    app.add_middleware(LimitsMiddleware, settings=settings, metrics=svc.metrics)

    bearer_scheme = HTTPBearer(auto_error=False, description="an API token (AGENTKERNEL_API_TOKENS)")

    class Unauthorized(Exception):
        pass

    def tenant_of(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> str:
        if not settings.tokens:
            return LOCAL_TENANT
        tenant = settings.tokens.tenant_for(creds.credentials if creds else None)
        if tenant is None:
            svc.metrics.auth_failures += 1
            raise Unauthorized()
        return tenant

    Tenant = Annotated[str, Depends(tenant_of)]

    # -- error mapping: envelope everywhere, no tracebacks --
    @app.exception_handler(_ClientGone)
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
        return JSONResponse(body, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"success": False, "error": _describe_validation(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"success": False, "error": msg}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"success": False, "error": "internal error"}, status_code=500)

    # -- health and metrics --
    @app.get("/health", tags=["server"], response_model=M.Envelope[str])
    async def health():
        """Liveness (no authentication): ``{"success": true, "data": "ok"}``."""
        return M.envelope("ok")

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def metrics(tenant: Tenant):
        """Prometheus text: pool sizes, hits/misses, run latency histograms, sandboxes by backend/state."""
        try:
            boxes = await svc.manager.list(all_tenants=True)
        except Exception:
            boxes = []
        text = svc.metrics.render(svc.pools(), boxes, svc.active)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- one-shot runs --
    def _run_spec(body: M.RunRequest | M.BatchCommand):
        return svc.spec(image=body.image, profile=body.profile, backend=getattr(body, "backend", None),
                        network=getattr(body, "network", None), argv=body.command)

    def _cwd(body) -> str | None:
        return getattr(body, "cwd", None) or getattr(body, "workdir", None)

    @app.post("/run", tags=["run"], response_model=M.Envelope[M.RunResult])
    async def run(body: M.RunRequest, tenant: Tenant, request: Request):
        """Run one command in a fresh sandbox (from the warm pool unless ``fast`` is false); the sandbox
        is destroyed afterwards. A non-zero exit is a successful request: see ``exit_code``."""
        spec = _run_spec(body)
        req = svc.exec_request(body.command, env=body.env, cwd=_cwd(body), timeout=body.timeout, stdin=body.stdin,
                               output_limit=body.output_limit)
        result = await _unless_disconnected(request, svc, svc.run(spec, req, fast=body.fast is not False))
        return M.envelope(result_dict(result))

    @app.post("/run/stream", tags=["run"], response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}, "description": "SSE: started, stdout/stderr "
                               "(and reference-compatible output), exit, done; or error"}})
    async def run_stream(body: M.RunRequest, tenant: Tenant, compat: bool = True,
                         encoding: Annotated[str, Query(pattern="^(text|base64)$")] = "text"):
        """Stream a one-shot run as server-sent events. Disconnecting kills the command and destroys
        its sandbox."""
        spec = _run_spec(body)
        check_image(spec)  # before the stream starts: errors are plain HTTP errors
        started = {"command": body.command, "fast": body.fast is not False, "backend": spec.backend,
                   "image": spec.image}

        def start(on_output):
            req = svc.exec_request(body.command, env=body.env, cwd=_cwd(body), timeout=body.timeout,
                                   stdin=body.stdin, on_output=on_output, output_limit=STREAM_OUTPUT_LIMIT)
            return svc.run(spec, req, fast=body.fast is not False)

        return EventStream(_stream_producer(start, started, compat, encoding), _count_disconnect(svc))

    @app.post("/batch/run", tags=["run"], response_model=M.Envelope[M.BatchRunResponse])
    async def batch_run(body: M.BatchRunRequest, tenant: Tenant, request: Request):
        """Run several commands in parallel, each in its own fresh sandbox."""

        async def one(cmd: M.BatchCommand) -> dict[str, Any]:
            try:
                spec = _run_spec(cmd)
                req = svc.exec_request(cmd.command, env=cmd.env, cwd=cmd.cwd, timeout=cmd.timeout)
                r = result_dict(await svc.run(spec, req))
                return {k: r[k] for k in ("output", "exit_code", "stdout", "stderr", "timed_out", "truncated",
                                          "timings")} | {"error": None}
            except AgentKernelError as exc:
                return {"output": None, "error": exc.message}

        results = await _unless_disconnected(request, svc, asyncio.gather(*(one(c) for c in body.commands)))
        return M.envelope({"results": list(results)})

    # -- named sandboxes --
    @app.get("/sandboxes", tags=["sandboxes"], response_model=M.Envelope[list[M.SandboxInfo]])
    async def list_sandboxes(tenant: Tenant):
        return M.envelope(await svc.list(tenant))

    @app.post("/sandboxes", tags=["sandboxes"], status_code=201, response_model=M.Envelope[M.SandboxInfo])
    async def create_sandbox(body: M.CreateSandboxRequest, tenant: Tenant):
        """Create a named, long-lived sandbox (started unless ``start`` is false)."""
        refuse_unsupported(secrets=body.secrets, secret_files=body.secret_files)
        from ..spec import validate_name

        validate_name(body.name)
        if body.source_url:
            refops.check_source_url(body.source_url)
            refops.check_source_ref(body.source_ref)
        if body.ttl is not None:
            refops.parse_ttl(body.ttl)
        from .service import check_cwd, env_dict

        spec = svc.spec(image=body.image, profile=body.profile, backend=body.backend, network=body.network,
                        read_only=body.read_only, memory_mb=body.memory_mb, vcpus=body.vcpus, pids=body.pids,
                        disk_mb=body.disk_mb, env=env_dict(body.env), workdir=check_cwd(body.workdir),
                        name=body.name, options=refops.volume_option(body.volumes))
        info = await svc.create(tenant, spec, start=body.start)
        if body.source_url or body.ttl is not None or svc.config.get("files"):
            info |= await refops.after_create(svc, tenant, body.name, source_url=body.source_url,
                                              source_ref=body.source_ref, ttl=body.ttl)
        return M.envelope(info)

    @app.get("/sandboxes/{name}", tags=["sandboxes"], response_model=M.Envelope[M.SandboxInfo])
    async def get_sandbox(name: str, tenant: Tenant):
        return M.envelope(await svc.info(tenant, name))

    @app.delete("/sandboxes/{name}", tags=["sandboxes"], response_model=M.Envelope[str])
    async def remove_sandbox(name: str, tenant: Tenant):
        await svc.remove(tenant, name)
        return M.envelope("Sandbox removed")

    @app.post("/sandboxes/{name}/start", tags=["sandboxes"], response_model=M.Envelope[M.SandboxInfo])
    async def start_sandbox(name: str, tenant: Tenant):
        return M.envelope(await svc.start_sandbox(tenant, name))

    @app.post("/sandboxes/{name}/stop", tags=["sandboxes"], response_model=M.Envelope[M.SandboxInfo])
    async def stop_sandbox(name: str, tenant: Tenant):
        return M.envelope(await svc.stop_sandbox(tenant, name))

    def _exec_req(body: M.ExecRequestBody, on_output=None, output_limit=None):
        return svc.exec_request(body.command, env=body.env, cwd=body.workdir or body.cwd, timeout=body.timeout,
                                stdin=body.stdin, on_output=on_output,
                                output_limit=output_limit if output_limit is not None else body.output_limit)

    @app.post("/sandboxes/{name}/exec", tags=["sandboxes"], response_model=M.Envelope[M.RunResult])
    async def exec_in_sandbox(name: str, body: M.ExecRequestBody, tenant: Tenant, request: Request):
        """Run a command in a running named sandbox. A non-zero exit is a successful request."""
        if body.sudo:
            refops.check_sudo(svc, tenant, name)
        req = _exec_req(body)
        return M.envelope(result_dict(await _unless_disconnected(request, svc, svc.exec(tenant, name, req))))

    @app.post("/sandboxes/{name}/exec/stream", tags=["sandboxes"], response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def exec_stream(name: str, body: M.ExecRequestBody, tenant: Tenant, compat: bool = True,
                          encoding: Annotated[str, Query(pattern="^(text|base64)$")] = "text"):
        """Stream an exec as server-sent events; disconnecting kills the command."""
        if body.sudo:
            refops.check_sudo(svc, tenant, name)
        _exec_req(body)  # validate before the stream starts (errors are plain HTTP errors)
        rec = svc.manager.get(_checked_name(name), tenant)
        started = {"command": body.command, "sandbox": name, "backend": rec.backend}

        def start(on_output):
            return svc.exec(tenant, name, _exec_req(body, on_output, STREAM_OUTPUT_LIMIT))

        return EventStream(_stream_producer(start, started, compat, encoding), _count_disconnect(svc))

    # -- files --
    @app.get("/sandboxes/{name}/files/{path:path}", tags=["files"],
             responses={200: {"content": {"application/json": {"schema": {"$ref": _REF + "FileReadEnvelope"}},
                                          "application/octet-stream": {}},
                              "description": "JSON {content, encoding, size} (reference-compatible), or the raw "
                              "bytes streamed with Accept: application/octet-stream (or ?raw=true)"}})
    async def read_file(name: str, path: str, request: Request, tenant: Tenant, raw: bool = False):
        p = file_path(path)
        first, rest = await svc.read_file_head(tenant, name, p)
        accept = request.headers.get("accept", "")
        if raw or ("application/octet-stream" in accept and "application/json" not in accept):
            async def body():
                if first is not None:
                    yield first
                async for chunk in rest:
                    yield chunk

            return StreamingResponse(body(), media_type="application/octet-stream",
                                     headers={"X-Content-Type-Options": "nosniff"})
        buf = bytearray(first or b"")
        async for chunk in rest:
            buf += chunk
            if len(buf) > JSON_READ_LIMIT:
                with contextlib.suppress(Exception):
                    await rest.aclose()
                raise _TooLarge(f"file is larger than {JSON_READ_LIMIT} bytes: download it raw "
                                "(Accept: application/octet-stream or ?raw=true)")
        data = bytes(buf)
        try:
            content, enc = data.decode("utf-8"), "utf8"
        except UnicodeDecodeError:
            content, enc = base64.b64encode(data).decode(), "base64"
        return M.envelope({"content": content, "encoding": enc, "size": len(data)})

    @app.put("/sandboxes/{name}/files/{path:path}", tags=["files"], response_model=M.Envelope[M.FileWriteResult],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": _REF + "FileWriteRequest"}},
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def write_file(name: str, path: str, request: Request, tenant: Tenant,
                         mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None):
        """Write a file: JSON ``{content, encoding: utf8|base64}`` (reference-compatible), or any other
        content type as the raw bytes, streamed to the sandbox (no buffering, limit 1 GiB)."""
        p = file_path(path)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = M.FileWriteRequest.model_validate_json(await request.body())
            except ValueError as exc:
                raise ValidationError(_describe_pydantic(exc)) from None
            if body.encoding == "base64":
                try:
                    data = base64.b64decode(body.content, validate=True)
                except (binascii.Error, ValueError):
                    raise ValidationError("content is not valid base64") from None
            else:
                data = body.content.encode()
            n = await svc.write_file(tenant, name, p, data, body.mode if body.mode is not None else mode)
        else:
            svc.manager.get(_checked_name(name), tenant)
            n = await svc.write_file(tenant, name, p, request.stream(), mode)
        return M.envelope({"path": p, "size": n})

    @app.delete("/sandboxes/{name}/files/{path:path}", tags=["files"], response_model=M.Envelope[str])
    async def delete_file(name: str, path: str, tenant: Tenant):
        p = file_path(path)
        await svc.delete_file(tenant, name, p)
        return M.envelope(f"Deleted {p}")

    @app.get("/sandboxes/{name}/logs", tags=["sandboxes"], response_model=M.Envelope[list[dict[str, Any]]])
    async def sandbox_logs(name: str, tenant: Tenant, last: Annotated[int | None, Query(ge=1, le=100000)] = None):
        """Audit events of this sandbox (lifecycle, commands, file transfers)."""
        return M.envelope(svc.logs(tenant, name, last))

    # -- interactive attach (websocket) --
    @app.websocket("/sandboxes/{name}/attach")
    async def attach_ws(websocket: WebSocket, name: str):
        from ..attach import serve_websocket

        tenant = LOCAL_TENANT
        if settings.tokens:
            tenant = settings.tokens.tenant_for(bearer(websocket.headers.get("authorization")))
            if tenant is None:
                svc.metrics.auth_failures += 1
                await websocket.close(code=1008, reason="unauthorized")
                return
        await serve_websocket(websocket, svc, tenant, name)

    from .refroutes import build_router

    app.include_router(build_router(svc, tenant_of))  # the reference clients' later routes

    if mcp_app is not None:
        app.mount("/mcp", _mcp_auth(mcp_app, settings, svc))

    # extra schema components referenced by hand-written content types above
    _orig_openapi = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = _orig_openapi()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        err = {"content": {"application/json": {"schema": {"$ref": _REF + "ErrorEnvelope"}}}}
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                resp = op.setdefault("responses", {})
                resp.pop("422", None)
                if path != "/health":
                    resp.setdefault("401", {"description": "missing or wrong bearer token", **err})
                for code, what in _ERROR_RESPONSES.items():
                    if code == "400" and method == "get" and path in ("/health", "/metrics", "/sandboxes"):
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

    app.openapi = openapi
    return app


class _TooLarge(AgentKernelError):
    http_status = 413


def _checked_name(name: str) -> str:
    from ..spec import validate_name

    return validate_name(name)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, svc: Service, aw):
    """Await ``aw`` (a run or exec), cancelling it — which kills the command and, for one-shot runs,
    destroys the sandbox — if the client disconnects first (the body has been read by now, so the
    next ASGI message can only be the disconnect)."""
    task = asyncio.ensure_future(aw)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        svc.metrics.disconnects += 1
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _count_disconnect(svc: Service):
    def f() -> None:
        svc.metrics.disconnects += 1

    return f


def _stream_producer(start, started: dict[str, Any], compat: bool, encoding: str):
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


def _describe_validation(exc: RequestValidationError) -> str:
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


def _describe_pydantic(exc: Exception) -> str:
    errs = getattr(exc, "errors", None)
    if callable(errs):
        return _describe_validation(RequestValidationError(errs()))
    return "invalid request body"


def _mcp_auth(mcp_app, settings: Settings, svc: Service):
    """The MCP streamable-HTTP app behind the same bearer tokens as the REST routes."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and settings.tokens:
            hdr = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if settings.tokens.tenant_for(bearer(hdr)) is None:
                svc.metrics.auth_failures += 1
                resp = JSONResponse(UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await mcp_app(scope, receive, send)

    return app


_ = (Response, sandbox_info)
