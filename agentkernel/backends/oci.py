"""The ``oci`` backend: hardened containers straight through an OCI runtime, no engine daemon.

``crun`` by default; ``runc`` and ``runsc`` (gVisor, ptrace platform; networked sandboxes use host
sockets inside the egress namespace, see ``oci.runtime.RUNSC_NET_FLAGS``) with
``-o runtime=runc|runsc``. Each sandbox is an OCI bundle generated from the policy
(``agentkernel.oci.bundle``: the mapping table lives there and in docs/backends/oci.md) over an image
root unpacked once into a content-addressed cache (``agentkernel.oci.rootfs``), with its own writable
layer: an overlay (image lower, sandbox upper) mounted in a private mount namespace that only the
container sees, or, for a read-only root, the cached root itself plus sized tmpfs.

Two paths:
- one-shot (``run_oneshot``, the CLI without the daemon): a single ``crun run`` with the caller's
  stdio passed straight through, ``ak-agent exec`` as the container's init when the agent is built;
  exit status from the runtime, OOM from an eventfd on the sandbox's memory cgroup, timeout by killing
  every process in the sandbox's cgroups (exit 124). Synchronous, no asyncio.
- named / pooled sandboxes (create/start/exec/stop/rm): ``<runtime> run --detach`` with the agent as PID
  1 serving on a unix socket in a bind-mounted run dir; exec and files go through the agent (the same
  machinery as podman/docker, ``_agent_container``). Stop deletes the runtime container but keeps the
  bundle and writable layer, so a later start continues with the same files.

Everything of a sandbox is found again from its id alone (bundle dir, runtime state, cgroups), so
``remove`` and the ownership reaper clean up after a CLI that was SIGKILLed mid-run, or a runtime that
crashed mid-start. See ``agentkernel.oci.runtime.destroy``.
"""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, ConfigError, SandboxError
from ..oci import runtime as rt
from . import _container
from ._agent_container import AgentContainerBackend
from .base import Availability, Backend, Capabilities, OneShot, Outcome, SandboxInfo, SandboxRef

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any, ClassVar


OCI_CONTROLS = {
    "network_none",
    # network modes open/allowlist with crun/runc: the bundle joins the namespace agentkernel.egress made
    # (one route, to the egress gateway; firewall inside it). runsc: --network=host inside that namespace.
    "network_full",
    "network_allowlist",
    "secret_injection",
    "disk_rootfs",  # the writable layer on a tmpfs of disk_mb (see _prepare_bundle)
    "read_only_root",
    "memory",
    "cpu",
    "pids",
    "disk_tmpfs",
    "seccomp_default",
    "seccomp_restrictive",
    "cap_drop_all",
    "no_new_privileges",
    "non_root",
    "mount_cwd",
    "env",
}
EXIT_TIMEOUT = 124


class OCIBackend(AgentContainerBackend, OneShot):
    name = "oci"
    capabilities = Capabilities(
        OCI_CONTROLS,
        {"exec", "files", "agent", "oneshot", "pool"},
        isolation="container (shared kernel), no engine daemon",
    )
    options_allowed: ClassVar[tuple[str, ...]] = ("runtime",)

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.runtime = self.options.get("runtime", rt.DEFAULT_RUNTIME)
        if self.runtime not in rt.RUNTIMES:
            raise ConfigError(
                f"oci option runtime must be one of {', '.join(rt.RUNTIMES)}; got {self.runtime!r}"
            )

    # -- host checks --
    @classmethod
    def probe(cls) -> Availability:
        found = {name: rt.binary(name) for name in rt.RUNTIMES}
        details: dict[str, Any] = {"runtimes": {k: v for k, v in found.items() if v}}
        if not found["crun"] and not found["runc"]:
            return Availability(
                False,
                "no OCI runtime (crun or runc) is installed",
                fix="apt-get install -y crun runc (or bash scripts/setup.sh)",
                details=details,
            )
        problems = host_problems("crun" if found["crun"] else "runc")
        if problems:
            reason, fix = problems[0]
            return Availability(False, reason, fix=fix, details=details)
        from .. import paths

        if paths.agent_binary() is None:
            details["agent"] = "missing: one-shot runs work, named sandboxes need it (make -C agent)"
        names = ", ".join(k for k, v in found.items() if v)
        return Availability(
            True, f"OCI runtimes: {names} (default {'crun' if found['crun'] else 'runc'})", details=details
        )

    def check(self, spec) -> None:
        super().check(spec)
        if self.runtime == "crun" and rt.binary("crun") is None and rt.binary("runc") is not None:
            raise BackendUnavailable(
                "crun is not installed", hint="apt-get install -y crun, or -o runtime=runc"
            )

    # -- bundles --
    def _prepare_bundle(self, spec, p, sandbox_id: str, *, named: bool
                        ) -> tuple[str, tuple | None, rt.PrivateLayer | None]:
        """Write the bundle for plan ``p``; returns (bundle dir, overlay spec or None, the writable layer
        when ``rt.launch`` mounts it in the runtime's private namespace, else None). A named sandbox's
        capped layer is a tmpfs on the host (it outlives a stop, for the next start); a one-shot's lives
        only in the runtime's private namespace when the agent can mount it there (``spawn-runtime``)."""
        from ..oci import bundle, rootfs, seccomp_oci

        exe = rt.require_binary(self.runtime)
        rf = rootfs.resolve(spec.image)
        bdir = rt.bundle_dir(sandbox_id)
        os.makedirs(bdir, mode=0o700)
        overlay = private = None
        mh = rt.memory_hierarchy()  # v1: the limit sits on the parent cgroup, the container's is above it
        slack = bundle.MEMORY_SLACK if mh and mh[1] == 1 else 0
        layer_cap = None
        # gVisor keeps /tmp in its own (unsized) memory tmpfs unless the spec mounts one: size it
        if (self.runtime == "runsc" and not p.read_only and spec.resources.disk_mb is not None
                and not any(dst == "/tmp" for dst, _ in p.tmpfs or ())):
            p.tmpfs = [*(p.tmpfs or ()), ("/tmp", f"rw,nosuid,nodev,size={spec.resources.disk_mb}m,mode=1777")]
        if bundle.needs_overlay(p, rf.path):
            if not p.read_only and spec.resources.disk_mb is not None:
                # the writable layer lives on a tmpfs of disk_mb (its pages also count against the
                # sandbox's memory cgroup): a full layer is ENOSPC for the sandbox, never the host's disk
                layer_cap = spec.resources.disk_mb
                layer = os.path.join(bdir, "layer")
                os.mkdir(layer, 0o700)
                if not named and rt.spawn_helper() is not None:
                    private = rt.PrivateLayer(layer, f"size={layer_cap}m,mode=0755")
                else:
                    rt.mount_tmpfs(layer, f"size={layer_cap}m,mode=0755")
                upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
            else:
                upper, work = os.path.join(bdir, "upper"), os.path.join(bdir, "work")
            mnt = os.path.join(bdir, "rootfs")
            os.mkdir(mnt, 0o755)
            wd = _workdir_to_make(upper, rf.path, p)
            if private is not None:
                private.mkdirs += [(upper, 0o755, 0, 0), (work, 0o755, 0, 0)] + ([wd] if wd else [])
            else:
                os.mkdir(upper, 0o755)
                os.mkdir(work, 0o755)
                if wd:
                    path, mode, uid, gid = wd
                    os.makedirs(path, mode=mode, exist_ok=True)
                    os.chown(path, uid, gid)
            overlay = (rf.path, upper, work, mnt)
            root_path = mnt
        else:
            root_path = rf.path
        seccomp_name = spec.policy.seccomp
        b64 = seccomp_oci.crun_bpf_b64(seccomp_name, exe) if self.runtime == "crun" else None
        sec = None if b64 else seccomp_oci.oci_seccomp(seccomp_name)
        cfg = bundle.render(
            p,
            rf,
            sandbox_id=sandbox_id,
            runtime=self.runtime,
            root_path=root_path,
            seccomp=sec,
            seccomp_bpf_b64=b64,
            annotations=p.labels,
            memory_slack=slack,
        )
        rt.write_json(
            os.path.join(bdir, "meta.json"),
            {
                "runtime": self.runtime,
                "image": spec.image,
                "image_id": rf.id,
                "overlay": list(overlay or ()),
                "memory_bytes": p.memory_bytes,
                "layer_cap_mb": layer_cap,
                "named": named,
                "labels": p.labels,
                "network": p.network == "netns",
            },
        )
        if p.network == "netns":  # the resolver is the egress gateway
            resolv = os.path.join(bdir, "resolv.conf")
            with open(resolv, "w") as f:
                f.write(f"nameserver {p.dns}\n")
            os.chmod(resolv, 0o644)
            cfg["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
                                  "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
        rt.write_json(os.path.join(bdir, "config.json"), cfg)
        return bdir, overlay, private

    # -- one-shot, synchronous (the CLI's daemon-less path) --
    def run_oneshot(self, spec, argv: list[str], stdio, timeout: float | None, *, sandbox_id: str,
                    owner: dict[str, Any]) -> Outcome:
        """Run ``argv`` in a fresh sandbox with ``stdio``, then remove everything (the caller claimed
        ``sandbox_id`` under ``planned_handle``). Timeout: every process of the sandbox killed."""
        from .. import paths

        exe = rt.require_binary(self.runtime)
        watch = None
        proc = None
        pumps = None
        private = None
        clean = False
        warm = self._cgroup_warmer(sandbox_id)
        try:
            net = _container.attach_network(spec, sandbox_id)
            p = _plan(spec, sandbox_id, owner, paths.agent_binary(), None, argv, net)
            bdir, overlay, private = self._prepare_bundle(spec, p, sandbox_id, named=False)
            watch = rt.MemoryWatch(sandbox_id, p.memory_bytes, watch=True)
            # The command gets our fds 0/1/2 as they are only when they are pipes or /dev/null; regular
            # files, terminals, sockets and devices go through pipes we pump (see _Pumps).
            pumps = _Pumps(gvisor=self.runtime == "runsc")
            stdin = pumps.stdin(stdio.stdin) if stdio.forward_stdin else -1  # -1: /dev/null
            stdout, stderr = pumps.out(stdio.stdout, 1), pumps.out(stdio.stderr, 2)
            cmd = [
                *rt.base_cmd(self.runtime, exe, network=p.network == "netns"),
                *rt.run_log_flags(self.runtime, sandbox_id),
                "run",
                "--pid-file",
                os.path.join(bdir, "init.pid"),
                "--bundle",
                bdir,
                sandbox_id,
            ]
            # with the agent's spawn-runtime: posix_spawn (it closes the inherited fds), else fork + Preexec
            spawn = rt.spawn_helper() is not None
            argv, pre = rt.launch(cmd, overlay, pdeathsig=True, layer=private, close_fds=spawn)
            try:
                proc = rt.Proc(argv, stdin=stdin, stdout=stdout, stderr=stderr, preexec=pre, spawn=spawn)
            except OSError as exc:
                raise SandboxError(f"{self.runtime} could not be started: {exc}") from None
            pumps.start()
            rc, timed_out = self._wait(proc, sandbox_id, timeout)
            pumps.join()
            if timed_out:
                return Outcome(EXIT_TIMEOUT, timed_out=True)
            started = os.path.exists(os.path.join(bdir, "init.pid"))
            if not started and rc != 0:
                raise SandboxError(f"{self.runtime} could not start the sandbox (exit {rc}; its message is above)")
            clean = True
            return Outcome(rc, signal=rc - 128 if 128 < rc < 160 else None, oom=watch.oom_killed())
        finally:
            warm.stop()
            if proc is not None and proc.poll() is None:
                rt.kill_cgroups(sandbox_id)
                proc.kill()
                proc.wait()
            if proc is not None:
                proc.close()
            if pumps is not None:
                pumps.close()
            if watch is not None:
                watch.close()
            self._cleanup_oneshot(sandbox_id, clean, private is not None)
            if spec.policy.network:
                _container.release_network(sandbox_id)

    def _cgroup_warmer(self, sandbox_id: str):
        """The cgroup v1 grace-period pre-payer (``oci.cgroupwarm``), running until the runtime's pid file
        exists (gVisor's runsc joins cgroups too; every kernel runtime here does)."""
        from ..oci import cgroupwarm

        return cgroupwarm.start(until=os.path.join(rt.bundle_dir(sandbox_id), "init.pid"))

    def _wait(self, proc: rt.Proc, sandbox_id: str, timeout: float | None) -> tuple[int, bool]:
        """(exit status, timed out). SIGTERM/SIGHUP are passed to the runtime (and on to the command)."""
        import _signal as signal  # `signal` imports enum: start-up time
        import time

        from ..termio import SignalForwarder

        deadline = None if timeout is None else time.monotonic() + timeout

        def forward(signum: int) -> None:
            try:
                proc.send_signal(signum)  # the runtime passes it on to the container's init
            except ProcessLookupError:
                pass

        fwd = SignalForwarder(forward, signals=(signal.SIGTERM, signal.SIGHUP)).install()
        forwarded = fwd.pending
        interrupted = False
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    return proc.wait(left), False
                except rt.WaitTimeout:
                    rt.kill_cgroups(sandbox_id)
                    proc.wait()
                    if interrupted or forwarded:
                        return 128 + (forwarded[0] if forwarded else signal.SIGINT), False
                    return EXIT_TIMEOUT, True
                except KeyboardInterrupt:
                    # The runtime is in our process group: it got the SIGINT too and passes it to the
                    # command. Give it 5 s to react; a second Ctrl-C kills the sandbox.
                    if interrupted:
                        rt.kill_cgroups(sandbox_id)
                        proc.wait()
                        return 130, False
                    interrupted = True
                    deadline = time.monotonic() + 5.0
                if forwarded and deadline is None:
                    deadline = time.monotonic() + 5.0
        finally:
            fwd.restore()

    def _cleanup_oneshot(self, sandbox_id: str, clean: bool, private_layer: bool) -> None:
        """After a normal exit the runtime already deleted the container and its cgroup: only our own
        parts remain (parent cgroups, bundle). Anything unusual: the full clean-up."""
        if clean and not rt.state_entries(self.runtime, sandbox_id):
            rt.remove_parent_cgroups(sandbox_id)
            bdir = rt.bundle_dir(sandbox_id)
            if not private_layer and os.path.isdir(os.path.join(bdir, "layer")):
                rt.umount_all(bdir)  # the capped writable layer's tmpfs (a private one went with the runtime)
            rt.rmtree(bdir)
            return
        rt.destroy(sandbox_id, self.runtime)

    # -- named sandboxes (agent as PID 1) --
    async def create(self, spec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        import asyncio

        from .. import paths

        agent = paths.agent_binary()
        if agent is None:
            raise BackendUnavailable(
                "the in-sandbox agent binary is missing (named oci sandboxes run it as PID 1)",
                hint="build it: make -C agent (bash scripts/setup.sh does)",
            )
        rt.require_binary(self.runtime)
        run_dir = _container.prepare_run_dir(sandbox_id, _container.resolve_user(spec))
        try:  # one trip to a worker thread: the network, the plan and the bundle (mkdirs, a mount, writes)
            bdir = await asyncio.to_thread(self._create_sync, spec, sandbox_id, owner, agent, run_dir)
        except BaseException:
            await asyncio.to_thread(rt.destroy, sandbox_id, self.runtime)
            await asyncio.to_thread(_container.release_network, sandbox_id)
            raise
        return SandboxRef(
            self.name,
            sandbox_id,
            {"container": sandbox_id, "runtime": self.runtime, "run_dir": run_dir, "bundle": bdir},
            spec,
        )

    def _create_sync(self, spec, sandbox_id: str, owner: dict[str, Any], agent: str, run_dir: str) -> str:
        net = _container.attach_network(spec, sandbox_id)
        p = _plan(spec, sandbox_id, owner, agent, run_dir, None, net)
        return self._prepare_bundle(spec, p, sandbox_id, named=True)[0]

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        return {"container": sandbox_id, "runtime": self.runtime}

    # create and start are two steps here (the base's create_started, not the one-call engine variant)
    create_started = Backend.create_started

    def _runtime_of(self, sandbox_id: str) -> str:
        return rt.read_meta(sandbox_id).get("runtime") or self.runtime

    async def _engine_start(self, name: str) -> None:
        sid = name
        meta = rt.read_meta(sid)
        if not meta:
            from ..errors import NotFound

            raise NotFound(f"sandbox {sid} has no bundle any more (it was removed)")
        runtime = meta.get("runtime") or self.runtime
        exe = rt.require_binary(runtime)
        warm = self._cgroup_warmer(sid)  # the grace period passes while the runtime's state is checked
        try:
            await self._run_detached(sid, meta, runtime, exe)
        finally:
            warm.stop(wait=False)  # never block the event loop on the thread's last write

    async def _run_detached(self, sid: str, meta: dict[str, Any], runtime: str, exe: str) -> None:
        import asyncio

        log_path = os.path.join(rt.bundle_dir(sid), "console.log")
        # all of it off the event loop, in one trip to a worker thread: the runtime's state, the memory cgroup's
        # mkdir (~6 ms on cgroup v1), the runtime's spawn and exit (~10-30 ms) and the meta write stalled every
        # other client of a daemon
        rc = await asyncio.to_thread(self._start_sync, sid, meta, runtime, exe, log_path)
        if rc:
            msg = _tail(log_path)
            await asyncio.to_thread(self._stop_sync, sid, runtime, 0)
            raise SandboxError(f"{runtime} could not start sandbox {sid} (exit {rc}): {msg}")

    def _start_sync(self, sid: str, meta: dict[str, Any], runtime: str, exe: str, log_path: str) -> int | None:
        """Start the container unless the runtime has it already (None); else the runtime's exit status
        (``meta.json`` then says it was started)."""
        st = rt.state(runtime, sid)
        if st is not None:
            if st.get("status") in ("running", "created", "paused"):
                return None
            rt.delete_container(runtime, sid)
        rt.remove_cgroups(sid)
        rc = self._spawn_detached(sid, meta, runtime, exe, log_path)
        if rc == 0:
            meta["started"] = True
            rt.write_json(os.path.join(rt.bundle_dir(sid), "meta.json"), meta)
        return rc

    def _spawn_detached(self, sid: str, meta: dict[str, Any], runtime: str, exe: str, log_path: str) -> int:
        """``<runtime> run --detach`` of the bundle (its parent memory cgroup made first); its exit status."""
        bdir = rt.bundle_dir(sid)
        watch = rt.MemoryWatch(sid, meta.get("memory_bytes"), watch=False)
        watch.close()
        overlay = tuple(meta["overlay"]) if meta.get("overlay") else None
        # with the agent's spawn-runtime: posix_spawn (a vfork: nothing of this process is copied; the
        # helper closes the inherited fds), else fork + Preexec
        spawn = rt.spawn_helper() is not None
        argv, pre = rt.launch(
            [*rt.base_cmd(runtime, exe, network=bool(meta.get("network"))), *rt.run_log_flags(runtime, sid),
             "run", "--detach", "--pid-file",
             os.path.join(bdir, "init.pid"), "--bundle", bdir, sid],
            overlay, pdeathsig=False, close_fds=spawn,
        )
        with open(log_path, "ab") as log:
            # --detach: the container's stdio must not be a pipe of ours (its init would hold it open)
            proc = rt.Proc(argv, stdin=-1, stdout=log.fileno(), stderr=log.fileno(), preexec=pre, spawn=spawn)
        try:
            return proc.wait(120)  # a pidfd wakes it the moment the runtime exits
        except rt.WaitTimeout:
            proc.kill()
            proc.wait()
            return -1
        finally:
            proc.close()

    def _stop_sync(self, sid: str, runtime: str, grace: float) -> None:
        import time

        st = rt.state(runtime, sid)
        if st is not None and st.get("status") in ("running", "paused", "created") and grace > 0:
            rt.run_cmd(runtime, "kill", sid, "TERM", timeout=30)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                st = rt.state(runtime, sid)
                if st is None or st.get("status") == "stopped":
                    break
                time.sleep(0.05)
        rt.delete_container(runtime, sid)
        try:
            os.unlink(os.path.join(rt.bundle_dir(sid), "init.pid"))
        except OSError:
            pass

    async def _engine_stop(self, name: str) -> None:
        import asyncio

        await asyncio.to_thread(self._stop_sync, name, self._runtime_of(name), 2.0)

    async def _engine_remove(self, name: str) -> None:
        import asyncio

        await asyncio.to_thread(rt.destroy, name, rt.read_meta(name).get("runtime"))

    def _state_sync(self, sid: str) -> tuple[str, dict[str, Any]]:
        meta = rt.read_meta(sid)
        if not meta:
            return "missing", {}
        st = rt.state(meta.get("runtime") or self.runtime, sid)
        details = {"oom_killed": rt.container_oom_kills(sid) > 0}
        if st is None:
            return ("stopped", _stopped_details(sid, details)) if meta.get("started") else ("created", details)
        status = st.get("status", "")
        if status in ("running", "paused"):
            return "running", details
        if status == "created":
            return "created", details
        return "stopped", _stopped_details(sid, details)

    async def _engine_state(self, name: str) -> tuple[str, dict[str, Any]]:
        import asyncio

        return await asyncio.to_thread(self._state_sync, name)

    async def stop(self, ref: SandboxRef) -> None:
        await self._engine_stop(ref.id)

    async def remove(self, ref: SandboxRef) -> None:
        import asyncio

        # one trip to a worker thread for both (a pool member's teardown: one per one-shot run)
        await asyncio.to_thread(self._remove_sync, ref.id, ref.handle.get("runtime"))

    @staticmethod
    def _remove_sync(sid: str, runtime: str | None) -> None:
        rt.destroy(sid, runtime or rt.read_meta(sid).get("runtime"))
        _container.release_network(sid)

    async def status(self, ref: SandboxRef) -> str:
        state, _ = await self._engine_state(ref.id)
        return state

    async def list(self) -> list[SandboxInfo]:
        import asyncio

        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> list[SandboxInfo]:
        from .base import LABEL_ID, LABEL_MANAGED, LABEL_NAME

        try:
            ids = sorted(os.listdir(rt.bundles_dir()))
        except OSError:
            return []
        live: dict[str, dict[str, str]] = {}
        infos = []
        for sid in ids:
            meta = rt.read_meta(sid)
            runtime = meta.get("runtime") or self.runtime
            if runtime not in live:
                live[runtime] = {c.get("id", ""): c.get("status", "") for c in rt.list_containers(runtime)}
            status = live[runtime].get(sid)
            if status in ("running", "paused"):
                status = "running"
            elif status is None:
                status = "stopped" if meta.get("started") else "created"
            labels = dict(meta.get("labels") or {LABEL_MANAGED: "true", LABEL_ID: sid})
            infos.append(
                SandboxInfo(
                    self.name,
                    labels.get(LABEL_ID, sid),
                    labels.get(LABEL_NAME),
                    status,
                    {"container": sid, "runtime": runtime, "bundle": rt.bundle_dir(sid)},
                    labels,
                )
            )
        return infos


def _plan(spec, sandbox_id: str, owner: dict[str, Any], agent: str | None, run_dir: str | None,
          argv: list[str] | None = None, net: Any = None) -> _container.ContainerPlan:
    """The container plan of an oci sandbox (its runtime container is named by the sandbox id)."""
    return _container.plan(spec, sandbox_id=sandbox_id, owner=owner, container_name=sandbox_id, argv=argv,
                           agent_bin=agent, run_dir=run_dir, cwd=os.getcwd(), net=net)


def _workdir_to_make(upper: str, lower: str, p) -> tuple[str, int, int, int] | None:
    """The working directory must exist; an image without it gets it in the sandbox's own layer, owned
    by the sandbox user (like the engines' WORKDIR), unless a tmpfs or bind is mounted there: (path in
    ``upper``, mode, uid, gid) of the directory to make, or None."""
    from ..oci.bundle import root_has

    wd = p.workdir
    if wd == "/" or root_has(lower, wd, True):
        return None
    if any(dst == wd for dst, _ in (p.tmpfs or ())) or any(dst == wd for _, dst, _ in (p.binds or ())):
        return None
    uid, _, gid = p.user.partition(":")
    return os.path.join(upper, wd.strip("/")), 0o755, int(uid), int(gid or uid)


def _stopped_details(sid: str, details: dict[str, Any]) -> dict[str, Any]:
    """``details`` plus why the container stopped: runsc's own account of it, else the last line the container
    printed (the agent's own messages)."""
    reason = rt.exit_reason(sid)
    if reason:
        details["reason"] = f"runsc: {reason}"
        return details
    last = _tail(os.path.join(rt.bundle_dir(sid), "console.log"))
    if last != "no output":
        details["log"] = last
    return details


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "no output"
    return text.splitlines()[-1] if text else "no output"


def host_problems(runtime: str) -> list[tuple[str, str]]:
    """Host preparation the runtime needs, as (problem, fix)."""
    out = []
    if (
        runtime == "crun"
        and os.path.isdir("/sys/fs/cgroup/unified")
        and not os.path.ismount("/sys/fs/cgroup/hugetlb")
    ):
        out.append(
            (
                "crun refuses this hybrid cgroup layout until the hugetlb v1 controller is mounted",
                "mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb "
                "(bash scripts/setup.sh does it)",
            )
        )
    try:
        with open("/proc/filesystems") as f:
            fs = f.read()
        if "overlay" not in fs:
            out.append(
                (
                    "the kernel has no overlayfs (each sandbox's writable layer is an overlay)",
                    "modprobe overlay",
                )
            )
    except OSError:
        pass
    if os.geteuid() != 0:
        out.append(
            (
                "the oci backend needs root here (cgroups, mount namespaces, runtime state)",
                "run as root, or use --backend podman",
            )
        )
    return out


class _Pumps:
    """Pipes between the runtime and our stdio. The runtime chowns the container's fds 0-2 to the sandbox
    user, and the sandbox can reopen them through /proc/1/fd/N: so only a pipe (FIFO) or /dev/null of the
    caller is handed over as is. A regular file (it would be chowned, reopened, read and truncated), a
    terminal (TIOCSTI could type into the user's shell), a socket or any other device goes through a pipe
    of ours that a thread pumps."""

    def __init__(self, gvisor: bool) -> None:
        self.gvisor = gvisor
        self.jobs: list[tuple[int, int, int]] = []  # (read end, write end, the end the child gets)
        self.threads: list = []
        self.started = False
        self.stdin_src = -1

    @staticmethod
    def _needs_pipe(fd: int) -> bool:
        import stat

        try:
            st = os.fstat(fd)
        except OSError:
            return False  # closed: nothing to hand over
        if stat.S_ISFIFO(st.st_mode):
            return False
        return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL)

    def out(self, target: int, std: int) -> int | None:
        """The fd the child gets as its fd ``std`` for output to ``target``: None (inherit ours) when
        ``target`` is our own fd ``std`` and can be handed over as is."""
        if not self._needs_pipe(target):
            return None if target == std else target  # handed over as is
        r, w = os.pipe()
        self.jobs.append((r, target, w))
        return w

    def stdin(self, fd: int = 0) -> int | None:
        if not self._needs_pipe(fd):
            return None if fd == 0 else fd
        r, w = os.pipe()
        self.jobs.append((fd, w, r))
        self.stdin_src = fd
        return r

    def start(self) -> None:
        self.started = True
        if not self.jobs:
            return  # everything inherited as is: no threads (and no threading import)
        import threading

        for src, dst, child_end in self.jobs:
            os.close(child_end)
            t = threading.Thread(target=_copy_fd, args=(src, dst, dst != 1 and dst != 2), daemon=True)
            t.start()
            if src != self.stdin_src:  # the stdin pump may block on the terminal: never waited for
                self.threads.append(t)

    def join(self) -> None:
        for t in self.threads:
            t.join(5)

    def close(self) -> None:
        for src, dst, child_end in self.jobs:
            # started: the child's ends are closed and the stdin pump owns (and closes) its write end
            fds = [src] if src > 2 else []
            if not self.started:
                fds += [child_end] + ([dst] if dst > 2 else [])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.jobs.clear()


_DEV_NULL = os.makedev(1, 3)


def _copy_fd(src: int, dst: int, close_dst: bool) -> None:
    try:
        while True:
            try:
                data = os.read(src, 1 << 16)
            except OSError:
                return
            if not data:
                return
            while data:
                try:
                    n = os.write(dst, data)
                except OSError:
                    return
                data = data[n:]
    finally:
        if close_dst:  # the stdin pipe: EOF for the command
            try:
                os.close(dst)
            except OSError:
                pass
