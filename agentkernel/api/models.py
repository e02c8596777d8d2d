"""Wire models of the HTTP API (pydantic v2).

Compatibility with the reference system's published clients (``agentkernel-sdk`` 0.21.0 on PyPI, the
``agentkernel`` 0.18.1 package on npm) is pinned here, field by field:

- every response is the envelope ``{"success": bool, "data": ..., "error": "..."}``;
- request bodies declare every field those clients send, including the ones they send as ``null``
  (the Python client's ``run`` always sends ``image``, ``profile`` and ``fast``); any *other* field is
  rejected with 400 (``extra="forbid"``), so a typo never silently changes what runs;
- fields the clients may send but this server cannot honour (``sudo``, ``secret_files``, ...) are
  accepted when null/empty and refused with 422 otherwise (fail closed);
- ``network`` takes the clients' bool and our modes (``"none"``, ``"allowlist"``, ``"open"``), with
  ``allow_hosts``/``block_hosts`` and ``secrets`` (``NAME:HOST[:HEADER]`` bindings, names only) as in
  docs/network.md; values are checked by the service (422 naming the field);
- run/exec results keep ``output`` (what the reference returns) and add ``exit_code``, ``stdout``,
  ``stderr``, ``signal``, ``timed_out``, ``oom_killed``, ``truncated`` and ``timings``;
- ``SandboxBody.status`` stays within the clients' literal (``running``/``stopped``/``paused``); the
  exact engine state is in ``state``; ``vcpus`` is an integer there (rounded up), the exact quota in
  ``cpus``.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ..spec import MAX_TIMEOUT_S  # one limit for every entry point (spec.validate_timeout)

T = TypeVar("T")

Profile = Literal["permissive", "moderate", "restrictive"]

MAX_ARGS = 4096


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- envelope ----------------------------------------------------------------------------------------


class Envelope(BaseModel, Generic[T]):
    success: bool = True
    data: T | None = None
    error: str | None = None


class ErrorEnvelope(BaseModel):
    success: Literal[False] = False
    error: str = Field(description="what went wrong (never a traceback)")
    hint: str | None = Field(None, description="how to fix it, when there is a known way")


# ---- requests ------------------------------------------------------------------------------------------

Command = list[str]

NETWORK_DOC = ("true/false (the reference clients' bool: true is open, or allowlist with allow_hosts), or a "
               "mode: \"none\", \"allowlist\", \"open\" (docs/network.md); subject to the caller's policy")
ALLOW_DOC = ('destinations an allowlist sandbox may reach: "host", "host:port", "*.domain", CIDRs '
             '("203.0.113.0/24:5432", "[2001:db8::/32]:443"); names get ports 80 and 443 unless one is given')
BLOCK_DOC = "destinations refused in any mode (same syntax); blocking wins"
SECRETS_DOC = ('secret bindings "NAME:HOST[:HEADER]": the sandbox sees a placeholder, the egress gateway puts the '
               "value (held by the server: agentkernel secret set NAME) into requests to HOST only")


class RunRequest(Strict):
    """``POST /run`` and ``POST /run/stream``: one command in a fresh sandbox, destroyed afterwards."""

    command: Command = Field(min_length=1, max_length=MAX_ARGS, description="argv, exec'd without a shell")
    image: str | None = Field(None, description="image (default: chosen from the command among local images)")
    profile: Profile | None = None
    fast: bool | None = Field(True, description="true: a warm pooled sandbox (each used once); "
                              "false: a cold sandbox created for this run")
    backend: str | None = None
    network: bool | str | None = Field(None, description=NETWORK_DOC)
    allow_hosts: list[str] | None = Field(None, description=ALLOW_DOC)
    block_hosts: list[str] | None = Field(None, description=BLOCK_DOC)
    secrets: list[str] | None = Field(None, description=SECRETS_DOC)
    env: dict[str, str] | list[str] | None = Field(None, description="{K: V} or [\"K=V\"]")
    cwd: str | None = Field(None, description="working directory inside the sandbox")
    workdir: str | None = Field(None, description="alias of cwd")
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="seconds; the command is killed "
                                  "after it (exit_code 124, timed_out true). Default: the server's")
    stdin: str | None = Field(None, description="bytes for the command's stdin (UTF-8 text)")
    output_limit: int | None = Field(None, ge=0, le=1 << 26, description="bytes kept per stream")


class ExecRequestBody(Strict):
    """``POST /sandboxes/{name}/exec``."""

    command: Command = Field(min_length=1, max_length=MAX_ARGS)
    env: dict[str, str] | list[str] | None = None
    workdir: str | None = None
    cwd: str | None = Field(None, description="alias of workdir")
    sudo: bool | None = Field(None, description="run as root: allowed only with [api] allow_sudo_exec = true "
                              "and a sandbox whose commands run as uid 0 (refused with 422 otherwise)")
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)
    stdin: str | None = None
    output_limit: int | None = Field(None, ge=0, le=1 << 26)


class CreateSandboxRequest(Strict):
    """``POST /sandboxes``: create and start a named, long-lived sandbox."""

    name: str = Field(min_length=1, max_length=63)
    image: str | None = None
    backend: str | None = None
    vcpus: float | None = Field(None, gt=0, le=1024)
    memory_mb: int | None = Field(None, ge=6, le=1 << 24)
    pids: int | None = Field(None, ge=8, le=1 << 22)
    disk_mb: int | None = Field(None, ge=1, le=1 << 24)
    profile: Profile | None = None
    network: bool | str | None = Field(None, description=NETWORK_DOC)
    allow_hosts: list[str] | None = Field(None, description=ALLOW_DOC)
    block_hosts: list[str] | None = Field(None, description=BLOCK_DOC)
    read_only: bool | None = None
    env: dict[str, str] | list[str] | None = None
    workdir: str | None = None
    start: bool = Field(True, description="start it right away (the reference always does)")
    source_url: str | None = Field(None, description="a remote git repository, cloned on the server and copied "
                                   "into the working directory (file:// and local paths are refused)")
    source_ref: str | None = Field(None, description="branch, tag or commit of source_url")
    volumes: list[str] | None = Field(None, description='named volumes: ["name:/path", "name:/path:ro"] '
                                      "(agentkernel volume create NAME)")
    ttl: str | int | None = Field(None, description='remove the sandbox after this long: "30m", "2h", seconds')
    secrets: list[str] | None = Field(None, description=SECRETS_DOC)
    # accepted for client compatibility; refused (422) when set, because nothing here implements it
    secret_files: list[str] | None = None


class BatchCommand(Strict):
    command: Command = Field(min_length=1, max_length=MAX_ARGS)
    image: str | None = None
    profile: Profile | None = None
    env: dict[str, str] | list[str] | None = None
    cwd: str | None = None
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class BatchRunRequest(Strict):
    commands: list[BatchCommand] = Field(min_length=1, max_length=256, description="at most the caller's "
                                         "max_batch (429 beyond it)")


class FileWriteRequest(Strict):
    content: str
    encoding: Literal["utf8", "utf-8", "base64"] = "utf8"
    mode: int | None = Field(None, ge=0, le=0o7777, description="file mode (default 0644)")


# ---- responses -----------------------------------------------------------------------------------------


class CommandResultBody(BaseModel):
    output: str = Field(description="stdout then stderr, as text (what the reference API returned)")
    exit_code: int = Field(description="0-255; 128+N when killed by signal N; 124 on timeout")
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    stdout: str
    stderr: str
    stdout_base64: str | None = Field(None, description="set when stdout is not valid UTF-8")
    stderr_base64: str | None = Field(None, description="set when stderr is not valid UTF-8")
    truncated: bool = Field(False, description="output was cut at output_limit bytes per stream")
    timings: dict[str, float] = Field(default_factory=dict, description="milliseconds per phase")


class SandboxBody(BaseModel):
    name: str
    uuid: str | None = Field(None, description="the sandbox's stable id")
    status: Literal["running", "stopped", "paused"] = Field(description="reference-compatible status")
    state: str = Field(description="exact state: creating, created, running, stopped, missing")
    backend: str
    image: str | None = None
    profile: str | None = None
    vcpus: int | None = Field(None, description="CPU quota rounded up (reference clients expect an int)")
    cpus: float | None = Field(None, description="exact CPU quota in cores")
    memory_mb: int | None = None
    created_at: str | None = Field(None, description="ISO 8601, UTC")
    expires_at: str | None = Field(None, description="when the server removes it (TTL), ISO 8601, UTC")


class FileReadResponse(BaseModel):
    content: str
    encoding: Literal["utf8", "base64"]
    size: int


class BatchResult(BaseModel):
    output: str | None = None
    error: str | None = None
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    timed_out: bool | None = None
    truncated: bool | None = None
    timings: dict[str, float] | None = None


class BatchRunResponse(BaseModel):
    results: list[BatchResult]


class FileWriteResult(BaseModel):
    path: str
    size: int


def envelope(data: Any) -> dict[str, Any]:
    return {"success": True, "data": data}
