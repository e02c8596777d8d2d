"""The fast path in front of the FastAPI application: ``POST /run`` and ``POST /sandboxes/{name}/exec``
without the framework's per-request machinery (middleware stack, routing, dependency solving), for
throughput (issue 18: ``serve`` at 10 concurrent clients).

The semantics stay those of the FastAPI routes because nothing is re-implemented here:

- a request is taken only when it is the plain case: no refusal by the request guard (``guard.py``,
  the same ``RequestGuard`` settings), a declared and counted body within its limit, a JSON content type,
  a body the route's own body field accepts (parsed as Starlette parses it, validated by FastAPI's own
  field of that route) and a bearer token that maps to a tenant (``deps.tenant_for``, ``deps.bearer_scheme``).
  Anything else (malformed JSON, unknown fields, a missing token, an oversize body, a refused Origin...)
  is handed to the FastAPI application unchanged, the body already read replayed to it: every such error
  comes from the one place that produces it;
- the route's own endpoint function is called (``routes/runs.py: run``, ``routes/sandboxes.py:
  exec_in_sandbox``) with the same arguments FastAPI would pass, so policy, admission, the service calls
  and the disconnect handling are the route's;
- its result is serialized through the route's own response field (validation and ``dump_json``, what
  FastAPI does for these routes), and an exception raised by the endpoint is rendered by the
  application's own exception handlers: the same status, headers and bytes;
- the request is counted in the metrics under the route's path, as the guard counts it.

``tests/api/test_api_fastpath.py`` sends the same valid and invalid requests through both and compares
status, headers and body. ``AGENTKERNEL_API_FASTPATH=0`` turns it off (``app.serve_app``).
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request

from .deps import bearer_scheme, tenant_for
from .guard import RequestGuard, declared_length

log = logging.getLogger("agentkernel.api")

_JSON = b"application/json"
_EXEC_PREFIX, _EXEC_SUFFIX = "/sandboxes/", "/exec"


class _Route:
    """One route the fast path serves: its endpoint, body field and response field, from FastAPI's own
    route object."""

    def __init__(self, route: APIRoute, path_param: str | None) -> None:
        self.route = route
        self.path = route.path
        self.endpoint = route.endpoint
        self.path_param = path_param
        self.response_field = route.response_field
        params = inspect.signature(route.endpoint).parameters
        self.body_field = route.body_field
        # the fast path passes exactly these; a route that grows another parameter is left to FastAPI
        expected = {"body", "tenant", "svc", "request"} | ({path_param} if path_param else set())
        self.usable = (self.body_field is not None and self.response_field is not None and route.status_code is None
                       and not route.dependencies and set(params) == expected)


class FastPath:
    """ASGI front of ``app``: the two hot routes handled directly, everything else passed through."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state  # what deps reads through request.app.state
        self.svc = app.state.service
        self.guard = RequestGuard(None, **app.state.guard)
        self.handlers = app.exception_handlers
        routes: dict[tuple[str, str], APIRoute] = {}
        for r in _api_routes(app.routes):
            for m in r.methods:
                routes.setdefault((r.path, m), r)
        run = routes.get(("/run", "POST"))
        exe = routes.get(("/sandboxes/{name}/exec", "POST"))
        self.run = _Route(run, None) if run is not None else None
        self.exec = _Route(exe, "name") if exe is not None else None
        if self.run is not None and not self.run.usable:
            self.run = None
        if self.exec is not None and not self.exec.usable:
            self.exec = None

    def __getattr__(self, name: str) -> Any:  # app.state, app.openapi ... of the application behind
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/run" and self.run is not None:
                return await self._serve(self.run, None, scope, receive, send)
            if (path.startswith(_EXEC_PREFIX) and path.endswith(_EXEC_SUFFIX) and self.exec is not None):
                name = path[len(_EXEC_PREFIX):-len(_EXEC_SUFFIX)]
                if name and "/" not in name:
                    return await self._serve(self.exec, name, scope, receive, send)
        await self.app(scope, receive, send)

    async def _serve(self, rt: _Route, name: str | None, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        limit = self.guard._limit(scope)
        if (self.guard._refusal(scope, headers) is not None or declared_length(headers) > limit
                or headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower() != _JSON):
            return await self.app(scope, receive, send)
        # the body, counted as the guard counts it
        received: list[dict] = []
        size, more = 0, True
        while more:
            msg = await receive()
            received.append(msg)
            if msg["type"] != "http.request":
                return await self.app(scope, _replay(received, receive), send)
            size += len(msg.get("body", b""))
            if size > limit:
                return await self.app(scope, _replay(received, receive), send)
            more = msg.get("more_body", False)
        body = received[0].get("body", b"") if len(received) == 1 else b"".join(m.get("body", b"") for m in received)
        scope["app"] = self.app
        request = Request(scope, receive)
        try:
            model, errors = rt.body_field.validate(json.loads(body), {}, loc=("body",))  # Starlette's request.json()
        except Exception:
            errors = True
        if errors:
            return await self.app(scope, _replay(received, receive), send)
        tenant = tenant_for(request, await bearer_scheme(request))
        if tenant is None:
            return await self.app(scope, _replay(received, receive), send)
        # from here on the request is the route's: its endpoint, its response field, the app's handlers
        scope["route"] = rt.route
        status = 500
        try:
            kwargs = {"body": model, "tenant": tenant, "svc": self.svc, "request": request}
            if rt.path_param:
                kwargs[rt.path_param] = name
                scope["path_params"] = {rt.path_param: name}
            content = await rt.endpoint(**kwargs)
            value, errors = rt.response_field.validate(content, {}, loc=("response",))
            if errors:
                raise ValueError(f"response validation failed: {errors}")
            raw = rt.response_field.serialize_json(value, by_alias=True)
            status = 200
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(raw)).encode()), (b"content-type", _JSON)]})
            await send({"type": "http.response.body", "body": raw})
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            self.svc.metrics.request("POST", rt.path, status)

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            h = self.handlers.get(cls)
            if h is not None:
                return h
        return None


def _api_routes(routes) -> list[APIRoute]:
    """The application's API routes in matching order, through routers included without a prefix or
    dependencies (an include that adds any leaves its routes to FastAPI)."""
    out: list[APIRoute] = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append(r)
            continue
        ctx, inner = getattr(r, "include_context", None), getattr(r, "original_router", None)
        if inner is not None and ctx is not None and not ctx.prefix and not ctx.dependencies:
            out += _api_routes(inner.routes)
    return out


def _replay(messages: list[dict], receive):
    """A receive() that returns the messages already read, then reads on."""
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
