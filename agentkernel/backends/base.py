"""The backend contract: a narrow required core, optional protocols checked with ``isinstance``.

A backend turns a ``SandboxSpec`` into a live, isolated sandbox on one engine and runs commands in it.
It declares what it can enforce (``Capabilities``); ``check_policy`` refuses a spec that asks for a
control the backend cannot honour (fail closed), naming every missing control at once.

Required core (``Backend``, abstract): ``probe`` (classmethod), ``create`` -> ``start`` -> ``exec`` /
``write_file`` / ``read_file`` -> ``stop`` -> ``remove``, plus ``status`` and ``list``. Every backend gets,
with defaults it may override: ``check`` (fail-closed policy), ``planned_handle`` (names a sandbox's
resources before they exist, so the one owner can claim them first), ``create_started`` (create + start,
one engine call where the engine has one), ``healthy`` (pool hand-out check), ``run`` (the asyncio
one-shot), ``aclose``.

Optional protocols, declared by inheriting them and checked with ``isinstance`` (never ``hasattr``):
- ``OneShot``: a synchronous one-shot with the caller's stdio (``run_oneshot(spec, argv, stdio, timeout,
  sandbox_id=, owner=) -> Outcome``), used by the CLI without asyncio. The caller (``agentkernel.oneshot``)
  owns claim -> run -> notes -> release -> audit; the backend only runs and reports.
- ``AgentAccess``: a live sandbox's agent is reachable from the host (``agent_endpoint`` for a lease,
  ``open_agent`` for a connection): the daemon lends such sandboxes to clients straight from its pools.
- ``InstancePool``: the backend keeps its own in-process pools of instances (wasm).

This module is imported on the CLI's hot path: standard library only, no asyncio/typing at import time.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from ..errors import PolicyNotEnforceable
from ..outcome import Outcome  # defined there, part of this contract (OneShot.run_oneshot returns it)
from ..spec import SandboxSpec
from ..termio import Stdio  # defined there, part of this contract (OneShot.run_oneshot takes it)

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Any, ClassVar


# ---- capabilities ---------------------------------------------------------------------------------

# Controls a backend may declare it enforces. Each maps to a part of the spec (see required_controls).
CONTROLS = {
    "network_none": "no network except loopback (network mode none)",
    "network_full": "network mode open: the outside world, never the host, other sandboxes or metadata addresses",
    "network_allowlist": "network mode allowlist: egress only to policy.network_allow, enforced at the network layer",
    "secret_injection": "secrets substituted by the egress gateway on the bound hosts only (policy.secrets)",
    "read_only_root": "read-only root filesystem (policy.read_only_root)",
    "memory": "memory limit (resources.memory_mb)",
    "cpu": "CPU quota (resources.vcpus)",
    "pids": "process count limit (resources.pids)",
    "disk_tmpfs": "writable storage cap on a read-only root (resources.disk_mb as tmpfs size)",
    "disk_rootfs": "writable storage cap on a writable root (resources.disk_mb)",
    "seccomp_default": "the default seccomp filter (policy.seccomp = default)",
    "seccomp_restrictive": "the restrictive seccomp filter (policy.seccomp = restrictive)",
    "cap_drop_all": "all Linux capabilities dropped",
    "no_new_privileges": "no-new-privileges",
    "non_root": "commands run as policy.user",
    "mount_cwd": "the caller's directory at /workspace (policy.mount_cwd)",
    "env": "environment variables (spec.env / policy.pass_env)",
}


class Capabilities:
    """What a backend can enforce (``controls``) and do (``features``)."""

    __slots__ = ("controls", "features", "isolation")

    def __init__(self, controls: set[str] | frozenset[str], features: set[str] | frozenset[str] = frozenset(),
                 isolation: str = "container") -> None:
        bad = set(controls) - set(CONTROLS)
        if bad:
            raise ValueError(f"unknown controls {sorted(bad)}")
        self.controls = frozenset(controls)
        self.features = frozenset(features)
        self.isolation = isolation

    def to_dict(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "controls": sorted(self.controls), "features": sorted(self.features)}


def required_controls(spec: SandboxSpec) -> list[str]:
    """The controls a spec needs, derived from the spec alone (one place for this rule)."""
    pol, res = spec.policy, spec.resources
    need = ["cap_drop_all", "no_new_privileges"]
    from ..spec import network_mode

    need.append({"none": "network_none", "open": "network_full", "allowlist": "network_allowlist"}[network_mode(pol)])
    if pol.secrets:
        need.append("secret_injection")
    if pol.read_only_root:
        need.append("read_only_root")
    if res.memory_mb is not None:
        need.append("memory")
    if res.vcpus is not None:
        need.append("cpu")
    if res.pids is not None:
        need.append("pids")
    if res.disk_mb is not None:
        need.append("disk_tmpfs" if pol.read_only_root else "disk_rootfs")
    need.append("seccomp_" + pol.seccomp)
    if pol.user.split(":")[0] != "0":
        need.append("non_root")
    if pol.mount_cwd:
        need.append("mount_cwd")
    if spec.env or pol.pass_env:
        need.append("env")
    return need


_FIXES = {
    "disk_rootfs": "set read_only_root = true (writable paths become tmpfs capped at disk_mb) or unset disk_mb",
    "network_allowlist": "use a backend that enforces allowlists (podman, docker, oci, gvisor: see docs/network.md) "
    "or --network none",
    "network_full": "use a backend that isolates open networking (podman, docker, oci, gvisor) or --network none",
    "secret_injection": "use a backend behind the egress gateway (podman, docker, oci, gvisor)",
}


def check_policy(spec: SandboxSpec, caps: Capabilities, backend: str) -> None:
    """Fail closed: raise PolicyNotEnforceable naming every control the backend cannot enforce."""
    missing = [c for c in required_controls(spec) if c not in caps.controls]
    if not missing:
        return
    lines = [f"backend {backend!r} cannot enforce: " + "; ".join(f"{c} ({CONTROLS[c]})" for c in missing)]
    hints = [_FIXES[c] for c in missing if c in _FIXES]
    raise PolicyNotEnforceable(lines[0], hint="; ".join(hints) or "choose another backend or relax the spec")


# ---- exec requests and results ----------------------------------------------------------------------

OutputCallback = "Callable[[int, bytes], Any]"  # (fd 1 or 2, chunk); may return an awaitable
StartCallback = "Callable[[int], None]"  # the command's pid inside the sandbox

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes kept per stream when output is captured


class ExecRequest:
    """One command. ``argv`` is exec'd directly (no shell). ``stdin`` is bytes, an async iterator of
    bytes, or None (empty stdin). With ``on_output`` set, output is streamed to it and not kept.
    ``on_start(pid)``: called once the command runs, with its pid inside the sandbox (backends that run
    commands through the in-sandbox agent; others never call it)."""

    __slots__ = ("argv", "cwd", "env", "on_output", "on_start", "output_limit", "stdin", "timeout", "tty",
                 "tty_size", "user")

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | AsyncIterator[bytes] | None = None,
        timeout: float | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
        on_output: OutputCallback | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        user: str | None = None,
        on_start: StartCallback | None = None,
    ) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            from ..errors import ValidationError

            raise ValidationError("command must be a non-empty list of strings")
        if timeout is not None and timeout <= 0:
            from ..errors import ValidationError

            raise ValidationError(f"timeout must be positive, got {timeout}")
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.stdin = stdin
        self.timeout = timeout
        self.tty = tty
        self.tty_size = tty_size
        self.on_output = on_output
        self.output_limit = output_limit
        self.user = user
        self.on_start = on_start


class ExecResult:
    """Exact result of one command. ``exit_code`` is 128+N when killed by signal N (shell convention),
    124 on timeout."""

    __slots__ = ("exit_code", "oom_killed", "signal", "stderr", "stdout", "timed_out", "timings", "truncated")

    def __init__(
        self,
        exit_code: int,
        *,
        signal: int | None = None,
        timed_out: bool = False,
        oom_killed: bool = False,
        stdout: bytes = b"",
        stderr: bytes = b"",
        truncated: bool = False,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.signal = signal
        self.timed_out = timed_out
        self.oom_killed = oom_killed
        self.stdout = stdout
        self.stderr = stderr
        self.truncated = truncated
        self.timings = timings or {}

    def to_dict(self, text: bool = True) -> dict[str, Any]:
        def dec(b: bytes) -> str:
            return b.decode("utf-8", "replace")

        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "oom_killed": self.oom_killed,
            "stdout": dec(self.stdout) if text else self.stdout,
            "stderr": dec(self.stderr) if text else self.stderr,
            "truncated": self.truncated,
            "timings": dict(self.timings),
        }

    def __repr__(self) -> str:
        return (f"ExecResult(exit_code={self.exit_code}, signal={self.signal}, timed_out={self.timed_out}, "
                f"oom_killed={self.oom_killed}, stdout={self.stdout[:60]!r}, stderr={self.stderr[:60]!r})")


class OutputCollector:
    """Keeps up to ``limit`` bytes per stream, then marks the result truncated (head kept)."""

    __slots__ = ("buf", "limit", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = {1: bytearray(), 2: bytearray()}
        self.truncated = False

    def __call__(self, fd: int, data: bytes) -> None:
        b = self.buf[fd]
        room = self.limit - len(b)
        if room >= len(data):
            b += data
        else:
            if room > 0:
                b += data[:room]
            self.truncated = True


# ---- handles ------------------------------------------------------------------------------------------


class SandboxRef:
    """A handle on one sandbox: enough to find it again from another process (it is persisted)."""

    __slots__ = ("backend", "handle", "id", "spec")

    def __init__(self, backend: str, id: str, handle: dict[str, Any], spec: SandboxSpec) -> None:
        self.backend = backend
        self.id = id
        self.handle = handle
        self.spec = spec

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "id": self.id, "handle": self.handle, "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxRef:
        return cls(d["backend"], d["id"], dict(d["handle"]), SandboxSpec.from_dict(d["spec"]))

    def __repr__(self) -> str:
        return f"SandboxRef({self.backend}:{self.id} {self.handle})"


class SandboxInfo:
    """One managed resource as the engine reports it (for ``list`` and leak checks)."""

    __slots__ = ("backend", "handle", "id", "labels", "name", "status")

    def __init__(self, backend: str, id: str, name: str | None, status: str, handle: dict[str, Any],
                 labels: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.id = id
        self.name = name
        self.status = status
        self.handle = handle
        self.labels = labels or {}

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "id": self.id, "name": self.name, "status": self.status,
                "handle": self.handle, "labels": self.labels}


class Availability:
    """Doctor's verdict on one backend on this host."""

    __slots__ = ("available", "details", "fix", "reason")

    def __init__(self, available: bool, reason: str, *, fix: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        self.available = available
        self.reason = reason
        self.fix = fix
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, "fix": self.fix, "details": self.details}


# ---- the interface ------------------------------------------------------------------------------------


class Backend(ABC):
    """Base class for backends. Subclasses set ``name`` and ``capabilities`` and implement the
    abstract methods; everything is asyncio. ``options`` are backend-specific strings from the spec /
    config (validated by the backend)."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    options_allowed: ClassVar[tuple[str, ...]] = ()
    # the OCI runtime under the engine, when its own host tasks count against the sandbox's pids cgroup
    # ("runsc": the Sentry's threads and a ptrace stub per guest process; see oci.bundle.host_pids_limit)
    pids_runtime: ClassVar[str] = ""
    # True when a one-shot run creates nothing outside the running process that a crash could leave
    # behind for the ownership journal to reap (wasm: instances in memory; its scratch directories are
    # named by pid and reaped through list()): the daemon then skips the journal claim per run
    in_process: ClassVar[bool] = False
    # False: in-process runs (``oneshot.run_async``) keep the asyncio ``run`` instead of ``run_oneshot`` on a
    # thread, which folds the request's env and cwd into the spec (qemu: a spec's workdir is part of its VM
    # snapshot template, so every distinct cwd would make a new template)
    oneshot_in_process: ClassVar[bool] = True
    # set by the daemon for pool work: engine processes it spawns run at a lower CPU priority, so
    # refills and removals do not slow down the commands being served meanwhile
    background: bool = False

    def __init__(self, options: dict[str, str] | None = None) -> None:
        self.options = dict(options or {})
        bad = set(self.options) - set(self.options_allowed)
        if bad:
            from ..errors import ConfigError

            raise ConfigError(
                f"backend {self.name!r} has no option {sorted(bad)[0]!r} "
                f"(options: {', '.join(self.options_allowed) or 'none'})"
            )

    # -- host checks --
    @classmethod
    @abstractmethod
    def probe(cls) -> Availability:
        """Synchronous, quick: can this backend work on this host, and if not, exactly why."""

    def check(self, spec: SandboxSpec) -> None:
        """Refuse specs this backend cannot honour (fail closed). Override to add backend rules. The core
        runs it once, before anything of a spec is made (``manager`` for named sandboxes, ``oneshot`` for
        runs, the daemon for pools); ``create``/``run``/``run_oneshot``/``start_pool`` do not repeat it."""
        check_policy(spec, self.capabilities, self.name)

    # -- lifecycle --
    @abstractmethod
    async def create(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef: ...

    @abstractmethod
    async def start(self, ref: SandboxRef) -> None: ...

    @abstractmethod
    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult: ...

    @abstractmethod
    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        """Write a file inside the sandbox (parents created). Returns bytes written."""

    @abstractmethod
    def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        """Stream a file out of the sandbox in chunks. Raises NotFound for a missing file."""

    @abstractmethod
    async def stop(self, ref: SandboxRef) -> None: ...

    @abstractmethod
    async def remove(self, ref: SandboxRef) -> None:
        """Destroy every resource of the sandbox. Idempotent: a missing sandbox is not an error."""

    async def remove_many(self, refs: list[SandboxRef]) -> list[BaseException | None]:
        """``remove`` for many sandboxes (a pool being closed); per ref, None or the error that kept it.
        Engines driven by a CLI override this with one engine call per batch."""
        import asyncio

        return list(await asyncio.gather(*(self.remove(r) for r in refs), return_exceptions=True))

    @abstractmethod
    async def status(self, ref: SandboxRef) -> str:
        """'running', 'stopped', 'created' or 'missing'."""

    @abstractmethod
    async def list(self) -> list[SandboxInfo]:
        """Every resource on this engine that agentkernel manages (labelled), whoever owns it."""

    # -- provided, overridable --
    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        """The handle of sandbox ``sandbox_id`` before anything of it exists: what the owner claims in the
        ownership journal before ``create``. ``remove(SandboxRef(name, sandbox_id, planned_handle(id), spec))``
        must find and destroy everything a crashed create/run of that id may have left. Only the backend
        names its resources; nothing outside it invents them."""
        return {}

    async def create_started(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        """``create`` + ``start`` (pools use it); engines with one call for both override it."""
        ref = await self.create(spec, sandbox_id=sandbox_id, owner=owner)
        try:
            await self.start(ref)
        except BaseException:
            await self.remove(ref)
            raise
        return ref

    async def healthy(self, ref: SandboxRef) -> bool:
        """Pool hand-out check: can this started sandbox serve a command now?"""
        return await self.status(ref) == "running"

    async def run(self, spec: SandboxSpec, req: ExecRequest, *, sandbox_id: str,
                  owner: dict[str, Any]) -> ExecResult:
        """One-shot: a fresh sandbox for one command, destroyed afterwards whatever happens."""
        return (await self.run_timed(spec, req, sandbox_id=sandbox_id, owner=owner))[1]

    async def run_timed(self, spec: SandboxSpec, req: ExecRequest, *, sandbox_id: str,
                        owner: dict[str, Any], start_gate: Any = None) -> tuple[SandboxRef, ExecResult]:
        """``run``'s work, also returning the (removed) sandbox's ref, for backends that add timings
        from its handle; the result's timings hold each phase (create, start, exec, remove, total).

        ``start_gate`` (an async context manager, e.g. the daemon's start semaphore) bounds the sandbox's
        create + start, not its command: then both run as ``create_started`` (one engine call where the
        engine has one) inside the gate, ``create_ms`` covers both and ``start_wait_ms`` is the wait for
        the gate."""
        t0 = time.perf_counter()
        if start_gate is None:
            ref = await self.create(spec, sandbox_id=sandbox_id, owner=owner)
            t_gate = t0
        else:
            async with start_gate:
                t_gate = time.perf_counter()
                ref = await self.create_started(spec, sandbox_id=sandbox_id, owner=owner)
        try:
            t1 = time.perf_counter()
            if start_gate is None:
                await self.start(ref)
            t2 = time.perf_counter()
            result = await self.exec(ref, req)
            t3 = time.perf_counter()
        finally:
            t4 = time.perf_counter()
            await self.remove(ref)
        t5 = time.perf_counter()
        if start_gate is None:
            phases = {"create_ms": (t1 - t0) * 1e3, "start_ms": (t2 - t1) * 1e3}
        else:
            phases = {"start_wait_ms": (t_gate - t0) * 1e3, "create_ms": (t1 - t_gate) * 1e3}
        result.timings.update({**phases, "exec_ms": (t3 - t2) * 1e3, "remove_ms": (t5 - t4) * 1e3,
                               "total_ms": (t5 - t0) * 1e3})
        return ref, result

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op for most backends
        """Release connections held by this backend object."""


# ---- optional protocols (inherit to declare; callers test with isinstance) ----------------------------


class OneShot:
    """A synchronous one-shot without asyncio: the CLI's daemon-less ``run``."""

    __slots__ = ()

    def run_oneshot(self, spec: SandboxSpec, argv: list[str], stdio: Stdio, timeout: float | None, *,
                    sandbox_id: str, owner: dict[str, Any]) -> Outcome:
        """Run ``argv`` in a fresh sandbox named ``sandbox_id`` (already claimed by the caller under
        ``planned_handle(sandbox_id)``) with ``stdio``; destroy everything of it before returning, whatever
        happens. On timeout kill the whole sandbox and return ``Outcome(..., timed_out=True)``. Report
        the exact status (128+N for signal N) and OOM kills; do not print notes (the caller renders them).
        Raise ``AgentKernelError`` when the sandbox could not run the command at all."""
        raise NotImplementedError


class AgentAccess:
    """A live sandbox's in-sandbox agent is reachable from this host: the daemon leases pooled members
    to clients, which then talk to the agent directly."""

    __slots__ = ()

    async def agent_endpoint(self, ref: SandboxRef) -> dict[str, Any]:
        """What a client needs to run one command through the agent itself: ``socket`` (a unix socket
        path), ``env`` (the command's environment), ``cwd``."""
        raise NotImplementedError

    async def open_agent(self, ref: SandboxRef) -> Any:
        """A connected ``agent.client.AgentClient`` for this sandbox; the caller closes it."""
        raise NotImplementedError


class InstancePool:
    """The backend keeps pools of ready instances in this process (``in_process`` backends, e.g. wasm):
    after ``start_pool`` its ``run`` takes instances from the matching pool."""

    __slots__ = ()

    async def start_pool(self, spec: SandboxSpec, size: int = 8, command: str = "sh") -> Any:
        """Start (or return) the pool serving one-shot runs of ``spec`` for ``command``."""
        raise NotImplementedError

    def pools(self) -> list[Any]:
        """The pools started so far (each has ``status() -> dict``)."""
        raise NotImplementedError


# Labels put on every engine resource we create (one definition for all backends).
LABEL_PREFIX = "agentkernel."
LABEL_MANAGED = "agentkernel.managed"
LABEL_ID = "agentkernel.sandbox-id"
LABEL_NAME = "agentkernel.name"
LABEL_OWNER_HOST = "agentkernel.owner.host"
LABEL_OWNER_BOOT = "agentkernel.owner.boot"
LABEL_OWNER_PID = "agentkernel.owner.pid"
LABEL_OWNER_START = "agentkernel.owner.start"
LABEL_STORE = "agentkernel.store"
# The ownership journal of the process that made the resource (``paths.journal_path()``): a reaper working
# from another runtime dir reads that journal before it judges the resource (``reap.collect_orphans``).
LABEL_JOURNAL = "agentkernel.journal"


def owner_labels(sandbox_id: str, owner: dict[str, Any], name: str | None = None) -> dict[str, str]:
    from ..paths import journal_path

    labels = {
        LABEL_MANAGED: "true",
        LABEL_ID: sandbox_id,
        LABEL_OWNER_HOST: str(owner.get("host", "")),
        LABEL_OWNER_BOOT: str(owner.get("boot", "")),
        LABEL_OWNER_PID: str(owner.get("pid", "")),
        LABEL_OWNER_START: str(owner.get("start", "")),
        LABEL_JOURNAL: journal_path(),
    }
    if name:
        labels[LABEL_NAME] = name
    if owner.get("store"):
        labels[LABEL_STORE] = str(owner["store"])
    labels.update(extra_labels())
    return labels


def extra_labels() -> dict[str, str]:
    """AGENTKERNEL_LABELS="key=value,key2=value2": labels added to every resource this process creates
    (e.g. a CI job id, so its leak check can tell its own sandboxes from anyone else's)."""
    import os

    key_chars = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")
    value_chars = key_chars | frozenset(":@")
    out: dict[str, str] = {}
    for item in filter(None, (os.environ.get("AGENTKERNEL_LABELS") or "").split(",")):
        k, sep, v = item.partition("=")
        if sep and 0 < len(k) <= 128 and k[0].isalnum() and set(k) <= key_chars and len(v) <= 255 \
                and set(v) <= value_chars:
            out[k] = v
    return out


def owner_from_labels(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "host": labels.get(LABEL_OWNER_HOST, ""),
        "boot": labels.get(LABEL_OWNER_BOOT, ""),
        "pid": int(labels.get(LABEL_OWNER_PID) or 0),
        "start": int(labels.get(LABEL_OWNER_START) or 0),
        "store": labels.get(LABEL_STORE, ""),
    }
