"""Docker backend: Docker Engine (dockerd) through its API on the unix socket, the agent as PID 1.

The engine-neutral ``ContainerPlan`` (``_container.plan``) is rendered as Engine API JSON
(``create_body``); no control is re-derived from the spec here. Every control the backend declares
was checked in a running container on Docker 20.10 here (tests/backends/test_docker_backend.py):
capabilities all dropped (CapEff 0), NoNewPrivs 1, seccomp mode 2 (the engine's default filter or the
restrictive profile passed as JSON text), uid/gid from the plan, memory (+swap, no swap allowed),
CFS cpu quota and pids limit in the container's cgroups, read-only root with size-capped tmpfs
mounts, bind mounts, environment, and network none: ``NetworkDisabled`` (plus ``NetworkMode: none``),
so the OCI runtime creates a private network namespace with only ``lo`` and dockerd sets up no
network sandbox at all (it spawns a helper process for one even for ``none``: ~100 ms per start).
Create-time warnings from the engine (e.g. "limit discarded") make creation fail: we never run with a
silently dropped control.

Network modes open and allowlist (docs/network.md): dockerd cannot join a namespace path, so the
container is created with no network (the runtime makes an empty namespace), the agent (PID 1) is told
to wait for ``/.ak/run/net-ready``, and right after start ``egress.attach.complete`` names the
container's namespace (``ip netns attach``), moves a veth of the egress bridge into it, sets its
address, route and firewall, and creates the ready file. The only route out is the egress gateway;
the host, other sandboxes and metadata addresses are never reachable. ``/etc/resolv.conf`` is a
read-only bind of a file naming the gateway. (Docker's own bridges and NAT are not used at all.)

One-shot runs (``run_attached_sync``, the CLI's daemon-less ``agentkernel run --backend docker``)
are synchronous and never import asyncio: create -> attach (hijacked HTTP, multiplexed stdout/stderr)
-> wait registered -> start -> stream output to fds 1 and 2 as it arrives -> exit status -> remove.
"""

from __future__ import annotations

import _signal
import os

from ..errors import AgentKernelError, BackendUnavailable, PolicyNotEnforceable, SandboxError
from ..termio import SignalForwarder, write_all
from . import _container
from ._agent_container import AgentContainerBackend
from ._container import CONTAINER_CONTROLS
from .base import LABEL_MANAGED, Availability, Capabilities, OneShot, Outcome, SandboxInfo
from .docker_api import START_HINT, SyncClient, quote, socket_path

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any, ClassVar


MIN_API = (1, 41)
STOP_TIMEOUT = 2
EXIT_GRACE = 5.0  # seconds to drain output after the exit status is known
DOCKER_FORWARDED = (_signal.SIGINT, _signal.SIGTERM)  # passed on to a one-shot container while it runs


def _normalize_state(s: str) -> str:
    s = (s or "").lower()
    if s in ("running", "paused", "restarting"):
        return "running"
    if s == "created":
        return "created"
    if s in ("exited", "dead", "removing"):
        return "stopped"
    return s or "missing"


def _check_warnings(resp: Any) -> list[str]:
    """Create-time warnings name controls the engine dropped; any of them fails the create."""
    warnings = (resp or {}).get("Warnings") or []
    return [str(w) for w in warnings if str(w).strip()]


def create_body(plan: _container.ContainerPlan, *, network: str, oneshot: bool,
                runtime: str | None = None, image_bytes: int = 0) -> dict[str, Any]:
    """The plan as the body of ``POST /containers/create``. ``image_bytes``: the image's size, which
    dockerd's btrfs size limit counts too (it caps the subvolume's referenced bytes)."""
    hc: dict[str, Any] = {
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": bool(plan.read_only),
        "Tmpfs": dict(plan.tmpfs),
        "Binds": [f"{src}:{dst}:{'ro' if ro else 'rw'}" for src, dst, ro in plan.binds],
        "NetworkMode": network,
    }
    entrypoint = list(plan.entrypoint) if plan.entrypoint is not None else None
    if plan.network == "netns" and plan.netns is None:
        # deferred: the runtime makes an empty namespace; egress.attach.complete moves the network in after
        # start, and the agent waits for that before anything of the user's runs
        if not entrypoint or entrypoint[0] != _container.AGENT_BIN_IN:
            raise PolicyNotEnforceable("docker network modes open/allowlist need the in-sandbox agent",
                                       hint="build it: make -C agent, or use --network none")
        entrypoint[2:2] = ["--wait-file", _container.NET_READY_IN]
    if plan.network == "netns":
        hc["Binds"].append(f"{plan.resolv}:/etc/resolv.conf:ro")
    if plan.seccomp_file:
        with open(plan.seccomp_file) as f:
            hc["SecurityOpt"].append("seccomp=" + f.read())
    if plan.memory_bytes is not None:
        hc["Memory"] = plan.memory_bytes
        hc["MemorySwap"] = plan.memory_bytes
    if plan.cpus is not None:
        hc["NanoCpus"] = round(plan.cpus * 1e9)
    if plan.pids is not None:
        hc["PidsLimit"] = plan.pids
    if plan.disk_cap_mb is not None:
        hc["StorageOpt"] = {"size": f"{plan.disk_cap_mb + (image_bytes >> 20) + 1}M"}
    if runtime:
        hc["Runtime"] = runtime
    if oneshot:
        hc["LogConfig"] = {"Type": "none", "Config": {}}  # output goes to the attached caller only
    interactive = bool(plan.interactive)
    body: dict[str, Any] = {
        "Image": plan.image,
        "Cmd": list(plan.cmd),
        "Env": [f"{k}={v}" for k, v in plan.env.items()],
        "WorkingDir": plan.workdir,
        "User": plan.user,
        "Hostname": plan.hostname,
        "Labels": dict(plan.labels),
        "Tty": False,
        # No network: the runtime gives the container a fresh network namespace (only lo, up) and
        # dockerd skips its network sandbox entirely (creating one for "none" costs ~100 ms here).
        "NetworkDisabled": network == "none",
        "AttachStdin": interactive,
        "AttachStdout": oneshot,
        "AttachStderr": oneshot,
        "OpenStdin": interactive,
        "StdinOnce": interactive,
        "HostConfig": hc,
    }
    if entrypoint is not None:
        body["Entrypoint"] = entrypoint
    return body


# Network modes open and allowlist: the container's own (empty) namespace gets the egress network moved in
# after start (agentkernel.egress), never a docker bridge. disk_rootfs: dockerd's btrfs driver caps each
# container's subvolume (StorageOpt size) where its data-root is on btrfs (check()).
DOCKER_CONTROLS = CONTAINER_CONTROLS | {"network_allowlist", "secret_injection", "disk_rootfs"}

_STORAGE_STATUS: dict[str, tuple[bool, str]] = {}


def storage_cap_status() -> tuple[bool, str]:
    """(can dockerd cap a writable root, why): its storage driver is btrfs (which sets quota-group limits
    for ``StorageOpt size``; overlay2 would need XFS project quotas, which this kernel lacks). Cached per
    process and socket."""
    path = socket_path()
    hit = _STORAGE_STATUS.get(path)
    if hit is not None:
        return hit
    try:
        with SyncClient(path, timeout=10) as c:
            info = c.json("GET", "/info")
    except AgentKernelError as exc:
        return False, f"dockerd does not answer: {exc.message}"
    driver, root = info.get("Driver"), info.get("DockerRootDir")
    if driver == "btrfs":
        from ..diskquota import quota_status

        ok, why = quota_status(str(root), enable=True)
        res = (True, f"dockerd's btrfs storage driver on {root}") if ok else (False, why)
    else:
        res = (False, f"dockerd's storage driver is {driver!r} on {root} (per-container caps need the btrfs driver "
                      "on a quota-capable volume: this kernel has no XFS/ext4 project quotas)")
    _STORAGE_STATUS[path] = res
    return res


def _image_bytes(info: Any) -> int:
    try:
        return int((info or {}).get("Size") or 0)
    except (TypeError, ValueError):
        return 0


class DockerBackend(AgentContainerBackend, OneShot):
    name = "docker"
    uses_egress = True
    egress_deferred = True
    capabilities = Capabilities(DOCKER_CONTROLS, {"exec", "files", "agent", "oneshot", "pool"},
                                isolation="container (shared kernel)")
    options_allowed: ClassVar[tuple[str, ...]] = ("volumes",)
    docker_runtime: ClassVar[str | None] = None  # an OCI runtime registered in dockerd (e.g. "runsc")

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self._api = None  # AsyncClient, created on first use (inside the event loop)

    # -- host checks --
    @classmethod
    def probe(cls) -> Availability:
        import shutil

        try:
            path = socket_path()
        except BackendUnavailable as exc:
            return Availability(False, exc.message, fix=exc.hint)
        if not os.path.exists(path):
            if not (shutil.which("dockerd") or os.path.exists("/usr/sbin/dockerd")):
                return Availability(False, "Docker Engine (dockerd) is not installed",
                                    fix="apt-get install -y docker.io containerd, then " + START_HINT)
            return Availability(False, f"the Docker socket {path} does not exist (dockerd is not running)",
                                fix=START_HINT)
        try:
            with SyncClient(path, timeout=10) as c:
                c.request("GET", "/_ping")
                ver = c.json("GET", "/version")
                runtimes = None
                if cls.docker_runtime:
                    runtimes = (c.json("GET", "/info").get("Runtimes") or {})
        except AgentKernelError as exc:
            return Availability(False, exc.message, fix=exc.hint or START_HINT)
        api = str(ver.get("ApiVersion", "0"))
        try:
            api_t = tuple(int(x) for x in api.split(".")[:2])
        except ValueError:
            api_t = (0, 0)
        if api_t < MIN_API:
            return Availability(False, f"dockerd {ver.get('Version')} serves API {api}; agentkernel needs "
                                f"{MIN_API[0]}.{MIN_API[1]} (Docker Engine 20.10 or newer)",
                                fix="apt-get install -y docker.io (Debian 12 ships 20.10)")
        if cls.docker_runtime and cls.docker_runtime not in (runtimes or {}):
            return Availability(False, f"dockerd has no runtime {cls.docker_runtime!r} registered",
                                fix="add it to 'runtimes' in /etc/agentkernel/dockerd.json "
                                "(bash scripts/setup.sh) and restart dockerd")
        return Availability(True, f"docker {ver.get('Version')} (API {api})",
                            details={"socket": path, "version": ver.get("Version"), "api_version": api,
                                     "runtime": cls.docker_runtime or "default"})

    def check(self, spec) -> None:
        super().check(spec)
        _container.check_rootfs_cap(self.name, spec, storage_cap_status)

    def runtime_for(self, plan: _container.ContainerPlan) -> str | None:
        """The OCI runtime registered in dockerd that runs ``plan`` (None: dockerd's default)."""
        return self.docker_runtime

    def _network_mode(self, plan: _container.ContainerPlan) -> str:
        if plan.network not in ("none", "netns"):  # every network mode goes through the egress namespace
            raise AssertionError(f"docker renders only network none or the egress namespace, got {plan.network!r}")
        return "none"

    # -- engine operations (asyncio) --
    def _docker(self):
        if self._api is None:
            from .docker_api import AsyncClient

            self._api = AsyncClient()
        return self._api

    async def _engine_create(self, plan: _container.ContainerPlan) -> str:
        api = self._docker()
        size = 0
        if plan.disk_cap_mb is not None:
            r = await api.request("GET", f"/images/{quote(plan.image)}/json", ok=(404,))
            size = _image_bytes(r.json() if r.status == 200 else None)
        body = create_body(plan, network=self._network_mode(plan), oneshot=False, runtime=self.runtime_for(plan),
                           image_bytes=size)
        resp = await api.json("POST", "/containers/create", params={"name": plan.name}, body=body)
        warnings = _check_warnings(resp)
        if warnings:
            await self._engine_remove(plan.name)
            raise PolicyNotEnforceable("dockerd dropped a control: " + "; ".join(warnings),
                                       hint="fix the engine's cgroup setup or relax the spec")
        return resp["Id"]

    async def _engine_start(self, name: str) -> None:
        await self._docker().request("POST", f"/containers/{quote(name)}/start", ok=(304,))
        sid = name.removeprefix("agentkernel-")
        from ..egress.attach import is_deferred

        if is_deferred(sid):
            import asyncio

            from ..egress.attach import complete

            info = await self._docker().json("GET", f"/containers/{quote(name)}/json")
            ready = os.path.join(_container.sandbox_run_dir(sid), "net-ready")
            await asyncio.to_thread(complete, sid, int(info["State"]["Pid"]), ready)

    async def _engine_stop(self, name: str) -> None:
        await self._docker().request("POST", f"/containers/{quote(name)}/stop", params={"t": STOP_TIMEOUT},
                                     ok=(304,), timeout=STOP_TIMEOUT + 60)

    async def _engine_remove(self, name: str) -> None:
        import asyncio

        api = self._docker()
        for _ in range(50):
            r = await api.request("DELETE", f"/containers/{quote(name)}", params={"force": True, "v": True},
                                  ok=(404, 409))
            if r.status != 409:  # 409: a removal is already in progress; wait until it is gone
                return
            await asyncio.sleep(0.1)
        raise SandboxError(f"docker could not remove container {name}: {r.json()}")

    async def _engine_state(self, name: str) -> tuple[str, dict[str, Any]]:
        r = await self._docker().request("GET", f"/containers/{quote(name)}/json", ok=(404,))
        if r.status == 404:
            return "missing", {}
        st = (r.json() or {}).get("State") or {}
        return _normalize_state(st.get("Status", "")), {"oom_killed": bool(st.get("OOMKilled")),
                                                       "exit_code": st.get("ExitCode")}

    async def list(self) -> list[SandboxInfo]:
        cs = await self._docker().json("GET", "/containers/json",
                                       params={"all": True, "filters": {"label": [f"{LABEL_MANAGED}=true"]}})
        return [_info(self.name, c) for c in cs or []]

    async def aclose(self) -> None:
        await super().aclose()
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    # -- synchronous helpers for the CLI (no asyncio) --
    def force_remove_sync(self, name: str) -> None:
        with SyncClient() as c:
            _remove_sync(c, name)

    # -- one-shot, synchronous (the CLI's daemon-less path) --
    def run_oneshot(self, spec, argv: list[str], stdio, timeout: float | None, *, sandbox_id: str,
                    owner: dict[str, Any]) -> Outcome:
        """The Engine API's create/attach/start/wait over its socket, synchronously, with ``stdio``."""
        run_dir, plan = _container.oneshot_plan(spec, argv, sandbox_id=sandbox_id, owner=owner,
                                                interactive=stdio.forward_stdin, pids_runtime=self.pids_runtime,
                                                egress=self.uses_egress, egress_deferred=self.egress_deferred,
                                                capped_workdir=self.capped_workdir, sized_tmp=self.sized_tmp)
        try:
            code = self.run_attached_sync(plan, timeout=timeout, stdio=stdio)
            if code is None:
                return Outcome(124, timed_out=True)
            status = _container.read_status(run_dir)
            return _container.status_outcome(status) if status else Outcome(code)
        finally:
            _container.oneshot_cleanup(spec, sandbox_id, run_dir)

    def run_attached_sync(self, plan: _container.ContainerPlan, *, timeout: float | None, stdio) -> int | None:
        """Run ``plan`` (a one-shot plan) to completion with the caller's stdio: container stdout to
        fd 1 and stderr to fd 2 as it arrives (byte-exact), fd 0 to its stdin when ``forward_stdin``
        and ``plan.interactive`` (EOF closes it). SIGINT/SIGTERM received meanwhile are forwarded to
        the container. Output goes to ``stdio.stdout``/``stdio.stderr``, input comes from ``stdio.stdin``.
        Returns its exit status (128+N when killed by signal N), or None when
        ``timeout`` seconds passed after start (it was killed). The container is removed before
        this returns, whatever happens."""
        cli = SyncClient()
        name = plan.name
        done = False  # True once a result is ready: a failing removal is then the error to report
        created = "no"  # no | maybe | yes
        stream = waiter = None
        sig = SignalForwarder(wakeup=True, signals=DOCKER_FORWARDED)
        forward_stdin = stdio.forward_stdin
        try:
            sig.install()
            size = 0
            if plan.disk_cap_mb is not None:
                r = cli.request("GET", f"/images/{quote(plan.image)}/json", ok=(404,))
                size = _image_bytes(r.json() if r.status == 200 else None)
            body = create_body(plan, network=self._network_mode(plan), oneshot=True,
                               runtime=self.runtime_for(plan), image_bytes=size)
            created = "maybe"
            try:
                resp = cli.json("POST", "/containers/create", params={"name": name}, body=body)
            except AgentKernelError as exc:
                if getattr(exc, "status", None):  # the engine answered: nothing was created
                    created = "no"
                raise
            created = "yes"
            warnings = _check_warnings(resp)
            if warnings:
                raise PolicyNotEnforceable("dockerd dropped a control: " + "; ".join(warnings),
                                           hint="fix the engine's cgroup setup or relax the spec")
            stdin_on = bool(plan.interactive)
            stream = cli.attach(name, stdin=stdin_on)
            if stdin_on and not forward_stdin:
                stream.close_stdin()
            waiter = cli.open_call("POST", f"/containers/{quote(name)}/wait",
                                   params={"condition": "next-exit"})
            try:
                cli.request("POST", f"/containers/{quote(name)}/start", ok=(304,))
            except SandboxError as exc:
                code = _start_failure_status(str(exc))
                if code is None:
                    raise
                write_all(stdio.stderr, f"agentkernel: {exc}\n".encode())
                done = True
                return code
            if plan.network == "netns" and plan.netns is None:  # deferred: the network moves in now
                from ..egress.attach import complete

                pid = int(cli.json("GET", f"/containers/{quote(name)}/json")["State"]["Pid"])
                run_dir = next(src for src, dst, _ro in plan.binds if dst == _container.AGENT_RUN_IN)
                complete(plan.labels.get("agentkernel.sandbox-id") or name.removeprefix("agentkernel-"), pid,
                         os.path.join(run_dir, "net-ready"))
            rc = _pump(cli, name, stream, waiter, sig, timeout, stdin_on and forward_stdin, stdio)
            done = True
            return rc
        finally:
            try:
                if stream is not None:
                    stream.close()
                if waiter is not None:
                    waiter.close()
                if created != "no":
                    try:
                        _remove_sync(cli, name)
                    except Exception:
                        if done:  # else keep the error already on its way out
                            raise
                cli.close()
            finally:
                sig.restore()


def _info(backend: str, c: dict[str, Any]) -> SandboxInfo:
    labels = c.get("Labels") or {}
    names = c.get("Names") or [""]
    name = names[0].lstrip("/")
    return SandboxInfo(backend, labels.get("agentkernel.sandbox-id", ""), labels.get("agentkernel.name"),
                       _normalize_state(c.get("State", "")),
                       {"container": name, "container_id": c.get("Id", "")}, labels)


def _remove_sync(cli: SyncClient, name: str) -> None:
    import time

    for _ in range(50):
        r = cli.request("DELETE", f"/containers/{quote(name)}", params={"force": True, "v": True},
                        ok=(404, 409))
        if r.status != 409:
            return
        time.sleep(0.1)
    raise SandboxError(f"docker could not remove container {name}: {r.json()}")


def _start_failure_status(msg: str) -> int | None:
    """Like ``docker run``: a command that cannot be executed is 127 (not found) or 126 (not runnable)."""
    low = msg.lower()
    if "executable file not found" in low or "no such file or directory" in low:
        return 127
    if "permission denied" in low:
        return 126
    return None


def _kill(cli: SyncClient, name: str, signame: str) -> None:
    # 404/409: the container is already gone or no longer running; nothing to signal.
    cli.request("POST", f"/containers/{quote(name)}/kill", params={"signal": signame}, ok=(404, 409))


def _pump(cli: SyncClient, name: str, stream, waiter, sig: SignalForwarder, timeout: float | None,
          forward_stdin: bool, stdio) -> int | None:
    import select
    import time

    out_open = {1: True, 2: True}
    out_fd = {1: stdio.stdout, 2: stdio.stderr}
    in_fd = stdio.stdin

    def emit(frames: list[tuple[int, bytes]]) -> None:
        for fd, data in frames:
            fd = 1 if fd == 1 else 2
            if out_open[fd] and data:
                try:
                    write_all(out_fd[fd], data)
                except BrokenPipeError:
                    out_open[fd] = False  # the reader went away: discard the rest of that stream

    emit(stream.take_pending())
    asock, wsock = stream.sock, waiter.sock
    asock.setblocking(False)
    wsock.setblocking(False)
    attach_open = True
    stdin_open = forward_stdin
    stdin_eof = False
    stdin_buf = b""
    deadline = time.monotonic() + timeout if timeout is not None else None
    timed_out = False
    hard_stop: float | None = None  # after exit (or kill): stop waiting for the rest of the output
    while True:
        if sig.pending:
            pend, sig.pending = sig.pending, []
            for s in pend:
                _kill(cli, name, "SIGINT" if s == _signal.SIGINT else "SIGTERM")
        now = time.monotonic()
        if waiter.done and (not attach_open or (hard_stop is not None and now >= hard_stop)):
            break
        if timed_out and hard_stop is not None and now >= hard_stop:
            break
        if deadline is not None and not timed_out and now >= deadline:
            timed_out = True
            _kill(cli, name, "SIGKILL")
            hard_stop = now + 30.0
            continue
        rl: list[Any] = []
        wl: list[Any] = []
        if sig.rfd >= 0:
            rl.append(sig.rfd)
        if attach_open:
            rl.append(asock)
        if not waiter.done:
            rl.append(wsock)
        if stdin_open and not stdin_eof and not stdin_buf and attach_open:
            rl.append(in_fd)
        if stdin_buf and attach_open:
            wl.append(asock)
        wait_s = None
        for t in (deadline if not timed_out else None, hard_stop):
            if t is not None:
                wait_s = max(0.0, t - now) if wait_s is None else min(wait_s, max(0.0, t - now))
        r, w, _ = select.select(rl, wl, [], wait_s)
        if sig.rfd in r:
            sig.drain()
        if asock in r:
            try:
                frames = stream.read_frames()
            except (BlockingIOError, InterruptedError):
                frames = []
            except OSError:
                frames = None
            if frames is None:
                attach_open = False
                stdin_buf = b""
            else:
                emit(frames)
        if wsock in r:
            try:
                finished = waiter.on_readable()
            except (BlockingIOError, InterruptedError):
                finished = False
            if finished:
                grace = time.monotonic() + EXIT_GRACE
                hard_stop = min(hard_stop, grace) if hard_stop else grace
        if in_fd in r:
            try:
                data = os.read(in_fd, 65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                stdin_eof = True
            elif data:
                stdin_buf = data
        if asock in w and stdin_buf:
            try:
                n = stream.send(stdin_buf)
                stdin_buf = stdin_buf[n:]
            except BlockingIOError:
                pass
            except OSError:  # the container's stdin is gone: stop forwarding
                stdin_buf = b""
                stdin_open = False
        if stdin_open and stdin_eof and not stdin_buf:
            stream.close_stdin()
            stdin_open = False
    if timed_out:
        return None
    if not waiter.done:
        raise SandboxError(f"container {name} exited but dockerd did not report its status")
    res = waiter.call.response().json() or {}
    err = (res.get("Error") or {}).get("Message")
    if err:
        raise SandboxError(f"docker wait {name}: {err}")
    return int(res.get("StatusCode", 0))
