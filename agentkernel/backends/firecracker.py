"""The ``firecracker`` backend: every sandbox is a Firecracker microVM, driven through its API socket.

- Needs hardware KVM. ``create`` asks the KVM probe first (``agentkernel.vm.kvmprobe``, cached per boot)
  and refuses at once with its reason: on a PVM host (a VM without nested virtualization) a guest could
  never boot, so nothing is started and nothing hangs.
- Binary: option ``binary=PATH``, ``$AGENTKERNEL_FIRECRACKER_BIN``, ``firecracker`` on PATH, or
  ``/usr/local/lib/agentkernel/firecracker/firecracker`` (``AGENTKERNEL_SETUP_FIRECRACKER=1 bash
  scripts/setup.sh`` puts the v1.12.1 binary and jailer there). Option ``jailer=on`` starts it through
  the jailer (chroot, own uid/gid, cgroups).
- Configuration through the API (HTTP on a unix socket): ``PUT /machine-config`` (vCPUs, memory),
  ``/boot-source`` (ELF vmlinux + the agent initramfs + boot args like the reference's), ``/drives/rootfs``
  (the sandbox's own sparse copy of the image's ext4), ``/vsock`` (guest CID 3), ``/actions`` InstanceStart.
- Agent: ``ak-agent vm-init --vsock 52000`` in the guest; the host connects to the vsock UDS and sends
  ``CONNECT 52000\\n`` (Firecracker answers ``OK <port>``), then speaks the agent protocol.
- Snapshots: ``VMM.snapshot_create`` (``PATCH /vm`` Paused + ``PUT /snapshot/create``) and
  ``VMM.snapshot_load`` (``PUT /snapshot/load`` with ``resume_vm``) speak the API; paths are relative
  (the VMM's cwd is the run dir), so a snapshot loaded in another run dir uses that sandbox's own disk
  and vsock socket. The API's snapshot routes use them (``take_memory_snapshot``: paused for the save and
  a copy of the disk, then resumed; option ``restore=<id>``: a new VMM loads the state over the sandbox's
  own copy of the snapshot's disk, with the snapshot's memory file hard-linked into its run dir, then the
  agent re-seeds the guest). Both ask the KVM probe first and refuse at once with its reason. There are no
  snapshot-restored warm pools (the qemu backend's are the working path on TCG hosts).

Kernel: Firecracker boots an uncompressed ELF with virtio-mmio devices described on the command line
(CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). Debian's cloud kernel lacks that option, so a Firecracker-ready
vmlinux is given with option ``kernel=PATH``; without it the Debian kernel's extracted vmlinux is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time

from ..agent.transport import Transport
from ..errors import BackendUnavailable, ConfigError, NotFound, PolicyNotEnforceable, SandboxError
from .base import (
    LABEL_NAME,
    Availability,
    Backend,
    Capabilities,
    ExecRequest,
    ExecResult,
    SandboxInfo,
    SandboxRef,
    check_policy,
    owner_labels,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Any, ClassVar

AGENT_VSOCK_PORT = 52000  # the reference's agent port
GUEST_CID = 3
JAIL_UID = 65534  # the jailed VMM's uid and gid
INSTALL_DIR = "/usr/local/lib/agentkernel/firecracker"
# the reference's boot arguments; the agent is the initramfs's /init
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet loglevel=4 i8042.nokbd i8042.noaux"
BOOT_TIMEOUT = 30.0
# disk_rootfs: the guest's writable storage is its own copy of the fixed-size root disk (as qemu:
# qemu.check_disk_size refuses a cap below that size when the sandbox starts)
FC_CONTROLS = {"network_none", "memory", "cpu", "pids", "seccomp_default", "seccomp_restrictive", "cap_drop_all",
               "no_new_privileges", "non_root", "env", "disk_rootfs"}


def find_binary(name: str = "firecracker", explicit: str | None = None) -> str | None:
    env = os.environ.get("AGENTKERNEL_FIRECRACKER_BIN")
    if name != "firecracker" and env:
        env = os.path.join(os.path.dirname(env), name)
    for cand in (explicit, env, shutil.which(name), os.path.join(INSTALL_DIR, name)):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def sandboxes_dir() -> str:
    from .. import paths

    d = os.path.join(paths.data_dir(), "firecracker", "sandboxes")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


# ---- the API -----------------------------------------------------------------------------------------


async def api(sock: str, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One request to the Firecracker API on its unix socket: (status, decoded JSON body or None)."""
    data = json.dumps(body).encode() if body is not None else b""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), timeout)
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in header.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip() or 0)
        payload = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise ConnectionResetError(f"Firecracker API closed the connection: {exc}") from None
    finally:
        writer.close()
    raw = header
    try:
        status = int(header.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise SandboxError(f"Firecracker API: malformed response to {method} {path}: {raw[:200]!r}") from None
    try:
        decoded = json.loads(payload) if payload.strip() else None
    except ValueError:
        decoded = payload.decode(errors="replace")
    return status, decoded


async def api_ok(sock: str, method: str, path: str, body: dict | None = None) -> Any:
    status, reply = await api(sock, method, path, body)
    if status >= 300:
        msg = reply.get("fault_message", reply) if isinstance(reply, dict) else reply
        raise SandboxError(f"Firecracker API {method} {path} -> {status}: {msg}")
    return reply


class VsockTransport(Transport):
    """The agent over Firecracker's vsock: connect to the host-side UDS, ``CONNECT <port>\\n``,
    expect ``OK <n>\\n``; afterwards the stream is the guest's vsock connection."""

    def __init__(self, uds_path: str, port: int = AGENT_VSOCK_PORT, timeout: float = 5.0) -> None:
        self.uds_path, self.port, self.timeout = uds_path, port, timeout

    async def connect(self):
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.uds_path, limit=1 << 20),
                                                self.timeout)
        writer.write(f"CONNECT {self.port}\n".encode())
        line = await asyncio.wait_for(reader.readline(), self.timeout)
        if not line.startswith(b"OK "):
            writer.close()
            raise ConnectionRefusedError(f"vsock CONNECT {self.port} refused: {line[:80]!r}")
        return reader, writer

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return f"vsock:{self.uds_path}:{self.port}"


class VMM:
    """One Firecracker process and its API socket, in a run dir (its cwd: relative paths resolve there)."""

    def __init__(self, run_dir: str, binary: str, *, jailer: str | None = None, sandbox_id: str = "") -> None:
        self.run_dir = run_dir
        self.binary = binary
        self.jailer = jailer
        raw = sandbox_id or os.path.basename(run_dir)  # firecracker ids: alphanumerics and '-' only
        self.id = "".join(ch if ch.isascii() and (ch.isalnum() or ch == "-") else "-" for ch in raw)[:60]
        # with the jailer the VMM lives in <run dir>/jail/firecracker/<id>/root (its chroot)
        self.root = os.path.join(run_dir, "jail", os.path.basename(binary or "firecracker"), self.id, "root") \
            if jailer else run_dir
        self.sock = os.path.join(self.root, "fc.sock")
        self.proc: asyncio.subprocess.Process | None = None

    def argv(self) -> list[str]:
        fc = [self.binary, "--api-sock", self.sock, "--id", self.id, "--level", "Warn",
              "--log-path", os.path.join(self.run_dir, "fc.log")]
        if not self.jailer:
            return fc
        # the jailer: chroot under <run dir>/jail, its own uid/gid, then exec firecracker
        return [self.jailer, "--id", self.id, "--exec-file", self.binary, "--uid", str(JAIL_UID),
                "--gid", str(JAIL_UID), "--chroot-base-dir", os.path.join(self.run_dir, "jail"),
                "--", "--api-sock", "fc.sock"]

    async def spawn(self, timeout: float = 5.0) -> float:
        """Start the VMM; returns ms until its API answered."""
        t0 = time.perf_counter()
        open(os.path.join(self.run_dir, "fc.log"), "a").close()
        if self.jailer:
            os.makedirs(os.path.join(self.run_dir, "jail"), exist_ok=True)
        with open(os.path.join(self.run_dir, "vmm.out"), "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(), cwd=self.run_dir, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        with open(os.path.join(self.run_dir, "vmm.pid"), "w") as f:
            f.write(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise SandboxError(f"firecracker exited with {self.proc.returncode}: {_tail(self.run_dir)}")
            if os.path.exists(self.sock):
                try:
                    await api_ok(self.sock, "GET", "/")
                    return (time.perf_counter() - t0) * 1e3
                except OSError:
                    pass
            if time.monotonic() > deadline:
                await self.kill()  # never leave a VMM behind that nobody can configure
                raise SandboxError(f"the Firecracker API did not come up within {timeout:.0f} s")
            await asyncio.sleep(0.002)

    async def configure(self, cfg: dict) -> None:
        """The full machine configuration through the API (nothing runs until ``start``)."""
        await api_ok(self.sock, "PUT", "/machine-config", cfg["machine-config"])
        await api_ok(self.sock, "PUT", "/boot-source", cfg["boot-source"])
        for d in cfg["drives"]:
            await api_ok(self.sock, "PUT", f"/drives/{d['drive_id']}", d)
        await api_ok(self.sock, "PUT", "/vsock", cfg["vsock"])

    def stage(self, kernel: str, initrd: str, disk: str) -> tuple[str, str, str]:
        """The boot files as the VMM sees them. Jailed: hard-linked (or copied) into its chroot, the disk
        owned by the jail's uid; the API then gets names relative to the chroot."""
        if not self.jailer:
            return kernel, initrd, os.path.relpath(disk, self.run_dir)
        out = []
        for src, name in ((kernel, "vmlinux"), (initrd, "initrd.cpio"), (disk, "rootfs.ext4")):
            dst = os.path.join(self.root, name)
            if not os.path.exists(dst):
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            out.append(name)
        os.chown(os.path.join(self.root, "rootfs.ext4"), JAIL_UID, JAIL_UID)
        return out[0], out[1], out[2]

    async def start(self) -> None:
        await api_ok(self.sock, "PUT", "/actions", {"action_type": "InstanceStart"})

    async def snapshot_create(self, snapshot: str = "vm.snap", mem: str = "vm.mem") -> None:
        """Pause and save (paths relative to the run dir); the VMM stays paused."""
        await api_ok(self.sock, "PATCH", "/vm", {"state": "Paused"})
        await api_ok(self.sock, "PUT", "/snapshot/create",
                     {"snapshot_type": "Full", "snapshot_path": snapshot, "mem_file_path": mem})

    async def snapshot_load(self, snapshot: str, mem: str) -> None:
        """Into a fresh VMM (nothing configured): restore and resume."""
        await api_ok(self.sock, "PUT", "/snapshot/load", {
            "snapshot_path": snapshot, "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": True})

    async def config(self) -> dict:
        return await api_ok(self.sock, "GET", "/vm/config")

    async def kill(self) -> None:
        pid = vmm_pid(self.run_dir)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            await self.proc.wait()


def vsock_path(run_dir: str) -> str:
    """The host side of the sandbox's vsock: in the run dir, or in the jail's chroot."""
    import glob

    jailed = glob.glob(os.path.join(run_dir, "jail", "*", "*", "root", "v.sock"))
    return jailed[0] if jailed else os.path.join(run_dir, "v.sock")


def vmm_pid(run_dir: str) -> int | None:
    from ..vm.pidfile import live_pid

    return live_pid(os.path.join(run_dir, "vmm.pid"), lambda cmd: b"firecracker" in cmd or b"jailer" in cmd)


def _tail(run_dir: str) -> str:
    out = []
    for fn in ("vmm.out", "fc.log"):
        try:
            with open(os.path.join(run_dir, fn), "rb") as f:
                out.append(f.read()[-600:].decode(errors="replace").strip())
        except OSError:
            pass
    return " ".join(x for x in out if x)


def memory_snapshot_dir(snapshot_id: str) -> str:
    """Where the memory snapshot ``snapshot_id`` (of a running sandbox) lives."""
    from .. import paths

    if not snapshot_id or len(snapshot_id) > 64 or not all(c in "0123456789abcdef" for c in snapshot_id):
        raise ConfigError(f"firecracker option restore must be a snapshot id (hex), got {snapshot_id!r}")
    d = os.path.join(paths.data_dir(), "firecracker", "snapshots")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, snapshot_id)


def _require_kvm(what: str) -> None:
    """Fast, first: without hardware KVM no guest can run (the probe's verdict is cached per boot)."""
    from ..vm import kvmprobe

    v = kvmprobe.probe()
    if not v.ok:
        raise BackendUnavailable(f"firecracker cannot {what} on this host: {v.reason}",
                                 hint="use --backend qemu (TCG) here, or a host with hardware KVM")


def machine_config(spec, *, kernel: str, initrd: str, disk: str = "rootfs.ext4",
                   vsock_uds: str = "v.sock") -> dict:
    """The API payloads for one sandbox (paths relative to the VMM's cwd, the run dir)."""
    pol, res = spec.policy, spec.resources
    uid, _, gid = pol.user.partition(":")
    init = ["vm-init", "--root", "/dev/vda", "--vsock", str(AGENT_VSOCK_PORT), "--restrict",
            "--seccomp", f"/ak/seccomp/{pol.seccomp}.bpf", "--hostname", spec.hostname, "--workdir", spec.workdir]
    if uid != "0":
        init += ["--user", f"{uid}:{gid or uid}"]
    if res.pids is not None:
        init += ["--pids", str(int(res.pids))]
    return {
        "machine-config": {"vcpu_count": max(1, int(res.vcpus or 1)), "mem_size_mib": int(res.memory_mb or 256),
                           "smt": False},
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                        "boot_args": f"{BOOT_ARGS} rdinit=/init -- {' '.join(init)}"},
        "drives": [{"drive_id": "rootfs", "path_on_host": disk, "is_root_device": True, "is_read_only": False}],
        "vsock": {"guest_cid": GUEST_CID, "uds_path": vsock_uds},
    }


class FirecrackerBackend(Backend):
    name = "firecracker"
    capabilities = Capabilities(FC_CONTROLS, {"exec", "files", "agent"},
                                isolation="microVM (Firecracker, own guest kernel, needs hardware KVM)")
    # restore=ID: start from the memory snapshot ID (take_memory_snapshot) instead of booting
    options_allowed: ClassVar[tuple[str, ...]] = ("binary", "jailer", "kernel", "restore")

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        if self.options.get("jailer", "off") not in ("on", "off"):
            raise ConfigError("firecracker option jailer must be on or off")
        self.restore_from = self.options.get("restore")
        if self.restore_from is not None:
            memory_snapshot_dir(self.restore_from)  # a well-formed id
            if self.options.get("jailer") == "on":
                raise ConfigError("firecracker option restore cannot be combined with jailer=on")

    @classmethod
    def probe(cls) -> Availability:
        from ..vm import kvmprobe

        exe = find_binary()
        if exe is None:
            return Availability(False, "the firecracker binary is not installed",
                                fix="AGENTKERNEL_SETUP_FIRECRACKER=1 bash scripts/setup.sh, or -o binary=PATH")
        v = kvmprobe.probe()
        if not v.ok:
            return Availability(False, f"no hardware KVM: {v.reason}", details={"binary": exe, "kvm": v.to_dict()},
                                fix="run on a host with hardware virtualization (bare metal or nested KVM); "
                                "use --backend qemu here (TCG)")
        return Availability(True, f"Firecracker at {exe} with hardware KVM", details={"binary": exe})

    def check(self, spec) -> None:
        check_policy(spec, self.capabilities, self.name)

    def _binary(self) -> str:
        exe = find_binary(explicit=self.options.get("binary"))
        if exe is None:
            raise BackendUnavailable("the firecracker binary is not installed",
                                     hint="AGENTKERNEL_SETUP_FIRECRACKER=1 bash scripts/setup.sh, or -o binary=PATH")
        return exe

    async def create(self, spec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        _require_kvm("run a guest")  # first, and fast: without hardware KVM nothing may start (and hang)
        self._binary()
        run_dir = os.path.join(sandboxes_dir(), sandbox_id)
        os.mkdir(run_dir, 0o700)
        meta = {"id": sandbox_id, "labels": owner_labels(sandbox_id, owner, spec.name), "state": "created",
                "spec": spec.to_dict()}
        with open(os.path.join(run_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
        return SandboxRef(self.name, sandbox_id, {"dir": run_dir}, spec)

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        return {"dir": os.path.join(sandboxes_dir(), sandbox_id)}

    def _dir(self, ref: SandboxRef) -> str:
        d = ref.handle.get("dir") or os.path.join(sandboxes_dir(), ref.id)
        if os.path.dirname(os.path.realpath(d)) != os.path.realpath(sandboxes_dir()):
            raise SandboxError(f"refusing a run dir outside {sandboxes_dir()}: {d}")
        return d

    async def start(self, ref: SandboxRef) -> None:
        from ..agent.client import AgentClient
        from ..vm import guestimage

        run_dir = self._dir(ref)
        if vmm_pid(run_dir):
            return
        g = await asyncio.to_thread(guestimage.build, ref.spec.image, quiet=True)
        from .qemu import check_disk_size

        check_disk_size(ref.spec, g["rootfs"]["path"], self.name)
        kernel = self.options.get("kernel") or await asyncio.to_thread(guestimage.ensure_vmlinux, g["kernel"])
        disk = os.path.join(run_dir, "rootfs.ext4")
        snap = None
        if not os.path.exists(disk) and self.restore_from is not None:
            snap = memory_snapshot_dir(self.restore_from)
            if not os.path.exists(os.path.join(snap, "state")):
                raise NotFound(f"no firecracker memory snapshot {self.restore_from}")
            # the sandbox keeps what it needs: its own disk copy, its own links of the state and memory
            await asyncio.to_thread(_copy_sparse, os.path.join(snap, "disk.ext4"), disk)
            for name in ("state", "mem"):
                _link_or_copy(os.path.join(snap, name), os.path.join(run_dir, f"snap.{name}"))
        if not os.path.exists(disk):  # the sandbox's own copy (reflink where the file system can)
            await asyncio.to_thread(_copy_sparse, g["rootfs"]["path"], disk)
        for fn in ("fc.sock", "v.sock"):
            try:
                os.unlink(os.path.join(run_dir, fn))
            except FileNotFoundError:
                pass
        vmm = VMM(run_dir, self._binary(), jailer=find_binary("jailer") if self.options.get("jailer") == "on" else None)
        t0 = time.perf_counter()
        api_ms = await vmm.spawn()
        try:
            if snap is not None:  # the snapshot's drive and vsock paths are relative: this run dir's own
                await vmm.snapshot_load("snap.state", "snap.mem")
            else:
                k, i, d = vmm.stage(kernel, g["initramfs"]["path"], disk)
                await vmm.configure(machine_config(ref.spec, kernel=k, initrd=i, disk=d))
                await vmm.start()
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                try:
                    client = await AgentClient.connect(VsockTransport(vsock_path(run_dir)), timeout=2.0)
                    break
                except (TimeoutError, OSError):
                    if time.monotonic() > deadline or vmm_pid(run_dir) is None:
                        raise SandboxError(f"the guest agent did not answer: {_tail(run_dir)}") from None
                    await asyncio.sleep(0.01)
            try:
                if snap is not None:  # a restored clone: fresh entropy and the real time before anything runs
                    await client.reseed(os.urandom(256), time_ns=time.time_ns())
            finally:
                await client.close()
        except BaseException:
            await vmm.kill()
            raise
        ref.handle["timings"] = {"process_ms": round(api_ms, 2), "ready_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    # -- memory snapshots of running sandboxes (the API's snapshot routes) --
    async def take_memory_snapshot(self, ref: SandboxRef) -> dict[str, Any]:
        """Pause the running VM, save its state and memory (``PUT /snapshot/create``) and a copy of its disk,
        resume it. Returns ``{id, state_bytes, disk_bytes, pause_ms}``; a sandbox started with option
        ``restore=<id>`` is a new VM with that memory: its processes still running."""
        import uuid

        _require_kvm("take a memory snapshot")
        run_dir = self._dir(ref)
        if not vmm_pid(run_dir):
            from ..errors import InvalidState

            raise InvalidState(f"sandbox {ref.spec.name or ref.id} is not running: a memory snapshot needs a "
                               "running VM", hint=f"agentkernel start {ref.spec.name or ref.id}")
        if vsock_path(run_dir) != os.path.join(run_dir, "v.sock"):
            raise PolicyNotEnforceable("memory snapshots of jailed firecracker sandboxes are not supported",
                                       hint="create the sandbox without jailer=on")
        snap_id = uuid.uuid4().hex
        final = memory_snapshot_dir(snap_id)
        work = f"{final}.part"
        os.mkdir(work, 0o700)
        sock = os.path.join(run_dir, "fc.sock")
        try:
            t0 = time.perf_counter()
            await api_ok(sock, "PATCH", "/vm", {"state": "Paused"})
            try:  # paths relative to the VMM's cwd (the run dir); then moved into the snapshot
                await api_ok(sock, "PUT", "/snapshot/create", {"snapshot_type": "Full",
                                                               "snapshot_path": f"snap-{snap_id}.state",
                                                               "mem_file_path": f"snap-{snap_id}.mem"})
                await asyncio.to_thread(_copy_sparse, os.path.join(run_dir, "rootfs.ext4"),
                                        os.path.join(work, "disk.ext4"))
            finally:
                await api_ok(sock, "PATCH", "/vm", {"state": "Resumed"})
            pause_ms = (time.perf_counter() - t0) * 1e3
            for name in ("state", "mem"):
                os.replace(os.path.join(run_dir, f"snap-{snap_id}.{name}"), os.path.join(work, name))
            for name in ("state", "mem", "disk.ext4"):
                os.chmod(os.path.join(work, name), 0o444)
            info = {"id": snap_id, "state_bytes": os.path.getsize(os.path.join(work, "state")),
                    "disk_bytes": os.stat(os.path.join(work, "disk.ext4")).st_blocks * 512,
                    "pause_ms": round(pause_ms, 1)}
            with open(os.path.join(work, "meta.json"), "w") as f:
                json.dump({**info, "spec": ref.spec.to_dict(), "created": time.time()}, f)
            os.rename(work, final)
            return info
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            for name in ("state", "mem"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(run_dir, f"snap-{snap_id}.{name}"))
            raise

    @staticmethod
    def delete_memory_snapshot(snapshot_id: str) -> None:
        """Sandboxes restored from it keep their own disk copy and links: they are not affected."""
        shutil.rmtree(memory_snapshot_dir(snapshot_id), ignore_errors=True)

    async def _client(self, ref: SandboxRef):
        from ..agent.client import AgentClient

        try:
            return await AgentClient.connect(VsockTransport(vsock_path(self._dir(ref))), timeout=5.0)
        except (TimeoutError, OSError):
            raise NotFound(f"sandbox {ref.spec.name or ref.id} is not running in firecracker") from None

    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        from ._agentexec import exec_via_agent

        client = await self._client(ref)
        try:
            return await exec_via_agent(client, ref.spec, req, None)
        finally:
            await client.close()

    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        client = await self._client(ref)
        try:
            return await client.put_file(path, data, mode=mode, make_parents=True)
        finally:
            await client.close()

    async def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        client = await self._client(ref)
        try:
            async for chunk in client.get_file(path):
                yield chunk
        finally:
            await client.close()

    async def stop(self, ref: SandboxRef) -> None:
        await VMM(self._dir(ref), "").kill()

    async def remove(self, ref: SandboxRef) -> None:
        run_dir = self._dir(ref)
        if not os.path.isdir(run_dir):
            return
        await VMM(run_dir, "").kill()
        await asyncio.to_thread(shutil.rmtree, run_dir, True)

    async def status(self, ref: SandboxRef) -> str:
        run_dir = self._dir(ref)
        if not os.path.exists(os.path.join(run_dir, "meta.json")):
            return "missing"
        return "running" if vmm_pid(run_dir) else "stopped"

    async def list(self) -> list[SandboxInfo]:
        out = []
        base = sandboxes_dir()
        for sid in sorted(os.listdir(base)):
            d = os.path.join(base, sid)
            try:
                with open(os.path.join(d, "meta.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            labels = dict(meta.get("labels") or {})
            out.append(SandboxInfo(self.name, sid, labels.get(LABEL_NAME), "running" if vmm_pid(d) else "stopped",
                                   {"dir": d}, labels))
        return out


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` becomes another name of the read-only file ``src`` (a copy where a link cannot be made)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:
        shutil.copyfile(src, dst)


def _copy_sparse(src: str, dst: str) -> None:
    import subprocess

    subprocess.run(["cp", "--reflink=auto", "--sparse=always", src, dst], check=True)
    os.chmod(dst, 0o600)
