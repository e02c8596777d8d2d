"""The Nomad HTTP API as the nomad backend uses it: jobs, allocations (blocking queries), dispatch,
variables (check-and-set) and the allocation exec websocket. Imported only by the nomad backend.

Exec wire protocol (``/v1/client/allocation/:id/exec``): JSON text frames. Client -> server:
``{"stdin":{"data":"<base64>"}}``, ``{"stdin":{"close":true}}``, ``{"tty_size":{"height":H,"width":W}}``.
Server -> client: ``{"stdout":{"data":"<base64>"}}``, ``{"stderr":{"data":...}}``, ``{"stdout":{"close":true}}``,
and finally ``{"exited":true,"result":{"exit_code":N}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from ..errors import BackendUnavailable, NotFound, SandboxError

STDIN_CHUNK = 64 * 1024


class NomadError(SandboxError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Nomad API: {status}: {message}")
        self.status = status


class NomadNotFound(NomadError, NotFound):
    """404 from Nomad."""


class NomadClient:
    def __init__(self, addr: str, *, token: str | None = None, namespace: str | None = None,
                 region: str | None = None, ca_cert: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None) -> None:
        self.addr = addr.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.region = region
        self._ssl: ssl.SSLContext | None = None
        if self.addr.startswith("https"):
            self._ssl = ssl.create_default_context(cafile=ca_cert)
            if client_cert:
                self._ssl.load_cert_chain(client_cert, client_key)
        headers = {"X-Nomad-Token": token} if token else {}
        self.http = httpx.AsyncClient(base_url=self.addr, headers=headers, verify=self._ssl or True,
                                      timeout=httpx.Timeout(30.0, connect=10.0))

    async def aclose(self) -> None:
        await self.http.aclose()

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        p = dict(params or {})
        if self.namespace:
            p.setdefault("namespace", self.namespace)
        if self.region:
            p.setdefault("region", self.region)
        return p

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                      allow: tuple[int, ...] = (), timeout: float | None = None) -> tuple[Any, int]:
        """(decoded JSON or None, X-Nomad-Index)."""
        try:
            r = await self.http.request(method, path, params=self._params(params),
                                        content=None if body is None else json.dumps(body).encode(),
                                        timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Nomad at {self.addr} is unreachable: {exc}") from None
        index = int(r.headers.get("X-Nomad-Index") or 0)
        if r.status_code in allow:
            return None, index
        if r.status_code >= 300:
            msg = r.text.strip()[:500]
            if r.status_code == 404:
                raise NomadNotFound(404, msg)
            if r.status_code == 403:
                raise NomadError(403, f"{msg} (is NOMAD_TOKEN / [orchestrator] nomad_token set and allowed?)")
            raise NomadError(r.status_code, msg)
        return (r.json() if r.content else None), index

    async def exec(self, alloc_id: str, task: str, argv: list[str], *, stdin: bytes | AsyncIterator[bytes] | None,
                   on_output: Callable[[int, bytes], Any], tty: bool = False,
                   tty_size: tuple[int, int] | None = None) -> int:
        q = self._params({"task": task, "tty": "true" if tty else "false", "command": json.dumps(argv)})
        base = self.addr.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        url = f"{base}/v1/client/allocation/{quote(alloc_id, safe='')}/exec?{urlencode(q)}"
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        try:
            ws = await ws_connect(url, additional_headers=headers, ssl=self._ssl, max_size=None, compression=None,
                                  open_timeout=30, ping_interval=None)
        except websockets.InvalidStatus as exc:
            body = (exc.response.body or b"").decode(errors="replace").strip()
            if exc.response.status_code == 404:
                raise NomadNotFound(404, body or f"allocation {alloc_id} not found") from None
            raise NomadError(exc.response.status_code, body) from None
        except (OSError, websockets.InvalidHandshake) as exc:
            raise BackendUnavailable(f"exec websocket to Nomad failed: {exc}") from None

        async def send(obj: dict[str, Any]) -> None:
            await ws.send(json.dumps(obj))

        async def pump() -> None:
            if tty_size:
                await send({"tty_size": {"height": tty_size[0], "width": tty_size[1]}})
            chunks: Any = [stdin] if isinstance(stdin, bytes | bytearray) else (stdin or [])
            if isinstance(chunks, list):
                for c in chunks:
                    for i in range(0, len(c), STDIN_CHUNK):
                        await send({"stdin": {"data": base64.b64encode(c[i:i + STDIN_CHUNK]).decode()}})
            else:
                async for c in chunks:
                    for i in range(0, len(c), STDIN_CHUNK):
                        await send({"stdin": {"data": base64.b64encode(c[i:i + STDIN_CHUNK]).decode()}})
            await send({"stdin": {"close": True}})

        sender = asyncio.create_task(pump())
        code: int | None = None
        try:
            async for msg in ws:
                frame = json.loads(msg)
                for fd, key in ((1, "stdout"), (2, "stderr")):
                    part = frame.get(key)
                    if part and part.get("data"):
                        r = on_output(fd, base64.b64decode(part["data"]))
                        if asyncio.iscoroutine(r):
                            await r
                if frame.get("exited"):
                    code = exit_code_of(frame)
                    break
        except websockets.ConnectionClosedError as exc:
            if code is None:
                raise SandboxError(f"exec connection to allocation {alloc_id} broke: {exc}") from None
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass
            await ws.close()
        if code is None:
            reason = ws.close_reason or "closed without an exit status"
            raise SandboxError(f"exec in allocation {alloc_id} failed: {reason}")
        return code


def exit_code_of(frame: dict[str, Any]) -> int:
    """The exit status of an exec stream's final frame, ``{"exited": true, "result": {"exit_code": N}}``
    (a missing ``exit_code`` reads as 0)."""
    return int((frame.get("result") or {}).get("exit_code") or 0)
