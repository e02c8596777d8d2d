"""Drop-in for the reference system's Python SDK (``agentkernel-sdk``): the same import, method names and
result types, over this project's HTTP API (``agentkernel serve``).

    from agentkernel import AgentKernel            # was: pip install agentkernel-sdk

    with AgentKernel() as client:                  # AGENTKERNEL_BASE_URL, AGENTKERNEL_API_KEY
        print(client.run(["echo", "hello"]).output)
        with client.sandbox("work") as sb:
            sb.run(["sh", "-c", "echo hi > /tmp/x"])
            sb.write_files({"/tmp/a.txt": "a"})

Results are the reference's types (pydantic models) with this server's extra fields kept
(``RunOutput.exit_code``, ``stdout``, ``stderr``; ``SandboxInfo.state``, ``expires_at``, ...). Errors are
``agentkernel.sdk``'s, under the reference's names: ``AgentKernelError`` (= ``APIError``), ``AuthError``
(401), ``NotFoundError`` (404), ``ValidationError`` (400, = ``BadRequestError``), ``ConflictError`` (409),
``PolicyError`` (422), ``RateLimitedError`` (429), ``ServerError`` (5xx), ``NetworkError``. The native
client with raw-byte files and exit codes first is ``agentkernel.sdk``.

Every method is written once: ``_do`` returns the value (sync client) or a coroutine (async client).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from .sdk import APIError as AgentKernelError
from .sdk import (
    AuthError,
    ConflictError,
    NetworkError,
    NotFoundError,
    PolicyError,
    RateLimitedError,
    ServerError,
    StreamError,
    _AsyncHTTP,
    _SyncHTTP,
)
from .sdk import BadRequestError as ValidationError

SecurityProfile = Literal["permissive", "moderate", "restrictive"]
SandboxStatus = Literal["running", "paused", "stopped", "dormant", "archived"]
StreamEventType = Literal["started", "progress", "output", "done", "error"]
DetachedStatus = Literal["running", "completed", "failed"]

__all__ = [
    "AgentKernel", "AgentKernelError", "AsyncAgentKernel", "AsyncSandboxSession", "AuthError",
    "BatchCommand", "BatchFileWriteResponse", "BatchResult", "BatchRunResponse", "ConflictError",
    "CreateSandboxOptions", "DetachedCommand", "DetachedLogsResponse", "DetachedStatus", "ExecOptions",
    "ExtendTtlResponse", "FileReadResponse", "NetworkError", "NotFoundError", "PolicyError", "RateLimitedError",
    "RunOptions",
    "RunOutput", "SandboxInfo", "SandboxSession", "SandboxStatus", "SecurityProfile", "ServerError",
    "SnapshotMeta", "StreamError", "StreamEvent", "StreamEventType", "ValidationError",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")  # this server's extra fields stay readable


class RunOutput(_Model):
    output: str
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class SandboxInfo(_Model):
    name: str
    uuid: str | None = None
    status: SandboxStatus
    backend: str
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    created_at: str | None = None


class RunOptions(_Model):
    image: str | None = None
    profile: SecurityProfile | None = None
    fast: bool = True


class CreateSandboxOptions(_Model):
    backend: str | None = None
    image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    profile: SecurityProfile | None = None
    source_url: str | None = None
    source_ref: str | None = None
    volumes: list[str] | None = None
    secrets: list[str] | None = None
    secret_files: list[str] | None = None
    ttl: str | int | None = None


class ExecOptions(_Model):
    env: list[str] = []
    workdir: str | None = None
    sudo: bool | None = None


class StreamEvent(_Model):
    type: StreamEventType
    data: dict[str, Any]


class FileReadResponse(_Model):
    content: str
    encoding: str
    size: int


class BatchCommand(_Model):
    command: list[str]


class BatchResult(_Model):
    output: str | None = None
    error: str | None = None


class BatchRunResponse(_Model):
    results: list[BatchResult]


class BatchFileWriteResponse(_Model):
    written: int


class DetachedCommand(_Model):
    id: str
    sandbox: str
    command: list[str]
    pid: int
    status: DetachedStatus
    exit_code: int | None = None
    started_at: str


class DetachedLogsResponse(_Model):
    stdout: str | None = None
    stderr: str | None = None


class ExtendTtlResponse(_Model):
    expires_at: str | None = None


class SnapshotMeta(_Model):
    name: str
    sandbox: str
    image_tag: str
    backend: str
    base_image: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    created_at: str


def _sb(name: str) -> str:
    return f"/sandboxes/{quote(name, safe='')}"


def _q(s: str) -> str:
    return quote(s, safe="")


def _nn(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _written_message(d: Any) -> str:
    if isinstance(d, dict):
        return f"Wrote {d.get('size')} bytes to {d.get('path')}"
    return str(d)


class _Methods:
    """The reference SDK's methods; ``_do(method, path, json, convert)`` performs one call."""

    def _do(self, method: str, path: str, body: Any = None, conv=None):  # pragma: no cover - overridden
        raise NotImplementedError

    def health(self):
        return self._do("GET", "/health")

    def run(self, command: list[str], *, image: str | None = None, profile: SecurityProfile | None = None,
            fast: bool = True, backend: str | None = None, timeout: float | None = None):
        body = {"command": command, "image": image, "profile": profile, "fast": fast,
                **_nn({"backend": backend, "timeout": timeout})}
        return self._do("POST", "/run", body, lambda d: RunOutput(**d))

    def list_sandboxes(self):
        return self._do("GET", "/sandboxes", None, lambda d: [SandboxInfo(**s) for s in d])

    def create_sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                       memory_mb: int | None = None, profile: SecurityProfile | None = None,
                       backend: str | None = None, source_url: str | None = None, source_ref: str | None = None,
                       volumes: list[str] | None = None, secrets: list[str] | None = None,
                       secret_files: list[str] | None = None, ttl: str | int | None = None):
        body = _nn({"name": name, "backend": backend, "image": image, "vcpus": vcpus, "memory_mb": memory_mb,
                    "profile": profile, "source_url": source_url, "source_ref": source_ref, "volumes": volumes,
                    "secrets": secrets, "secret_files": secret_files, "ttl": ttl})
        return self._do("POST", "/sandboxes", body, lambda d: SandboxInfo(**d))

    def get_sandbox(self, name: str):
        return self._do("GET", _sb(name), None, lambda d: SandboxInfo(**d))

    def get_sandbox_by_uuid(self, uuid: str):
        return self._do("GET", f"/sandboxes/by-uuid/{_q(uuid)}", None, lambda d: SandboxInfo(**d))

    def remove_sandbox(self, name: str):
        return self._do("DELETE", _sb(name), None, lambda d: None)

    def exec_in_sandbox(self, name: str, command: list[str], *, env: list[str] | None = None,
                        workdir: str | None = None, sudo: bool | None = None, timeout: float | None = None):
        body = {"command": command, **_nn({"env": env or None, "workdir": workdir, "sudo": sudo, "timeout": timeout})}
        return self._do("POST", f"{_sb(name)}/exec", body, lambda d: RunOutput(**d))

    def read_file(self, name: str, path: str):
        return self._do("GET", f"{_sb(name)}/files/{path.lstrip('/')}", None, lambda d: FileReadResponse(**d))

    def write_file(self, name: str, path: str, content: str, *, encoding: str = "utf8"):
        return self._do("PUT", f"{_sb(name)}/files/{path.lstrip('/')}", {"content": content, "encoding": encoding},
                        _written_message)

    def delete_file(self, name: str, path: str):
        return self._do("DELETE", f"{_sb(name)}/files/{path.lstrip('/')}", None, str)

    def write_files(self, name: str, files: dict[str, str]):
        return self._do("POST", f"{_sb(name)}/files", {"files": files}, lambda d: BatchFileWriteResponse(**d))

    def get_sandbox_logs(self, name: str):
        return self._do("GET", f"{_sb(name)}/logs")

    def batch_run(self, commands: list[list[str]]):
        return self._do("POST", "/batch/run", {"commands": [{"command": c} for c in commands]},
                        lambda d: BatchRunResponse(results=[BatchResult(**r) for r in d["results"]]))

    def exec_detached(self, name: str, command: list[str], *, env: list[str] | None = None,
                      workdir: str | None = None, sudo: bool | None = None):
        body = {"command": command, **_nn({"env": env or None, "workdir": workdir, "sudo": sudo})}
        return self._do("POST", f"{_sb(name)}/exec/detach", body, lambda d: DetachedCommand(**d))

    def detached_status(self, name: str, cmd_id: str):
        return self._do("GET", f"{_sb(name)}/exec/detached/{_q(cmd_id)}", None, lambda d: DetachedCommand(**d))

    def detached_logs(self, name: str, cmd_id: str, *, stream: str | None = None):
        query = f"?stream={stream}" if stream in ("stdout", "stderr") else ""
        return self._do("GET", f"{_sb(name)}/exec/detached/{_q(cmd_id)}/logs{query}", None,
                        lambda d: DetachedLogsResponse(**d))

    def detached_kill(self, name: str, cmd_id: str):
        return self._do("DELETE", f"{_sb(name)}/exec/detached/{_q(cmd_id)}", None, str)

    def detached_list(self, name: str):
        return self._do("GET", f"{_sb(name)}/exec/detached", None, lambda d: [DetachedCommand(**c) for c in d])

    def extend_ttl(self, name: str, *, by: str):
        return self._do("POST", f"{_sb(name)}/extend", {"by": by},
                        lambda d: d.get("expires_at") if isinstance(d, dict) else d)

    def list_snapshots(self):
        return self._do("GET", "/snapshots", None, lambda d: [SnapshotMeta(**s) for s in d])

    def take_snapshot(self, sandbox: str, *, snapshot_name: str | None = None):
        return self._do("POST", "/snapshots", _nn({"sandbox": sandbox, "name": snapshot_name}),
                        lambda d: SnapshotMeta(**d))

    def get_snapshot(self, name: str):
        return self._do("GET", f"/snapshots/{_q(name)}", None, lambda d: SnapshotMeta(**d))

    def delete_snapshot(self, name: str):
        return self._do("DELETE", f"/snapshots/{_q(name)}", None, lambda d: None)

    def restore_snapshot(self, name: str, *, as_name: str | None = None):
        return self._do("POST", f"/snapshots/{_q(name)}/restore", _nn({"as_name": as_name}) or None,
                        lambda d: SandboxInfo(**d))


def _ref_event(ev) -> StreamEvent:
    return StreamEvent(type=ev.type, data=ev.data)


def _run_stream_body(command, image, profile, fast) -> dict[str, Any]:
    return {"command": command, "image": image, "profile": profile, "fast": fast}


class _SessionMethods:
    """A sandbox removed when the ``with`` block ends; each method returns the client's value (sync) or
    coroutine (async)."""

    def __init__(self, name: str, client) -> None:
        self.name = name
        self._client = client
        self._removed = False

    def run(self, command: list[str], *, env: list[str] | None = None, workdir: str | None = None,
            sudo: bool | None = None):
        return self._client.exec_in_sandbox(self.name, command, env=env, workdir=workdir, sudo=sudo)

    def info(self):
        return self._client.get_sandbox(self.name)

    def write_files(self, files: dict[str, str]):
        return self._client.write_files(self.name, files)

    def _remove_once(self):
        if self._removed:
            return None
        self._removed = True
        return self._client.remove_sandbox(self.name)


# ---- sync ----------------------------------------------------------------------------------------------


class SandboxSession(_SessionMethods):
    def remove(self) -> None:
        self._remove_once()

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AgentKernel(_Methods, _SyncHTTP):
    """Synchronous client with the reference SDK's interface."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float | None = None) -> None:
        super().__init__(base_url, api_key, timeout)

    def _do(self, method: str, path: str, body: Any = None, conv=None):
        data = self._request(method, path, json=body) if body is not None else self._request(method, path)
        return conv(data) if conv else data

    def run_stream(self, command: list[str], *, image: str | None = None, profile: SecurityProfile | None = None,
                   fast: bool = True) -> Iterator[StreamEvent]:
        for ev in self._stream("/run/stream", _run_stream_body(command, image, profile, fast), native=False):
            yield _ref_event(ev)

    def sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                memory_mb: int | None = None, profile: SecurityProfile | None = None, **create_kw) -> SandboxSession:
        self.create_sandbox(name, image=image, vcpus=vcpus, memory_mb=memory_mb, profile=profile, **create_kw)
        return SandboxSession(name, self)


# ---- async ---------------------------------------------------------------------------------------------


class AsyncSandboxSession(_SessionMethods):
    async def remove(self) -> None:
        call = self._remove_once()
        if call is not None:
            await call

    async def __aenter__(self) -> AsyncSandboxSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.remove()


class AsyncAgentKernel(_Methods, _AsyncHTTP):
    """Asynchronous client with the reference SDK's interface (every method is awaited)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float | None = None) -> None:
        super().__init__(base_url, api_key, timeout)

    async def _do(self, method: str, path: str, body: Any = None, conv=None):
        data = await (self._request(method, path, json=body) if body is not None else self._request(method, path))
        return conv(data) if conv else data

    async def run_stream(self, command: list[str], *, image: str | None = None,
                         profile: SecurityProfile | None = None, fast: bool = True) -> AsyncIterator[StreamEvent]:
        async for ev in self._stream("/run/stream", _run_stream_body(command, image, profile, fast), native=False):
            yield _ref_event(ev)

    async def sandbox(self, name: str, *, image: str | None = None, vcpus: int | None = None,
                      memory_mb: int | None = None, profile: SecurityProfile | None = None,
                      **create_kw) -> AsyncSandboxSession:
        await self.create_sandbox(name, image=image, vcpus=vcpus, memory_mb=memory_mb, profile=profile, **create_kw)
        return AsyncSandboxSession(name, self)


_ = (AuthError, ConflictError, NotFoundError, PolicyError, RateLimitedError, ServerError, StreamError,
     ValidationError, AgentKernelError)
