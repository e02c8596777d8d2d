"""What the HTTP API and the MCP server serve: ONE embedded ``Daemon`` (warm pools) and ONE
``SandboxManager`` (named sandboxes, the store) per server process. Nothing here is built per request.

Every method that touches a named sandbox takes the caller's tenant; the store's tenant column scopes
it, so another tenant's sandbox is simply not found.

The service owns, once for HTTP and MCP, the turning of a request into a spec or an exec request: the
checks of names, paths, environment and arguments, the server's policy for remote callers
(``policy.py``: allowed backends/profiles/network, resource ceilings, no host mounts) and the admission
limits (``admission.py``: live sandboxes, concurrent runs, batch size: 429 beyond them).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any

from .. import audit
from ..backends.base import ExecRequest, ExecResult
from ..errors import AgentKernelError, InvalidField, NotFound, PolicyNotEnforceable, ValidationError
from ..manager import SandboxManager
from ..spec import SandboxSpec, check_sandbox_path, validate_name, validate_timeout
from .admission import Admission
from .metrics import Metrics
from .policy import ServerPolicy
from .speccache import SpecCache, freeze

log = logging.getLogger("agentkernel.api")

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_OUTPUT_LIMIT = 1 << 20  # bytes kept per stream in a JSON result (streams are not capped)
STREAM_OUTPUT_LIMIT = 1 << 30


def env_dict(env: dict[str, str] | list[str] | None) -> dict[str, str]:
    """{K: V} or ["K=V", ...] -> dict (the reference clients send the list form)."""
    if env is None:
        return {}
    if isinstance(env, dict):
        out = dict(env)
    else:
        out = {}
        for item in env:
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise ValidationError(f"env entries must be KEY=VALUE, got {item!r}")
            out[k] = v
    import re

    for k, v in out.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise ValidationError(f"invalid environment variable name {k!r}")
        if "\0" in v:
            raise ValidationError(f"the value of {k} contains a NUL byte")
    return out


NetworkField = bool | str | None


def network_flags(network: NetworkField, allow_hosts: list[str] | None, block_hosts: list[str] | None,
                  secrets: list[str] | None) -> tuple[dict[str, Any], str | None]:
    """The network fields of a run/create request -> (the CLI's flags, the requested mode or None when
    none was asked for). Every value is checked here, each error (422) names its field:

    - ``network``: true (open; allowlist when ``allow_hosts`` is given), false, "none", "allowlist", "open";
    - ``allow_hosts`` / ``block_hosts``: entries as ``--allow-host`` (``host[:port]``, ``*.domain``, CIDRs);
    - ``secrets``: ``NAME:HOST[:HEADER]`` bindings of secrets the server holds (by name; values never
      travel over the API)."""
    from ..egress.rules import parse_binding, parse_entry

    def field(name: str, fn, *args):
        try:
            return fn(*args)
        except ValidationError as exc:
            raise InvalidField(exc.message if exc.message.startswith(name) else f"{name}: {exc.message}",
                               hint=exc.hint) from None

    if network is not None and not isinstance(network, bool) and network not in ("none", "allowlist", "open"):
        raise InvalidField(f"network: must be true, false, \"none\", \"allowlist\" or \"open\", got {network!r}")
    for key, values in (("allow_hosts", allow_hosts), ("block_hosts", block_hosts), ("secrets", secrets)):
        if values is not None and len(values) > 256:
            raise InvalidField(f"{key}: at most 256 entries")
    allow, block, binds = list(allow_hosts or ()), list(block_hosts or ()), list(secrets or ())
    for i, e in enumerate(allow):
        field(f"allow_hosts[{i}]", parse_entry, e, f"allow_hosts[{i}]")
    for i, e in enumerate(block):
        field(f"block_hosts[{i}]", parse_entry, e, f"block_hosts[{i}]")
    for i, b in enumerate(binds):
        field(f"secrets[{i}]", parse_binding, b, f"secrets[{i}]")
    if allow and network in (False, "none", "open"):
        raise InvalidField(f"allow_hosts: contradicts network = {network!r} (an allowlist is network mode "
                           "allowlist: send network \"allowlist\" or true, or leave it out)")
    mode = ("allowlist" if allow else network if isinstance(network, str)
            else None if network is None else "open" if network else "none")
    flags: dict[str, Any] = {}
    if mode is not None:
        flags["network"] = mode
    if allow:
        flags["allow_host"] = allow
    if block:
        flags["block_host"] = block
    if binds:
        flags["secret"] = binds
    if flags:
        from ..egress.config import apply_flags, finalize
        from ..errors import ConfigError

        scratch: dict[str, Any] = {}
        try:
            apply_flags(scratch, flags)
            finalize(scratch)
        except (ConfigError, ValidationError) as exc:
            key = "secrets" if "secret" in exc.message else "allow_hosts" if allow else "network"
            raise InvalidField(f"{key}: {exc.message}", hint=exc.hint) from None
    if binds:
        from ..egress import secrets as store

        held = set(store.names())
        for i, b in enumerate(binds):
            name = b.split(":", 1)[0]
            if name not in held:
                raise InvalidField(f"secrets[{i}]: no secret named {name!r} on this server",
                                   hint=f"on the server: agentkernel secret set {name}")
    return flags, mode


def check_cwd(cwd: str | None) -> str | None:
    if cwd is None:
        return None
    check_sandbox_path(cwd)
    return cwd


def file_path(raw: str) -> str:
    """A URL path tail (``tmp/x`` or ``/tmp/x``: the reference clients send either) -> an absolute
    sandbox path, checked: no ``..`` component, no NUL."""
    p = "/" + raw.lstrip("/")
    check_sandbox_path(p)
    if p != "/" and p.endswith("/"):
        raise ValidationError(f"{p!r} names a directory; the file routes transfer single files")
    return p


def text_and_b64(data: bytes) -> tuple[str, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), base64.b64encode(data).decode()


def result_dict(r: ExecResult) -> dict[str, Any]:
    out, out_b64 = text_and_b64(r.stdout)
    err, err_b64 = text_and_b64(r.stderr)
    return {"output": out + err, "exit_code": r.exit_code, "signal": r.signal, "timed_out": r.timed_out,
            "oom_killed": r.oom_killed, "stdout": out, "stderr": err, "stdout_base64": out_b64,
            "stderr_base64": err_b64, "truncated": r.truncated,
            "timings": {k: round(float(v), 3) for k, v in r.timings.items()}}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def sandbox_info(d: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    state = d.get("state") or "missing"
    status = "running" if state == "running" else ("paused" if state == "paused" else "stopped")
    res = (spec or {}).get("resources") or {}
    cpus = res.get("vcpus")
    return {"name": d["name"], "uuid": d.get("id"), "status": status, "state": state, "backend": d.get("backend"),
            "image": d.get("image") or (spec or {}).get("image"), "profile": d.get("profile"),
            "vcpus": math.ceil(cpus) if cpus else None, "cpus": cpus, "memory_mb": res.get("memory_mb"),
            "created_at": iso(d.get("created_at")), "expires_at": _expiry(d.get("id"))}


def _expiry(sandbox_id: str | None) -> str | None:
    from .refops import expiry_of

    return expiry_of(sandbox_id)


class Service:
    def __init__(self, *, config: dict[str, Any] | None = None, pool_min: int | None = None,
                 pool_max: int | None = None, warm: list[str] | None = None, store=None,
                 default_timeout: float = DEFAULT_TIMEOUT_S, with_daemon: bool = True,
                 policy: ServerPolicy | None = None) -> None:
        self.config = config or {}
        self._config_given = config is not None
        self.manager = SandboxManager(store)
        self.metrics = Metrics()
        self.policy = policy or ServerPolicy()
        self.admission = Admission(self.policy, lambda: self.manager.store)
        self.daemon = None
        self.default_timeout = default_timeout
        self._pool_args = {"min": pool_min, "max": pool_max}
        self._warm = warm or []
        self._with_daemon = with_daemon
        self.active = 0
        self.started_at = time.time()
        self.spec_cache = SpecCache()

    # -- lifecycle --
    async def start(self) -> None:
        if self._with_daemon:
            from ..daemon.server import Daemon, load_daemon_config

            defaults, warm = load_daemon_config(self._pool_args, self._warm,
                                                self.config if self._config_given else None)
            self.daemon = Daemon(pool_defaults=defaults, warm=warm)
            await self.daemon.start_background()
            # One owner: the CLI's `agentkernel run` goes through this process's pools too.
            try:
                sock = await self.daemon.listen()
                log.info("also serving the daemon protocol on %s", sock)
            except AgentKernelError as exc:
                log.warning("not serving the daemon socket (%s); CLI runs use that daemon's pools", exc.message)

    async def close(self) -> None:
        if self.daemon is not None:
            await self.daemon.close()
        await self.manager.aclose()

    # -- requests -> specs (one place for HTTP and MCP) --
    def _spec(self, tenant: str, argv: list[str] | None, flags: dict[str, Any], net: dict[str, Any]) -> SandboxSpec:
        from ..imagesel import resolve_for_command

        caller = self.policy.for_tenant(tenant)
        netflags, mode = network_flags(net.get("network"), net.get("allow_hosts"), net.get("block_hosts"),
                                       net.get("secrets"))
        f = {**flags, **netflags, "mount_cwd": False}  # never the server's directory on behalf of a remote caller
        if "network" not in netflags:
            f["network"] = net.get("network")
        from ..backends import canonical

        # the caller's policy first: nothing it may not ask for is even resolved
        backend = flags.get("backend")
        caller.check_request(backend=canonical(backend) if backend else None, profile=flags.get("profile"),
                             network=None, mode=mode,
                             allow=tuple(net.get("allow_hosts") or ()), secrets=tuple(net.get("secrets") or ()),
                             resources={k: flags.get(k) for k in ("memory_mb", "vcpus", "pids", "disk_mb")})
        spec = resolve_for_command(f, argv, config=self.config)  # the one image rule
        caller.check_request(backend=canonical(spec.backend), profile=spec.policy.profile, network=None,
                             resources={})
        return caller.confine(spec)

    def run_spec(self, tenant: str, argv: list[str], *, image: str | None = None, profile: str | None = None,
                 backend: str | None = None, network: NetworkField = None, allow_hosts: list[str] | None = None,
                 block_hosts: list[str] | None = None, secrets: list[str] | None = None) -> SandboxSpec:
        """The spec of a one-shot run a caller asked for, within its policy (the same request's resolution
        is reused for a few seconds: ``speccache.py``)."""
        key = ("run", tenant, self.policy.for_tenant(tenant), tuple(argv), image, profile, backend, freeze(network),
               freeze(allow_hosts), freeze(block_hosts), freeze(secrets))
        return self.spec_cache.get(key, lambda: self._spec(
            tenant, argv, {"image": image, "profile": profile, "backend": backend},
            {"network": network, "allow_hosts": allow_hosts, "block_hosts": block_hosts, "secrets": secrets}),
            depends=freeze(self.config))

    def check_image(self, spec: SandboxSpec) -> None:
        """``check_image``, its success remembered for a few seconds per (backend, image, options)."""
        self.spec_cache.get(("image", spec.backend, spec.image, freeze(spec.options)), lambda: check_image(spec),
                            depends=freeze(self.config))

    def sandbox_spec(self, tenant: str, name: str, *, image: str | None = None, profile: str | None = None,
                     backend: str | None = None, network: NetworkField = None, allow_hosts: list[str] | None = None,
                     block_hosts: list[str] | None = None, secrets: list[str] | None = None,
                     read_only: bool | None = None,
                     memory_mb: int | None = None, vcpus: float | None = None, pids: int | None = None,
                     disk_mb: int | None = None, env=None, workdir: str | None = None,
                     options: dict[str, str] | None = None,
                     unsupported: dict[str, Any] | None = None) -> SandboxSpec:
        """The spec of a named sandbox a caller asked for, within its policy; fields this server does not
        implement (``unsupported``) are refused when set."""
        refuse_unsupported(**(unsupported or {}))
        validate_name(name)
        return self._spec(tenant, None, {"image": image, "profile": profile, "backend": backend,
                                         "read_only": read_only, "memory_mb": memory_mb, "vcpus": vcpus,
                                         "pids": pids, "disk_mb": disk_mb, "env": env_dict(env),
                                         "workdir": check_cwd(workdir), "name": name, "options": options or {}},
                          {"network": network, "allow_hosts": allow_hosts, "block_hosts": block_hosts,
                           "secrets": secrets})

    def exec_request(self, argv: list[str], *, env=None, cwd=None, timeout=None, stdin: str | None = None,
                     on_output=None, output_limit: int | None = None, sudo: bool | None = None) -> ExecRequest:
        refuse_unsupported(sudo=sudo)
        if any("\0" in a for a in argv):
            raise ValidationError("command arguments must not contain NUL bytes")
        return ExecRequest(argv, env=env_dict(env), cwd=check_cwd(cwd),
                           stdin=stdin.encode() if stdin else None,
                           timeout=validate_timeout(timeout or self.default_timeout), on_output=on_output,
                           output_limit=DEFAULT_OUTPUT_LIMIT if output_limit is None else output_limit)

    # -- one-shot runs --
    async def run(self, tenant: str, spec: SandboxSpec, req: ExecRequest, *, fast: bool = True,
                  admitted: bool = False) -> ExecResult:
        """One command in a fresh sandbox: from the daemon's warm pool (fast), else created cold (through
        the same start limiter as pool refills). Cancelling this kills the command and destroys the
        sandbox. ``admitted``: the caller already holds an admission for it (a batch)."""
        self.check_image(spec)
        ticket = None if admitted else self.admission.runs(tenant, 1, oneshot=True)
        try:
            if fast and self.daemon is not None:
                work = self.daemon.run(spec, req)
            else:
                work = self.manager.run(spec, req, start_gate=self.start_gate())
            return await self._counted("run", spec.backend, work, tenant)
        finally:
            if ticket is not None:
                ticket.release()

    async def batch(self, tenant: str, jobs: list[tuple[SandboxSpec, ExecRequest]]) -> list[ExecResult | Exception]:
        """Several one-shot runs in parallel, admitted all at once (or refused with 429)."""
        import asyncio

        async def one(spec: SandboxSpec, req: ExecRequest) -> ExecResult:
            return await self.run(tenant, spec, req, admitted=True)

        with self.admission.runs(tenant, len(jobs), oneshot=True, batch=True):
            return await asyncio.gather(*(one(s, r) for s, r in jobs), return_exceptions=True)

    def start_gate(self):
        """The semaphore that bounds concurrent sandbox starts: the daemon's, shared with pool refills."""
        return self.daemon.start_sem if self.daemon is not None else None

    async def _counted(self, kind: str, backend: str, work: Awaitable[ExecResult], tenant: str) -> ExecResult:
        """Await one run or exec, counted in ``active`` and the metrics, with ``server_ms`` in its timings."""
        t0 = time.perf_counter()
        self.active += 1
        result = None
        try:
            result = await work
            return result
        finally:
            self.active -= 1
            dt = time.perf_counter() - t0
            pooled = None
            if result is not None:
                result.timings["server_ms"] = round(dt * 1e3, 3)
                if kind == "run":
                    pooled = bool(result.timings.get("pooled"))
            self.metrics.run(kind, backend, pooled, dt, result.exit_code if result else None, error=result is None,
                             tenant=tenant)

    # -- named sandboxes --
    async def create(self, tenant: str, spec: SandboxSpec, *, start: bool = True) -> dict[str, Any]:
        """Create (and start) a named sandbox. A start that fails removes it again: no ``created`` record
        is left behind for a sandbox the caller was told failed."""
        validate_name(spec.name or "")
        check_image(spec)
        with self.admission.creating(tenant):
            gate = self.start_gate()
            async with gate if gate is not None else contextlib.nullcontext():
                rec = await self.manager.create(spec, start=False, tenant=tenant)
                if start:
                    try:
                        await self.manager.start(rec.name, tenant)
                    except BaseException:
                        try:
                            await self.manager.remove(rec.name, tenant)
                        except Exception as exc:  # the start error is the one to report
                            log.warning("removing %s after its failed start: %s", rec.name, exc)
                        raise
        return await self.info(tenant, rec.name)

    async def info(self, tenant: str, name: str) -> dict[str, Any]:
        validate_name(name)
        rec = self.manager.get(name, tenant)
        state = await self.manager.status(name, tenant)
        d = {"name": rec.name, "id": rec.id, "backend": rec.backend, "image": rec.spec.get("image"),
             "profile": (rec.spec.get("policy") or {}).get("profile"), "state": state, "created_at": rec.created_at}
        return sandbox_info(d, rec.spec)

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        items = await self.manager.list(tenant)
        specs = {r.name: r.spec for r in self.manager.store.list(tenant)}
        return [sandbox_info(d, specs.get(d["name"])) for d in items]

    async def remove(self, tenant: str, name: str) -> None:
        validate_name(name)
        await self.manager.remove(name, tenant)

    async def start_sandbox(self, tenant: str, name: str) -> dict[str, Any]:
        validate_name(name)
        await self.manager.start(name, tenant)
        return await self.info(tenant, name)

    async def stop_sandbox(self, tenant: str, name: str) -> dict[str, Any]:
        validate_name(name)
        await self.manager.stop(name, tenant)
        return await self.info(tenant, name)

    async def exec(self, tenant: str, name: str, req: ExecRequest, *, admitted: bool = False) -> ExecResult:
        """``admitted``: the caller already holds an admission for it (a stream)."""
        validate_name(name)
        found = self.manager.lookup(name, tenant)  # one store read (none while unchanged) for both uses
        ticket = None if admitted else self.admission.runs(tenant, 1, oneshot=False)
        try:
            return await self._counted("exec", found[0].backend, self.manager.exec(name, req, tenant, found=found),
                                       tenant)
        finally:
            if ticket is not None:
                ticket.release()

    async def write_file(self, tenant: str, name: str, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int | None = None) -> int:
        validate_name(name)
        return await self.manager.write_file(name, path, data, mode if mode is not None else 0o644, tenant)

    def read_file(self, tenant: str, name: str, path: str) -> AsyncIterator[bytes]:
        validate_name(name)
        self.manager.get(name, tenant)
        return self.manager.read_file(name, path, tenant)

    async def read_file_head(self, tenant: str, name: str, path: str) -> tuple[bytes | None, AsyncIterator[bytes]]:
        """Start a download: (first chunk or None for an empty file, iterator over the rest). Errors
        (missing file, not running) surface here, before any response is sent."""
        it = self.read_file(tenant, name, path).__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return None, _empty()
        return first, it

    async def delete_file(self, tenant: str, name: str, path: str) -> None:
        validate_name(name)
        check_sandbox_path(path)
        rec = self.manager.get(name, tenant)
        client = await self.manager.open_agent(name, tenant)
        if client is None:
            r = await self.manager.exec(name, ExecRequest(["rm", "-f", "--", path], timeout=30), tenant)
            if r.exit_code != 0:
                raise ValidationError(f"cannot delete {path}: {r.stderr.decode(errors='replace').strip()}")
        else:
            try:
                await client.remove(path, missing_ok=False)
            except FileNotFoundError:
                raise NotFound(f"no such file: {path} in sandbox {name}") from None
            except IsADirectoryError:
                raise ValidationError(f"{path} in sandbox {name} is a directory") from None
            except PermissionError:
                raise ValidationError(f"permission denied: {path} in sandbox {name}") from None
            finally:
                await client.close()
        audit.log("file_deleted", sandbox=name, id=rec.id, path=path)

    def logs(self, tenant: str, name: str, last: int | None = None) -> list[dict[str, Any]]:
        validate_name(name)
        rec = self.manager.get(name, tenant)
        return audit.read(sandbox=rec.id, last=last)

    # -- status --
    def pools(self) -> list[dict[str, Any]]:
        return self.daemon.status()["pools"] if self.daemon is not None else []


def check_image(spec: SandboxSpec) -> None:
    """Make the image available before anything is created (pulled per the pull policy: a pool for a
    missing image would only retry and fail)."""
    from ..images.pull import ensure
    from ..images.settings import load_user_config, pull_policy

    cfg = load_user_config()
    ensure(spec.backend, spec.image, pull_policy(None, cfg), config=cfg, progress=False, options=spec.options)


def refuse_unsupported(**fields: Any) -> None:
    """Fields the reference clients may send that nothing here implements: refuse when set."""
    bad = [k for k, v in fields.items() if v not in (None, False, [], "")]
    if bad:
        raise PolicyNotEnforceable(f"not supported by this server: {', '.join(bad)}",
                                   hint="remove these fields from the request")


async def _empty():
    return
    yield b""  # pragma: no cover
