"""MCP server (official ``mcp`` SDK, low-level ``Server``): ``agentkernel mcp`` over stdio, or streamable
HTTP (standalone with ``--transport http``, and mounted at ``/mcp`` inside ``agentkernel serve``).

Tools and their arguments are the reference system's (``sandbox_run``, ``sandbox_create``,
``sandbox_exec``, ``sandbox_list``, ``sandbox_remove``, ``sandbox_file_write``, ``sandbox_file_read``,
``sandbox_start``, ``sandbox_stop``), with every advertised argument honoured (the reference ignored
``cwd``, ``env`` and ``timeout_ms``) and unknown arguments refused. Results carry the exit code and
separate stdout/stderr; each stream is capped at ``OUTPUT_CAP`` bytes, keeping the head and the tail,
and the cap is stated in the text whenever it applied. ``structuredContent`` holds the same result as
JSON.

Commands run through the same ``Service`` as the HTTP API: one embedded daemon (warm pools) per
process, the same request checks, the same policy for remote callers and the same limits. Over stdio
the caller is the local user (tenant ``local``, like the CLI); over HTTP the bearer token's tenant.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from ..errors import AgentKernelError
from . import mcp_identity, refops, reftools
from .auth import LOCAL_TENANT, TokenSet, bearer
from .models import ALLOW_DOC, BLOCK_DOC, NETWORK_DOC, SECRETS_DOC
from .service import file_path

OUTPUT_CAP = 16_000  # bytes per stream: the first and last OUTPUT_CAP/2 are kept
DEFAULT_TIMEOUT_MS = 30_000
FILE_READ_CAP = 1 << 20


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


Profile = Literal["permissive", "moderate", "restrictive"]


class RunArgs(_Args):
    command: list[str] = Field(min_length=1, description='argv, e.g. ["python3", "-c", "print(1)"] (no shell)')
    image: str | None = Field(None, description="image (default: chosen from the command among local images)")
    fast: bool = Field(True, description="true: a warm pooled sandbox (each used once); false: a cold one")
    cwd: str | None = Field(None, description="working directory inside the sandbox")
    env: dict[str, str] | None = Field(None, description="environment variables for the command")
    timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, gt=0, le=86_400_000,
                            description="kill the command after this many milliseconds (exit code 124)")
    profile: Profile | None = Field(None, description="security profile (default moderate)")
    network: bool | str | None = Field(None, description="network access (default: the profile's; moderate: "
                                       "off): true/false, or \"none\", \"allowlist\", \"open\"")
    allow_hosts: list[str] | None = Field(None, description=ALLOW_DOC)
    block_hosts: list[str] | None = Field(None, description=BLOCK_DOC)
    secrets: list[str] | None = Field(None, description=SECRETS_DOC)
    backend: str | None = Field(None, description="backend (default podman)")
    compatibility_mode: Literal["native", "claude", "claude-code", "codex", "gemini", "opencode"] | None = Field(
        None, description="the calling agent (reference argument): commands get the engine's default seccomp "
        "filter with every capability dropped; network stays as the profile says")


class CreateArgs(_Args):
    name: str = Field(description="name for the sandbox (letters, digits, '-', '_')")
    image: str | None = Field(None, description="image (default agentkernel/busybox)")
    profile: Profile | None = None
    network: bool | str | None = Field(None, description=NETWORK_DOC)
    allow_hosts: list[str] | None = Field(None, description=ALLOW_DOC)
    block_hosts: list[str] | None = Field(None, description=BLOCK_DOC)
    secrets: list[str] | None = Field(None, description=SECRETS_DOC)
    memory_mb: int | None = Field(None, ge=6)
    vcpus: float | None = Field(None, gt=0)
    backend: str | None = None
    env: dict[str, str] | None = Field(None, description="environment variables of the sandbox")
    workdir: str | None = Field(None, description="default working directory")
    source_url: str | None = Field(None, description="a remote git repository cloned into the working directory")
    source_ref: str | None = Field(None, description="branch, tag or commit of source_url")
    ttl: str | int | None = Field(None, description='remove the sandbox after this long: "30m", "2h"')
    # reference arguments nothing here implements: refused when set
    ports: list[str] | None = None


class ExecArgs(_Args):
    name: str = Field(description="name of the sandbox")
    command: list[str] = Field(min_length=1, description="argv (no shell)")
    env: list[str] | dict[str, str] | None = Field(None, description='["KEY=VALUE", ...] or {"KEY": "VALUE"}')
    workdir: str | None = Field(None, description="working directory inside the sandbox")
    cwd: str | None = Field(None, description="alias of workdir")
    timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, gt=0, le=86_400_000, description="kill after this many ms (124)")
    sudo: bool | None = Field(None, description="run as root (only where the server allows it and the sandbox "
                              "runs as uid 0)")


class NameArgs(_Args):
    name: str = Field(description="name of the sandbox")


class ListArgs(_Args):
    pass


class FileWriteArgs(_Args):
    name: str
    path: str = Field(description="absolute path inside the sandbox")
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


class FileReadArgs(_Args):
    name: str
    path: str = Field(description="absolute path inside the sandbox")


TOOLS: dict[str, tuple[type[_Args], str]] = {
    "sandbox_run": (RunArgs, "Run a command in a fresh isolated sandbox (destroyed afterwards). Returns the exit "
                    "code and stdout/stderr (each capped at 16000 bytes, head and tail kept)."),
    "sandbox_create": (CreateArgs, "Create and start a persistent named sandbox for several commands."),
    "sandbox_exec": (ExecArgs, "Execute a command in a running named sandbox."),
    "sandbox_list": (ListArgs, "List sandboxes and their status."),
    "sandbox_remove": (NameArgs, "Remove a sandbox and everything in it."),
    "sandbox_file_write": (FileWriteArgs, "Write a file into a running sandbox."),
    "sandbox_file_read": (FileReadArgs, "Read a file from a running sandbox (binary files come back as base64)."),
    "sandbox_start": (NameArgs, "Start a stopped sandbox."),
    "sandbox_stop": (NameArgs, "Stop a running sandbox (its files are kept)."),
}
TOOLS.update(reftools.TOOLS)  # TTL, batch write, detached commands, snapshots


class HeadTail:
    """Keeps the first and the last ``cap/2`` bytes of a stream and counts the rest."""

    def __init__(self, cap: int = OUTPUT_CAP) -> None:
        self.half = cap // 2
        self.cap = cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self.tail)
        return (bytes(self.head).decode("utf-8", "replace")
                + f"\n\n... [{omitted} bytes truncated: output is capped at {self.cap} bytes per stream, "
                f"the first and last {self.half} kept] ...\n\n" + bytes(self.tail).decode("utf-8", "replace"))


def _result_payload(r, out: HeadTail, err: HeadTail) -> tuple[str, dict[str, Any]]:
    data = {"exit_code": r.exit_code, "signal": r.signal, "timed_out": r.timed_out, "oom_killed": r.oom_killed,
            "stdout": out.text(), "stderr": err.text(), "stdout_bytes": out.total, "stderr_bytes": err.total,
            "truncated": out.truncated or err.truncated or r.truncated, "output_cap_bytes": OUTPUT_CAP,
            "timings": {k: round(float(v), 3) for k, v in r.timings.items()}}
    lines = [f"exit_code: {r.exit_code}"]
    if r.timed_out:
        lines.append("timed out: the command was killed")
    if r.oom_killed:
        lines.append("killed by the out-of-memory killer")
    if data["truncated"]:
        lines.append(f"note: output capped at {OUTPUT_CAP} bytes per stream (head and tail kept)")
    lines.append("--- stdout ---")
    lines.append(data["stdout"])
    if data["stderr"]:
        lines.append("--- stderr ---")
        lines.append(data["stderr"])
    return "\n".join(lines), data


class Tools:
    """The tool implementations over a ``Service``."""

    def __init__(self, svc) -> None:
        self.svc = svc

    def _req(self, argv, env, cwd, timeout_ms, out: HeadTail, err: HeadTail, sudo: bool | None = None):
        def on_output(fd: int, data: bytes) -> None:
            (out if fd == 1 else err).feed(data)

        return self.svc.exec_request(argv, env=env, cwd=cwd, timeout=timeout_ms / 1000.0, on_output=on_output,
                                     sudo=sudo)

    async def call(self, name: str, args: dict[str, Any], tenant: str) -> tuple[str, Any]:
        model, _ = TOOLS[name]
        a = model.model_validate(args)
        svc = self.svc
        if name in reftools.TOOLS:
            return await reftools.call(svc, name, a, tenant)
        if isinstance(a, RunArgs):
            out, err = HeadTail(), HeadTail()
            spec = svc.run_spec(tenant, a.command, image=a.image, profile=a.profile, backend=a.backend,
                                network=a.network, allow_hosts=a.allow_hosts, block_hosts=a.block_hosts,
                                secrets=a.secrets)
            r = await svc.run(tenant, spec, self._req(a.command, a.env, a.cwd, a.timeout_ms, out, err), fast=a.fast)
            return _result_payload(r, out, err)
        if isinstance(a, ExecArgs):
            out, err = HeadTail(), HeadTail()
            if a.sudo:
                refops.check_sudo(svc, tenant, a.name)  # allowed: the sandbox's commands already run as root
            req = self._req(a.command, a.env, a.workdir or a.cwd, a.timeout_ms, out, err)
            r = await svc.exec(tenant, a.name, req)
            return _result_payload(r, out, err)
        if isinstance(a, CreateArgs):
            refops.check_create(a.source_url, a.source_ref, a.ttl)
            spec = svc.sandbox_spec(tenant, a.name, image=a.image, profile=a.profile, backend=a.backend,
                                    network=a.network, allow_hosts=a.allow_hosts, block_hosts=a.block_hosts,
                                    secrets=a.secrets, memory_mb=a.memory_mb, vcpus=a.vcpus, env=a.env,
                                    workdir=a.workdir, unsupported={"ports": a.ports})
            info = await svc.create(tenant, spec, start=True)
            info |= await refops.after_create(svc, tenant, a.name, source_url=a.source_url, source_ref=a.source_ref,
                                              ttl=a.ttl)
            return f"created sandbox {a.name} ({info['backend']}, {info['image']}): {info['state']}", info
        if isinstance(a, ListArgs):
            items = await svc.list(tenant)
            text = "\n".join(f"{s['name']}\t{s['state']}\t{s['backend']}\t{s['image']}" for s in items)
            return text or "no sandboxes", {"sandboxes": items}
        if name == "sandbox_remove":
            await svc.remove(tenant, a.name)
            return f"removed sandbox {a.name}", {"removed": a.name}
        if name == "sandbox_start":
            info = await svc.start_sandbox(tenant, a.name)
            return f"sandbox {a.name}: {info['state']}", info
        if name == "sandbox_stop":
            info = await svc.stop_sandbox(tenant, a.name)
            return f"sandbox {a.name}: {info['state']}", info
        if isinstance(a, FileWriteArgs):
            p = file_path(a.path)
            data = base64.b64decode(a.content, validate=True) if a.encoding == "base64" else a.content.encode()
            n = await svc.write_file(tenant, a.name, p, data)
            return f"wrote {n} bytes to {p}", {"path": p, "size": n}
        if isinstance(a, FileReadArgs):
            p = file_path(a.path)
            buf = bytearray()
            async for chunk in svc.read_file(tenant, a.name, p):
                buf += chunk
                if len(buf) > FILE_READ_CAP:
                    raise AgentKernelError(f"{p} is larger than {FILE_READ_CAP} bytes: use the HTTP API or "
                                           "agentkernel cp for large files")
            try:
                text = bytes(buf).decode("utf-8")
                return text, {"path": p, "size": len(buf), "encoding": "utf8", "content": text}
            except UnicodeDecodeError:
                b64 = base64.b64encode(bytes(buf)).decode()
                return (f"[binary file {p}, {len(buf)} bytes, base64]\n{b64}",
                        {"path": p, "size": len(buf), "encoding": "base64", "content": b64})
        raise AgentKernelError(f"unknown tool {name!r}")


def tool_list():
    """The advertised tools (``mcp_identity``: the same list the stdio fast path answers with)."""
    import mcp.types as types

    return [types.Tool(name=t["name"], description=t["description"], input_schema=t["inputSchema"])
            for t in mcp_identity.tools()]


def build_server(svc, tokens: TokenSet | None = None):
    """A low-level MCP ``Server`` whose tools run on ``svc`` (a started ``api.service.Service``)."""
    import mcp.types as types
    from mcp.server import Server

    tools = Tools(svc)
    tokens = tokens or TokenSet()

    async def list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    def tenant_of(ctx) -> str | None:
        req = getattr(ctx, "request", None)
        if req is None or not tokens:
            return LOCAL_TENANT
        headers = getattr(req, "headers", {}) or {}
        return tokens.tenant_for(bearer(headers.get("authorization")))

    async def call_tool(ctx, params) -> types.CallToolResult:
        def error(msg: str) -> types.CallToolResult:
            return types.CallToolResult(content=[types.TextContent(type="text", text=msg)], is_error=True)

        if params.name not in TOOLS:
            return error(f"unknown tool {params.name!r} (tools: {', '.join(TOOLS)})")
        tenant = tenant_of(ctx)
        if tenant is None:
            return error("unauthorized")
        try:
            text, data = await tools.call(params.name, dict(params.arguments or {}), tenant)
        except PydanticValidationError as exc:
            msgs = []
            for e in exc.errors()[:5]:
                loc = ".".join(str(x) for x in e.get("loc", ()))
                msgs.append(f"unknown argument {loc!r}" if e.get("type") == "extra_forbidden"
                            else f"{loc}: {e.get('msg')}")
            return error("invalid arguments: " + "; ".join(msgs))
        except AgentKernelError as exc:
            return error(exc.message + (f"\nhint: {exc.hint}" if exc.hint else ""))
        except (ValueError, TypeError) as exc:
            return error(f"invalid arguments: {exc}")
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                    structured_content=json.loads(json.dumps(data, default=str)))

    return Server(mcp_identity.NAME, version=mcp_identity.version(), instructions=mcp_identity.INSTRUCTIONS,
                  on_list_tools=list_tools, on_call_tool=call_tool)


async def serve_stdio(svc, stdin=None, stdout=None) -> None:
    """The server over stdio (``stdin``/``stdout``: async line streams in place of the process's own, as
    ``mcp_stdio`` hands over a session it began)."""
    from mcp.server.stdio import stdio_server

    server = build_server(svc)
    await svc.start()
    try:
        async with stdio_server(stdin, stdout) as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await svc.close()


def mcp_auth(mcp_app, tokens: TokenSet, svc=None):
    """An MCP streamable-HTTP app behind the same bearer tokens as the REST routes."""
    from starlette.responses import JSONResponse

    async def app(scope, receive, send):
        if scope["type"] == "http" and tokens:
            hdr = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if tokens.tenant_for(bearer(hdr)) is None:
                if svc is not None:
                    svc.metrics.auth_failures += 1
                resp = JSONResponse({"success": False, "error": "unauthorized"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await mcp_app(scope, receive, send)

    return app


def http_app(svc, tokens: TokenSet, host: str):
    """The standalone MCP streamable-HTTP app (``agentkernel mcp --transport http``) at ``/mcp``, behind the
    bearer tokens and the same request guard (Origin, loopback) as ``agentkernel serve``."""
    from .guard import RequestGuard

    inner = build_server(svc, tokens).streamable_http_app(streamable_http_path="/mcp", stateless_http=True,
                                                           host=host)
    guarded = RequestGuard(mcp_auth(inner, tokens, svc), tokens=tokens, allowed_origins=svc.policy.allowed_origins,
                           metrics=svc.metrics)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return await inner(scope, receive, send)
        await guarded(scope, receive, send)

    return app
