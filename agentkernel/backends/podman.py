"""Podman backend: rootful podman through its CLI, hardened per the spec, the agent as PID 1.

One-shot runs (``agentkernel run`` without the daemon) are a single ``podman run --rm`` with the
caller's stdio passed straight through (byte-exact, streamed, no copies) and ``ak-agent exec`` as the
container's init, which reports the exact exit status and OOM kills through a status file.
"""

from __future__ import annotations

import os

from .. import _fastjson, paths
from ..enginestore import podman_storage
from ..errors import BackendUnavailable, SandboxError
from . import _container
from ._agent_container import AgentContainerBackend
from ._container import CONTAINER_CONTROLS
from .base import LABEL_MANAGED, Availability, Capabilities, OneShot, Outcome, SandboxInfo, SandboxRef

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any, ClassVar



# Network modes open and allowlist: the sandbox joins a namespace made by agentkernel.egress (one route,
# to the egress gateway; firewall inside the namespace), never podman's own bridge.
# disk_rootfs: the container's root is a btrfs subvolume capped by a prestart hook (diskquota.py) and its
# workdir a capped directory of ours, where podman's storage is on the quota-enabled volume (check()).
REMOVE_BATCH = 64  # containers per `podman rm` in remove_many
ENGINE_TIMEOUT_S = 120.0  # one podman call's own time (queueing for an engine slot is not counted)
CLEANUP_CALLS = ("stop", "rm")  # admitted on half the engine slots (_engineslots._order)

PODMAN_CONTROLS = CONTAINER_CONTROLS | {"network_allowlist", "secret_injection", "disk_rootfs"}


_STORAGE_STATUS: dict[tuple, tuple[bool, str]] = {}


def storage_cap_status() -> tuple[bool, str]:
    """(can podman cap a writable root, why): rootful, btrfs storage driver, graphroot and the sandboxes'
    capped directories on a btrfs volume with quota groups. Cached per process and configuration."""
    from .. import diskquota

    key = (os.environ.get("CONTAINERS_STORAGE_CONF"), diskquota.volume(), os.geteuid())
    hit = _STORAGE_STATUS.get(key)
    if hit is not None:
        return hit
    driver, graphroot = podman_storage()
    if os.geteuid() != 0:
        res = (False, "rootless podman cannot set btrfs quota limits (they need root)")
    elif driver != "btrfs":
        res = (False, f"podman's storage driver is {driver!r} on {graphroot} (per-container caps need the btrfs "
                      "driver on the quota-enabled storage volume: this kernel has no XFS/ext4 project quotas)")
    else:
        ok, why = diskquota.quota_status(graphroot)
        if ok:
            ok, why = diskquota.quota_status(diskquota.volume())
        res = (ok, why if not ok else f"btrfs quota groups on {graphroot}")
    _STORAGE_STATUS[key] = res
    return res


class PodmanBackend(AgentContainerBackend, OneShot):
    name = "podman"
    binary = "podman"
    uses_egress = True
    capped_workdir = True
    capabilities = Capabilities(PODMAN_CONTROLS, {"exec", "files", "agent", "oneshot", "tty", "pool"},
                                isolation="container (shared kernel)")
    options_allowed: ClassVar[tuple[str, ...]] = ("volumes",)

    # extra flags for every create/run (the gVisor subclass adds its runtime here)
    def runtime_args(self, plan: Any = None) -> list[str]:
        return []

    # -- host checks --
    @classmethod
    def probe(cls) -> Availability:
        import shutil

        exe = shutil.which(cls.binary)
        if not exe:
            return Availability(False, "podman is not installed",
                                fix="apt-get install -y podman crun (or bash scripts/setup.sh)")
        if os.path.isdir("/sys/fs/cgroup/unified") and not os.path.ismount("/sys/fs/cgroup/hugetlb"):
            return Availability(
                False, "crun refuses this hybrid cgroup layout until the hugetlb v1 controller is mounted",
                fix="mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb")
        import subprocess

        try:
            out = subprocess.run([exe, "version", "--format", "{{.Client.Version}}"], capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Availability(False, f"podman does not answer: {exc}")
        if out.returncode != 0:
            return Availability(False, f"podman fails: {out.stderr.strip()[:300]}")
        return Availability(True, f"podman {out.stdout.strip()}", details={"binary": exe})

    def check(self, spec) -> None:
        super().check(spec)
        _container.check_rootfs_cap(self.name, spec, storage_cap_status)

    # -- engine operations --
    async def _podman(self, *args: str, check: bool = True, timeout: float = ENGINE_TIMEOUT_S
                      ) -> tuple[int, str, str]:
        """One podman client call, admitted through the machine-wide engine slots (_engineslots): a busy
        engine makes calls queue, never fail. ``timeout`` bounds the engine's time, not the queue's."""
        import asyncio
        import subprocess

        from . import _engineslots

        slot = await _engineslots.acquire("podman", cleanup=args[0] in CLEANUP_CALLS)
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.binary, *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    preexec_fn=_lower_priority if self.background else None, cwd=_engine_cwd(),
                )
            except FileNotFoundError:
                raise BackendUnavailable("podman is not installed", hint="bash scripts/setup.sh") from None
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise SandboxError(f"podman {args[0]} did not finish within {timeout:.0f} s "
                                   f"(after {slot.waited_s:.1f} s queued for the engine)") from None
            except BaseException:  # cancelled (the caller's deadline, Ctrl-C): the client goes too
                if proc.returncode is None:  # SIGTERM: podman finishes or undoes its critical section
                    proc.terminate()
                    await asyncio.shield(_reap(proc))
                raise
        finally:
            slot.release()
        o, e = out.decode(errors="replace"), err.decode(errors="replace")
        if check and proc.returncode != 0:
            raise _engine_error(f"podman {args[0]}", e or o)
        return proc.returncode or 0, o, e

    async def _engine_create(self, plan: _container.ContainerPlan) -> str:
        args = ["create", *self.runtime_args(plan), *_container.podman_args(plan), plan.image, *plan.cmd]
        _, out, _ = await self._podman(*args)
        return out.strip()

    async def _engine_run_detached(self, plan: _container.ContainerPlan) -> str:
        # one podman process instead of two (create + start): a podman CLI start costs ~50 ms of CPU
        args = ["run", "-d", *self.runtime_args(plan), *_container.podman_args(plan), plan.image, *plan.cmd]
        _, out, _ = await self._podman(*args)
        return out.strip()

    async def _engine_start(self, name: str) -> None:
        # podman picks OCI hooks when it starts a container, from the hooks dirs of *that* podman process: a
        # container created with the disk-cap annotation gets its cap from the hook only if start names them
        import sys

        from .. import diskquota

        await self._podman("start", "--hooks-dir", diskquota.hooks_dir(paths.cache_dir(), sys.executable), name)

    async def _engine_stop(self, name: str) -> None:
        await self._podman("stop", "-t", "2", name)

    async def _engine_remove(self, name: str) -> None:
        _, out, _ = await self._podman("rm", "-f", "-v", "-t", "0", "--ignore", name)
        if out.strip():
            return
        # Nothing to remove - but a client whose creator died (SIGKILL, a caller's timeout) may still be
        # creating it: wait for that podman to finish, then remove what it made.
        import asyncio

        pids = _engine_calls_naming(self.binary, name)
        if not pids:
            return
        while pids := [p for p in pids if _running(p)]:
            await asyncio.sleep(0.05)
        await self._podman("rm", "-f", "-v", "-t", "0", "--ignore", name)

    async def remove_many(self, refs: list[SandboxRef]) -> list[BaseException | None]:
        """One ``podman rm -f`` per ``REMOVE_BATCH`` containers (a podman process costs ~50 ms of CPU: a
        pool of hundreds is gone in seconds, not minutes), then each one's run dir and network. A batch
        the engine refused is retried one container at a time (each error kept for its own ref)."""
        import asyncio

        errors: list[BaseException | None] = []
        for i in range(0, len(refs), REMOVE_BATCH):
            chunk = refs[i:i + REMOVE_BATCH]
            names = [r.handle.get("container") or _container.container_name(r.id) for r in chunk]
            try:
                await self._podman("rm", "-f", "-v", "-t", "0", "--ignore", *names, timeout=120 + 2 * len(names))
            except (SandboxError, OSError):
                errors += await asyncio.gather(*(self.remove(r) for r in chunk), return_exceptions=True)
                continue
            for r in chunk:
                try:
                    self._forget_removed(r)
                    errors.append(None)
                except Exception as exc:
                    errors.append(exc)
        return errors

    async def _engine_state(self, name: str) -> tuple[str, dict[str, Any]]:
        rc, out, _ = await self._podman("inspect", "--type", "container", "--format", "json", name, check=False)
        if rc != 0:
            return "missing", {}
        try:
            st = _fastjson.loads(out)[0]["State"]
        except (ValueError, LookupError, TypeError):
            return "missing", {}
        return _normalize_state(st.get("Status", "")), {"oom_killed": bool(st.get("OOMKilled")),
                                                       "exit_code": st.get("ExitCode")}

    async def list(self) -> list[SandboxInfo]:
        _, out, _ = await self._podman("ps", "-a", "--filter", f"label={LABEL_MANAGED}=true", "--format", "json")
        infos = []
        for c in _fastjson.loads(out or "[]"):
            labels = c.get("Labels") or {}
            names = c.get("Names") or [""]
            infos.append(SandboxInfo(self.name, labels.get("agentkernel.sandbox-id", ""),
                                     labels.get("agentkernel.name"), _normalize_state(c.get("State", "")),
                                     {"container": names[0], "container_id": c.get("Id", "")}, labels))
        return infos

    # -- one-shot, synchronous (the CLI's daemon-less path) --
    def oneshot_command(self, plan: _container.ContainerPlan) -> list[str]:
        return [self.binary, "run", "--rm", *self.runtime_args(plan), *_container.podman_args(plan), plan.image,
                *plan.cmd]

    def run_oneshot(self, spec, argv: list[str], stdio, timeout: float | None, *, sandbox_id: str,
                    owner: dict[str, Any]) -> Outcome:
        """One ``podman run --rm`` with the caller's fds (inherited: byte-exact, no copies)."""
        from .._proc import Proc, WaitTimeout, which

        interactive = stdio.forward_stdin
        run_dir, plan = _container.oneshot_plan(spec, argv, sandbox_id=sandbox_id, owner=owner,
                                                interactive=interactive, pids_runtime=self.pids_runtime,
                                                egress=self.uses_egress, egress_deferred=self.egress_deferred,
                                                capped_workdir=self.capped_workdir, sized_tmp=self.sized_tmp)
        try:
            cmd = self.oneshot_command(plan)
            exe = which(cmd[0])
            if exe is None:
                raise BackendUnavailable(f"{self.binary} is not installed", hint="bash scripts/setup.sh")
            # conmon writes a file named `oom` into the client's working directory on an OOM kill: not the caller's
            proc = Proc([exe, *cmd[1:]], stdin=stdio.stdin if interactive else -1, stdout=stdio.stdout,
                        stderr=stdio.stderr, cwd=run_dir or paths.runtime_dir())
            try:
                while True:
                    try:
                        rc = proc.wait(timeout)
                        break
                    except WaitTimeout:
                        self.force_remove_sync(plan.name)
                        proc.wait()
                        return Outcome(124, timed_out=True)
                    except KeyboardInterrupt:
                        # The engine client is in our process group: it got the SIGINT too and proxies it
                        # to the sandbox. Wait for the command to react; a second Ctrl-C kills the sandbox.
                        timeout = 5.0
            finally:
                if proc.poll() is None:
                    self.force_remove_sync(plan.name)
                    proc.kill()
                    proc.wait()
                proc.close()
            status = _container.read_status(run_dir)
            if status is not None:
                return _container.status_outcome(status)
            return Outcome(self._engine_failure(spec, plan.name, rc, run_dir is not None))
        finally:
            _container.oneshot_cleanup(spec, sandbox_id, run_dir)

    def _engine_failure(self, spec, name: str, rc: int, with_agent: bool) -> int:
        """No status file: the engine failed before/around the command (or there is no agent)."""
        if not with_agent:
            return rc  # the command ran without the agent: the engine's code is all we have
        self.force_remove_sync(name)
        if rc in (125, 126, 127):
            from ..imagesel import image_present, missing_image_error

            if not image_present(self.binary, spec.image):
                raise missing_image_error(self.binary, spec.image)
            raise SandboxError(f"{self.binary} could not run the sandbox (exit {rc}; its message is above)")
        return rc

    def force_remove_sync(self, name: str) -> None:
        import subprocess

        from . import _engineslots

        with _engineslots.acquire_sync("podman", cleanup=True):
            subprocess.run([self.binary, "rm", "-f", "-v", "-t", "0", "--ignore", name], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=ENGINE_TIMEOUT_S)


def _engine_cwd() -> str:
    """The podman client's working directory: conmon writes a file named `oom` there on an OOM kill."""
    d = os.path.join(paths.runtime_dir(), "engine")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _engine_calls_naming(binary: str, name: str) -> list[int]:
    """Live ``podman ... --name NAME ...`` clients (a create or run of container ``name``), any parent."""
    want = f"\0--name\0{name}\0".encode()
    exe = os.path.basename(binary).encode()
    from .._proc import cmdlines

    return [pid for pid, cmd in cmdlines()
            if want in cmd and os.path.basename(cmd.split(b"\0", 1)[0]) == exe and _running(pid)]


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


async def _reap(proc) -> None:
    import asyncio

    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _lower_priority() -> None:
    os.nice(10)


def _normalize_state(s: str) -> str:
    s = s.lower()
    if s in ("running", "paused"):
        return "running"
    if s in ("created", "configured", "initialized"):
        return "created"
    if s in ("exited", "stopped", "dead", "stopping"):
        return "stopped"
    return s or "missing"


def _engine_error(what: str, stderr: str) -> Exception:
    msg = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    low = msg.lower()
    if "image not known" in low or "no such image" in low:
        from ..errors import NotFound

        return NotFound(f"{what}: {msg}",
                        hint="build local images: agentkernel images build (or bash scripts/setup.sh)")
    if "already in use" in low:
        from ..errors import AlreadyExists

        return AlreadyExists(f"{what}: {msg}")
    return SandboxError(f"{what}: {msg}")
