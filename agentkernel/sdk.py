"""Python SDK for the agentkernel HTTP API (``agentkernel serve``): sync and async, over httpx.

    from agentkernel.sdk import AgentKernel

    with AgentKernel() as ak:                      # AGENTKERNEL_BASE_URL, AGENTKERNEL_API_KEY
        r = ak.run(["python3", "-c", "print(1)"])
        r.exit_code, r.stdout, r.stderr, r.timings
        with ak.sandbox("work") as sb:             # created on enter, removed on exit
            sb.write_file("/tmp/x.py", b"print(2)")
            print(sb.exec(["python3", "/tmp/x.py"]).stdout)
        for ev in ak.run_stream(["sh", "-c", "echo a; echo b >&2"]):
            print(ev.type, ev.data)

    async with AsyncAgentKernel() as ak:
        async with ak.sandbox("work") as sb:
            r = await sb.exec(["echo", "hi"])

Results are typed (``CommandResult``, ``SandboxDetails``, ``StreamEvent``); a command's non-zero exit is a
result, not an exception (``r.check()`` raises ``CommandError`` if you want one). API failures raise
``APIError`` subclasses by status: ``AuthError`` (401), ``NotFoundError`` (404),
``BadRequestError`` (400), ``ConflictError`` (409), ``PolicyError`` (422), ``RateLimitedError`` (429),
``ServerError`` (5xx),
``NetworkError`` (no connection / timeout), ``StreamError`` (a stream ended without a result).
Files travel as raw streamed bytes (not base64 in JSON).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:18888"
DEFAULT_TIMEOUT = 30.0

__all__ = [
    "APIError", "AgentKernel", "AsyncAgentKernel", "AsyncSandboxSession", "AuthError", "BadRequestError",
    "CommandError", "CommandResult", "ConflictError", "NetworkError", "NotFoundError", "PolicyError",
    "RateLimitedError", "SandboxDetails", "SandboxSession", "ServerError", "StreamError", "StreamEvent",
]


# ---- errors ----------------------------------------------------------------------------------------------


class APIError(Exception):
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if status is not None:
            self.status = status


class BadRequestError(APIError):
    status = 400


class AuthError(APIError):
    status = 401


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    status = 409


class PolicyError(APIError):
    status = 422


class RateLimitedError(APIError):
    """429: a limit of the server (live sandboxes, concurrent runs, batch size); retry after ``retry_after`` s."""

    status = 429
    retry_after: float | None = None


class ServerError(APIError):
    status = 500


class NetworkError(APIError):
    pass


class StreamError(APIError):
    pass


class CommandError(APIError):
    """Raised by ``CommandResult.check()`` for a non-zero exit."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"command exited with {result.exit_code}: {result.stderr[-500:]}")
        self.result = result


_BY_STATUS = {400: BadRequestError, 401: AuthError, 404: NotFoundError, 409: ConflictError, 422: PolicyError,
              429: RateLimitedError}


def _error(status: int, text: str, retry_after: str | None = None) -> APIError:
    hint = None
    try:
        body = json.loads(text)
        msg = body.get("error") or text
        hint = body.get("hint")
    except (ValueError, AttributeError):
        msg = text or f"HTTP {status}"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    err = cls(msg, status=status, hint=hint)
    if isinstance(err, RateLimitedError) and retry_after:
        try:
            err.retry_after = float(retry_after)
        except ValueError:
            pass
    return err


# ---- results ---------------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    stdout_bytes: bytes | None = None
    stderr_bytes: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> CommandResult:
        if self.exit_code != 0:
            raise CommandError(self)
        return self

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> CommandResult:
        def raw(key: str) -> bytes:
            b64 = d.get(key + "_base64")
            return base64.b64decode(b64) if b64 else (d.get(key) or "").encode()

        return cls(exit_code=int(d["exit_code"]), stdout=d.get("stdout") or "", stderr=d.get("stderr") or "",
                   signal=d.get("signal"), timed_out=bool(d.get("timed_out")), oom_killed=bool(d.get("oom_killed")),
                   truncated=bool(d.get("truncated")), timings=dict(d.get("timings") or {}),
                   stdout_bytes=raw("stdout"), stderr_bytes=raw("stderr"))


@dataclass
class SandboxDetails:
    name: str
    status: str
    state: str
    backend: str
    uuid: str | None = None
    image: str | None = None
    profile: str | None = None
    vcpus: int | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    created_at: str | None = None

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> SandboxDetails:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StreamEvent:
    """``started``, ``stdout``/``stderr`` (``data["data"]``), ``exit`` (the result), or ``error``."""

    type: str
    data: dict[str, Any]

    @property
    def text(self) -> str:
        return self.data.get("data", "") if self.type in ("stdout", "stderr") else ""


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _run_body(command, *, image=None, profile=None, backend=None, network=None, env=None, cwd=None, timeout=None,
              stdin=None, fast=None, output_limit=None) -> dict[str, Any]:
    if isinstance(command, str):
        raise TypeError("command must be a list of strings (argv), not a shell string")
    if isinstance(stdin, bytes):
        stdin = stdin.decode()
    return _drop_none({"command": list(command), "image": image, "profile": profile, "backend": backend,
                       "network": network, "env": env, "cwd": cwd, "timeout": timeout, "stdin": stdin,
                       "fast": fast, "output_limit": output_limit})


def _exec_body(command, *, env=None, cwd=None, timeout=None, stdin=None, output_limit=None) -> dict[str, Any]:
    if isinstance(command, str):
        raise TypeError("command must be a list of strings (argv), not a shell string")
    if isinstance(stdin, bytes):
        stdin = stdin.decode()
    return _drop_none({"command": list(command), "env": env, "workdir": cwd, "timeout": timeout, "stdin": stdin,
                       "output_limit": output_limit})


def _create_body(name, *, image=None, backend=None, profile=None, network=None, memory_mb=None, vcpus=None,
                 pids=None, disk_mb=None, read_only=None, env=None, workdir=None, start=True) -> dict[str, Any]:
    return _drop_none({"name": name, "image": image, "backend": backend, "profile": profile, "network": network,
                       "memory_mb": memory_mb, "vcpus": vcpus, "pids": pids, "disk_mb": disk_mb,
                       "read_only": read_only, "env": env, "workdir": workdir, "start": start})


def _file_url(name: str, path: str) -> str:
    if not path.startswith("/"):
        raise BadRequestError(f"sandbox path must be absolute, got {path!r}")
    return f"/sandboxes/{quote(name, safe='')}/files/{quote(path.lstrip('/'), safe='/')}"


def _sb(name: str) -> str:
    return f"/sandboxes/{quote(name, safe='')}"


class _SSE:
    """Minimal incremental parser for text/event-stream."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def line(self, line: str) -> StreamEvent | None:
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            ev, raw = self.event, "\n".join(self.data)
            self.event, self.data = "message", []
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"raw": raw}
            return StreamEvent(ev, data if isinstance(data, dict) else {"value": data})
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            self.event = value
        elif key == "data":
            self.data.append(value)
        return None


_NATIVE = {"started", "stdout", "stderr", "exit", "error"}
_COMPAT = {"started", "progress", "output", "done", "error"}  # the reference clients' events


def _config(base_url: str | None, api_key: str | None, timeout: float | None) -> tuple[str, dict[str, str], float]:
    url = (base_url or os.environ.get("AGENTKERNEL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    key = api_key or os.environ.get("AGENTKERNEL_API_KEY")
    from . import __version__

    headers = {"User-Agent": f"agentkernel-python/{__version__}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return url, headers, DEFAULT_TIMEOUT if timeout is None else timeout


# ---- sync ----------------------------------------------------------------------------------------------


class _SyncHTTP:
    """One HTTP client's life cycle, calls and event streams: shared by ``AgentKernel`` and the reference
    system's drop-in (``agentkernel.refsdk``)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float | None = None,
                 *, transport: httpx.BaseTransport | None = None) -> None:
        url, headers, t = _config(base_url, api_key, timeout)
        self.base_url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=t, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, timeout: float | None = None, **kw) -> Any:
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(self._http.timeout.read + timeout if self._http.timeout.read else None)
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.base_url}: {exc}") from exc
        return _unwrap(r)

    def _stream(self, path: str, body: dict[str, Any], *, native: bool = True) -> Iterator[StreamEvent]:
        """Server-sent events of ``path``: ours (``native``), or the reference's (started, progress,
        output, done, error), which the server sends unless asked for ours."""
        kinds, last = (_NATIVE, ("exit", "error")) if native else (_COMPAT, ("done", "error"))
        try:
            with self._http.stream("POST", path, json=body, params={"compat": "false"} if native else None,
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r.status_code, r.text, r.headers.get("retry-after"))
                p = _SSE()
                for line in r.iter_lines():
                    ev = p.line(line)
                    if ev is None or ev.type not in kinds:
                        continue
                    yield ev
                    if ev.type in last:
                        return
                if native:
                    raise StreamError("the stream ended without an exit event")
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.base_url}: {exc}") from exc


class AgentKernel(_SyncHTTP):
    def health(self) -> str:
        return self._request("GET", "/health")

    def metrics(self) -> str:
        try:
            r = self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise NetworkError(str(exc)) from exc
        if r.status_code >= 400:
            raise _error(r.status_code, r.text, r.headers.get("retry-after"))
        return r.text

    def run(self, command: list[str], *, image: str | None = None, profile: str | None = None,
            backend: str | None = None, network: bool | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None, timeout: float | None = None, stdin: str | bytes | None = None,
            fast: bool = True, output_limit: int | None = None) -> CommandResult:
        body = _run_body(command, image=image, profile=profile, backend=backend, network=network, env=env, cwd=cwd,
                         timeout=timeout, stdin=stdin, fast=fast, output_limit=output_limit)
        return CommandResult.from_api(self._request("POST", "/run", json=body, timeout=timeout))

    def run_stream(self, command: list[str], **kw) -> Iterator[StreamEvent]:
        """Events as they happen: started, stdout/stderr chunks, then exit (or error). Closing the
        iterator early disconnects, which kills the command."""
        return self._stream("/run/stream", _run_body(command, **kw))

    def batch_run(self, commands: list[list[str]]) -> list[CommandResult | APIError]:
        data = self._request("POST", "/batch/run", json={"commands": [{"command": c} for c in commands]})
        return [CommandResult.from_api(r) if r.get("exit_code") is not None else APIError(r.get("error") or "")
                for r in data["results"]]

    # named sandboxes
    def list_sandboxes(self) -> list[SandboxDetails]:
        return [SandboxDetails.from_api(d) for d in self._request("GET", "/sandboxes")]

    def create_sandbox(self, name: str, **kw) -> SandboxDetails:
        return SandboxDetails.from_api(self._request("POST", "/sandboxes", json=_create_body(name, **kw)))

    def get_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(self._request("GET", _sb(name)))

    def remove_sandbox(self, name: str) -> None:
        self._request("DELETE", _sb(name))

    def start_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(self._request("POST", _sb(name) + "/start"))

    def stop_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(self._request("POST", _sb(name) + "/stop"))

    def exec(self, name: str, command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float | None = None, stdin: str | bytes | None = None,
             output_limit: int | None = None) -> CommandResult:
        body = _exec_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, output_limit=output_limit)
        return CommandResult.from_api(self._request("POST", _sb(name) + "/exec", json=body, timeout=timeout))

    def exec_stream(self, name: str, command: list[str], **kw) -> Iterator[StreamEvent]:
        return self._stream(_sb(name) + "/exec/stream", _exec_body(command, **kw))

    def read_file(self, name: str, path: str) -> bytes:
        return b"".join(self.iter_file(name, path))

    def iter_file(self, name: str, path: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        try:
            with self._http.stream("GET", _file_url(name, path), headers={"Accept": "application/octet-stream"}) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r.status_code, r.text, r.headers.get("retry-after"))
                yield from r.iter_bytes(chunk_size)
        except httpx.TransportError as exc:
            raise NetworkError(str(exc)) from exc

    def write_file(self, name: str, path: str, data: bytes | str | IO[bytes] | Iterable[bytes],
                   mode: int | None = None) -> int:
        """Write a file inside the sandbox; ``data`` may be bytes, text, a binary file object or an
        iterable of chunks (streamed, never buffered whole)."""
        if isinstance(data, str):
            data = data.encode()
        elif hasattr(data, "read"):
            f = data
            data = iter(lambda: f.read(1 << 16), b"")
        params = {"mode": mode} if mode is not None else None
        res = self._request("PUT", _file_url(name, path), content=data, params=params,
                            headers={"Content-Type": "application/octet-stream"})
        return int(res["size"])

    def delete_file(self, name: str, path: str) -> None:
        self._request("DELETE", _file_url(name, path))

    def logs(self, name: str, last: int | None = None) -> list[dict[str, Any]]:
        return self._request("GET", _sb(name) + "/logs", params=_drop_none({"last": last}))

    def sandbox(self, name: str, **create_kw) -> SandboxSession:
        """A named sandbox as a context manager: created (and started) on enter, removed on exit."""
        return SandboxSession(self, name, create_kw)


class SandboxSession:
    def __init__(self, client: AgentKernel, name: str, create_kw: dict[str, Any]) -> None:
        self.client, self.name, self._kw = client, name, create_kw
        self.info: SandboxDetails | None = None
        self._removed = False

    def __enter__(self) -> SandboxSession:
        self.info = self.client.create_sandbox(self.name, **self._kw)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def exec(self, command: list[str], **kw) -> CommandResult:
        return self.client.exec(self.name, command, **kw)

    def exec_stream(self, command: list[str], **kw) -> Iterator[StreamEvent]:
        return self.client.exec_stream(self.name, command, **kw)

    def read_file(self, path: str) -> bytes:
        return self.client.read_file(self.name, path)

    def write_file(self, path: str, data, mode: int | None = None) -> int:
        return self.client.write_file(self.name, path, data, mode)

    def delete_file(self, path: str) -> None:
        self.client.delete_file(self.name, path)

    def refresh(self) -> SandboxDetails:
        self.info = self.client.get_sandbox(self.name)
        return self.info

    def stop(self) -> SandboxDetails:
        return self.client.stop_sandbox(self.name)

    def start(self) -> SandboxDetails:
        return self.client.start_sandbox(self.name)

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        try:
            self.client.remove_sandbox(self.name)
        except NotFoundError:
            pass


# ---- async ---------------------------------------------------------------------------------------------


class _AsyncHTTP:
    """``_SyncHTTP`` for asyncio."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float | None = None,
                 *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        url, headers, t = _config(base_url, api_key, timeout)
        self.base_url = url
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=t, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def close(self) -> None:
        await self.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, timeout: float | None = None, **kw) -> Any:
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(self._http.timeout.read + timeout if self._http.timeout.read else None)
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.base_url}: {exc}") from exc
        return _unwrap(r)

    async def _stream(self, path: str, body: dict[str, Any], *, native: bool = True) -> AsyncIterator[StreamEvent]:
        kinds, last = (_NATIVE, ("exit", "error")) if native else (_COMPAT, ("done", "error"))
        try:
            async with self._http.stream("POST", path, json=body, params={"compat": "false"} if native else None,
                                         timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _error(r.status_code, r.text, r.headers.get("retry-after"))
                p = _SSE()
                async for line in r.aiter_lines():
                    ev = p.line(line)
                    if ev is None or ev.type not in kinds:
                        continue
                    yield ev
                    if ev.type in last:
                        return
                if native:
                    raise StreamError("the stream ended without an exit event")
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.base_url}: {exc}") from exc


class AsyncAgentKernel(_AsyncHTTP):
    async def health(self) -> str:
        return await self._request("GET", "/health")

    async def run(self, command: list[str], *, image: str | None = None, profile: str | None = None,
                  backend: str | None = None, network: bool | None = None, env: dict[str, str] | None = None,
                  cwd: str | None = None, timeout: float | None = None, stdin: str | bytes | None = None,
                  fast: bool = True, output_limit: int | None = None) -> CommandResult:
        body = _run_body(command, image=image, profile=profile, backend=backend, network=network, env=env, cwd=cwd,
                         timeout=timeout, stdin=stdin, fast=fast, output_limit=output_limit)
        return CommandResult.from_api(await self._request("POST", "/run", json=body, timeout=timeout))

    def run_stream(self, command: list[str], **kw) -> AsyncIterator[StreamEvent]:
        return self._stream("/run/stream", _run_body(command, **kw))

    async def batch_run(self, commands: list[list[str]]) -> list[CommandResult | APIError]:
        data = await self._request("POST", "/batch/run", json={"commands": [{"command": c} for c in commands]})
        return [CommandResult.from_api(r) if r.get("exit_code") is not None else APIError(r.get("error") or "")
                for r in data["results"]]

    async def list_sandboxes(self) -> list[SandboxDetails]:
        return [SandboxDetails.from_api(d) for d in await self._request("GET", "/sandboxes")]

    async def create_sandbox(self, name: str, **kw) -> SandboxDetails:
        return SandboxDetails.from_api(await self._request("POST", "/sandboxes", json=_create_body(name, **kw)))

    async def get_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(await self._request("GET", _sb(name)))

    async def remove_sandbox(self, name: str) -> None:
        await self._request("DELETE", _sb(name))

    async def start_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(await self._request("POST", _sb(name) + "/start"))

    async def stop_sandbox(self, name: str) -> SandboxDetails:
        return SandboxDetails.from_api(await self._request("POST", _sb(name) + "/stop"))

    async def exec(self, name: str, command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   timeout: float | None = None, stdin: str | bytes | None = None,
                   output_limit: int | None = None) -> CommandResult:
        body = _exec_body(command, env=env, cwd=cwd, timeout=timeout, stdin=stdin, output_limit=output_limit)
        return CommandResult.from_api(await self._request("POST", _sb(name) + "/exec", json=body, timeout=timeout))

    def exec_stream(self, name: str, command: list[str], **kw) -> AsyncIterator[StreamEvent]:
        return self._stream(_sb(name) + "/exec/stream", _exec_body(command, **kw))

    async def read_file(self, name: str, path: str) -> bytes:
        return b"".join([c async for c in self.iter_file(name, path)])

    async def iter_file(self, name: str, path: str, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        try:
            async with self._http.stream("GET", _file_url(name, path),
                                         headers={"Accept": "application/octet-stream"}) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _error(r.status_code, r.text, r.headers.get("retry-after"))
                async for chunk in r.aiter_bytes(chunk_size):
                    yield chunk
        except httpx.TransportError as exc:
            raise NetworkError(str(exc)) from exc

    async def write_file(self, name: str, path: str, data: bytes | str | AsyncIterable[bytes],
                         mode: int | None = None) -> int:
        if isinstance(data, str):
            data = data.encode()
        params = {"mode": mode} if mode is not None else None
        res = await self._request("PUT", _file_url(name, path), content=data, params=params,
                                  headers={"Content-Type": "application/octet-stream"})
        return int(res["size"])

    async def delete_file(self, name: str, path: str) -> None:
        await self._request("DELETE", _file_url(name, path))

    async def logs(self, name: str, last: int | None = None) -> list[dict[str, Any]]:
        return await self._request("GET", _sb(name) + "/logs", params=_drop_none({"last": last}))

    def sandbox(self, name: str, **create_kw) -> AsyncSandboxSession:
        return AsyncSandboxSession(self, name, create_kw)


class AsyncSandboxSession:
    def __init__(self, client: AsyncAgentKernel, name: str, create_kw: dict[str, Any]) -> None:
        self.client, self.name, self._kw = client, name, create_kw
        self.info: SandboxDetails | None = None
        self._removed = False

    async def __aenter__(self) -> AsyncSandboxSession:
        self.info = await self.client.create_sandbox(self.name, **self._kw)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.remove()

    async def exec(self, command: list[str], **kw) -> CommandResult:
        return await self.client.exec(self.name, command, **kw)

    def exec_stream(self, command: list[str], **kw) -> AsyncIterator[StreamEvent]:
        return self.client.exec_stream(self.name, command, **kw)

    async def read_file(self, path: str) -> bytes:
        return await self.client.read_file(self.name, path)

    async def write_file(self, path: str, data, mode: int | None = None) -> int:
        return await self.client.write_file(self.name, path, data, mode)

    async def delete_file(self, path: str) -> None:
        await self.client.delete_file(self.name, path)

    async def refresh(self) -> SandboxDetails:
        self.info = await self.client.get_sandbox(self.name)
        return self.info

    async def stop(self) -> SandboxDetails:
        return await self.client.stop_sandbox(self.name)

    async def start(self) -> SandboxDetails:
        return await self.client.start_sandbox(self.name)

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        try:
            await self.client.remove_sandbox(self.name)
        except NotFoundError:
            pass


def _unwrap(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise _error(r.status_code, r.text, r.headers.get("retry-after"))
    try:
        body = r.json()
    except ValueError:
        raise ServerError(f"not a JSON response (HTTP {r.status_code})", status=r.status_code) from None
    if not isinstance(body, dict) or not body.get("success"):
        raise APIError((body or {}).get("error") or "unknown error", status=r.status_code)
    return body.get("data")
