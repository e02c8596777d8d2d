"""The ASGI layer in front of every route (REST, websocket and the mounted MCP app): who may talk to
the server at all, and how large a request body may be.

- Origin: a request that changes state (any method but GET/HEAD/OPTIONS, and every websocket) carrying
  an ``Origin`` header is refused with 403 unless that origin is listed in ``[api] allowed_origins``;
  ``Origin: null`` (sandboxed iframes, ``data:`` pages) is never allowed. Clients that are not browsers
  send no Origin and are not affected.
- Without a token, only loopback ``Host`` and ``Origin`` headers are accepted (DNS-rebinding guard).
- Body size: counted as it streams (a lying or absent Content-Length does not help), 413 beyond it.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from .policy import check_origin

JSON_BODY_LIMIT = 1 << 20  # 1 MiB for JSON requests
JSON_FILE_LIMIT = 64 << 20  # JSON file uploads (base64 content, reference-compatible)
RAW_FILE_LIMIT = 1 << 30  # streamed raw file uploads
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class BodyTooLarge(HTTPException):
    """Raised from receive(): FastAPI re-raises HTTPExceptions met while reading a body (anything else
    would become a 400), and the guard renders it as a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class RequestGuard:
    def __init__(self, app, *, tokens, allowed_origins: frozenset[str], metrics, json_limit: int = JSON_BODY_LIMIT,
                 raw_file_limit: int = RAW_FILE_LIMIT) -> None:
        self.app = app
        self.tokens = tokens
        self.allowed_origins = allowed_origins
        self.metrics = metrics
        self.json_limit = json_limit
        self.raw_file_limit = raw_file_limit

    def _limit(self, scope) -> int:
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "PUT" and "/files/" in path:
            ctype = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip()
            return JSON_FILE_LIMIT if ctype == b"application/json" else self.raw_file_limit
        return self.json_limit

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> str | None:
        """Why this request is refused before any route sees it, or None."""
        raw = headers.get(b"origin")
        origin = raw.decode("latin-1") if raw is not None else None
        if scope["type"] == "websocket" or scope.get("method", "") not in SAFE_METHODS:
            why = check_origin(origin, self.allowed_origins)
            if why:
                return why
        if not self.tokens and not loopback_request(headers):
            # no token: only pages/tools on this host may talk to us (DNS-rebinding and cross-site guard)
            return "without an API token only loopback Host/Origin headers are accepted"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        why = self._refusal(scope, headers)
        if scope["type"] == "websocket":
            if why:
                await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
                return
            return await self.app(scope, receive, send)
        if why:
            await send_json(send, 403, {"success": False, "error": "forbidden: " + why})
            self.metrics.request(scope.get("method", ""), "(guard)", 403)
            return
        limit = self._limit(scope)
        status_box = {"status": 500, "started": False}
        if declared_length(headers) > limit:
            await send_json(send, 413, {"success": False, "error": f"request body too large (limit {limit} bytes)"})
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
                await send_json(send, 413, {"success": False,
                                            "error": f"request body too large (limit {limit} bytes)"})
        finally:
            route = scope.get("route")
            self.metrics.request(scope.get("method", ""), getattr(route, "path", "(unmatched)"), status_box["status"])


def declared_length(headers: dict[bytes, bytes]) -> int:
    """The request's Content-Length (0 when absent or not a number: the body is counted as it streams)."""
    try:
        return int(headers.get(b"content-length", b"0") or 0)
    except ValueError:
        return 0


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _host_only(value: str) -> str:
    v = value.strip().lower()
    if "://" in v:
        v = v.split("://", 1)[1]
    v = v.split("/", 1)[0]
    if v.startswith("["):
        return v.split("]", 1)[0] + "]"
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def _loopback_host(value: str) -> bool:
    h = _host_only(value)
    return h in _LOOPBACK_HOSTS or h.startswith("127.")


def loopback_request(headers: dict[bytes, bytes]) -> bool:
    host = headers.get(b"host", b"").decode("latin-1")
    if host and not _loopback_host(host):
        return False
    origin = headers.get(b"origin")
    if origin is not None:
        o = origin.decode("latin-1")
        return o != "null" and _loopback_host(o)
    return True


async def send_json(send, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})
