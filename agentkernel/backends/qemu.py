"""The ``qemu`` backend: every sandbox is a QEMU ``microvm`` with its own guest kernel.

- Guest: Debian's cloud kernel + an initramfs whose ``/init`` is the static agent (``ak-agent vm-init``)
  + an ext4 root made from the OCI image (``agentkernel.vm.guestimage``). Every sandbox boots from its
  own qcow2 overlay; the ext4 base (and a snapshot's disk) is only ever a read-only backing file.
- Agent: over virtio-serial (a QEMU chardev unix socket on the host, the port ``ak.agent`` in the
  guest), the same protocol as the container backends. No NIC at all (network off): loopback only.
- Accelerator: ``-accel kvm`` when the hardware-KVM probe (``agentkernel.vm.kvmprobe``) passes, TCG
  otherwise (a PVM host, or no /dev/kvm). Option ``accel=kvm|tcg`` forces one.
- Policy inside the guest, enforced by the agent for every command: the user (``--user``), no
  capabilities + no_new_privs (``--restrict``), the policy's seccomp program, a pids cgroup; memory is the
  VM's RAM, CPUs its vCPU count.
- Snapshots (option ``snapshot=on``, the default): the first start of an image/spec boots a template VM
  to agent-ready and saves it (QMP ``migrate`` to a file, its disk frozen as a read-only qcow2); each
  sandbox then starts with ``-incoming`` from that file over its own overlay of the template disk, and
  the guest's RNG is re-seeded and its clock set (agent RESEED) before anything runs.

- Pool members (``create_started`` of a pool id on the daemon's ``background`` backend) restore and warm at nice
  ``REFILL_NICE``, then run at normal priority and are paused (QMP ``stop``) when not taken within
  ``PAUSE_IDLE_S``; ``_resume`` continues one (QMP ``cont`` + its clock set) on every way in: the hand-out
  check, the lease, an agent client.
- A restoring QEMU gets only the kernel's setup header (``guestimage.restore_kernel``), no initramfs.
- Memory snapshots of running sandboxes (the API's snapshot routes): ``take_memory_snapshot``; a sandbox
  restored from one (option ``restore=<id>``) keeps its own hard link of the snapshot's frozen disk, so it
  still boots after the snapshot is deleted.
- The CLI's ``--no-daemon`` run is synchronous (``run_oneshot``: QMP and the agent over blocking sockets,
  no asyncio import); QEMU inherits its agent and QMP sockets already listening (``_listeners``).

Everything of a sandbox lives in one run dir (``<data>/qemu/sandboxes/<id>``: meta.json with the owner
labels, qemu.pid, the sockets, the overlay, logs): ``list`` finds sandboxes from those dirs, ``remove``
kills the VM (pid checked against its command line) and deletes the dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import time

from ..agent.transport import Transport
from ..errors import BackendUnavailable, ConfigError, NotFound, PolicyNotEnforceable, SandboxError
from ..vm import prelaunch
from ..vm.prelaunch import kill_vm_sync, vm_pid
from .base import (
    CONTROLS,
    LABEL_NAME,
    AgentAccess,
    Availability,
    Backend,
    Capabilities,
    ExecRequest,
    ExecResult,
    OneShot,
    Outcome,
    SandboxInfo,
    SandboxRef,
    owner_labels,
    required_controls,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Any, ClassVar


QEMU_BIN = "qemu-system-x86_64"
QEMU_CONTROLS = {
    "network_none",        # no NIC at all; loopback inside the guest
    "memory",              # the VM's RAM
    "cpu",                 # whole vCPUs (vcpus >= 1, see check)
    "pids",                # a pids cgroup in the guest every command joins
    "seccomp_default",     # the profile's BPF (compiled by crun) installed by the agent per command
    "seccomp_restrictive",
    "cap_drop_all",        # the agent drops every capability (bounding set included) per command
    "no_new_privileges",
    "non_root",            # the agent switches to policy.user per command
    "env",
    "read_only_root",      # the guest remounts its root read-only; /tmp and the workdir become tmpfs
    "disk_tmpfs",          # ... of disk_mb MiB each (default DEFAULT_TMPFS_MB)
    # a writable root: the guest writes only to its root disk, whose size is fixed when the image is built
    # (an ext4 file system: files + 20% + 64 MiB + ROOT_FREE_MB) and to tmpfs in its own RAM; the host stores
    # at most that size in the sandbox's qcow2 overlay. A cap at or above the disk's size holds; a smaller one
    # is refused (_plan: checked against the real file system size)
    "disk_rootfs",
}
BOOT_TIMEOUT = 90.0  # TCG on a busy 2-core host: a cold boot takes ~3 s, allow for contention
# a pool member's QEMU restores and warms at this nice value, then gets 0 back: the nice value of its session's
# autogroup (QEMU runs in a session of its own, and with autogroup scheduling a thread's own nice value only
# counts within its session; an autogroup's can be set back to 0 without privileges) and, with CAP_SYS_NICE,
# of its threads too (what counts without autogroup; an unprivileged process never lowers one again). Moderate:
# on a loaded host a refill at a much lower weight starves and the pool runs dry
REFILL_NICE = 5
# a warm pool member not taken within this long is paused (QMP stop) until it is: runs seconds apart find their
# member running (hand-out ~3 ms), members of an idle pool cost no CPU (a running idle one ~36 ms/s); a lease
# continues a paused one: ~5 ms more at light load, tens of ms on a loaded host, where each of the extra round
# trips waits for the scheduler
PAUSE_IDLE_S = 30.0
# the daemon's pools name their members owner.new_id("pool") (pool.WarmPool); other create_started calls (the
# daemon's gated one-shots, runs with files) serve a request now: no low priority, no warm-up, no idle pause
POOL_MEMBER_PREFIX = "pool-"
TEMPLATE_VERSION = "3"  # 2: RAM in a file mapped by the clones, warmed before the save; 3: idle before the save
DEFAULT_MEMORY_MB = 256
TEMPLATE_SETTLE_S = 1.5  # a template VM idles this long after its warm-up, before it is saved


def _data_dir(*parts: str) -> str:
    from .. import paths

    d = os.path.join(paths.data_dir(), "qemu", *parts)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def sandboxes_dir() -> str:
    return _data_dir("sandboxes")


def templates_dir() -> str:
    """Snapshots are derived data, keyed by content: they live in the cache, shared by every store."""
    from ..vm.guestimage import vm_dir

    d = os.path.join(vm_dir(), "templates")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def snapshot_dir(snapshot_id: str) -> str:
    """Where the memory snapshot ``snapshot_id`` (taken of a running sandbox) lives."""
    if not snapshot_id or len(snapshot_id) > 64 or not all(c in "0123456789abcdef" for c in snapshot_id):
        raise ConfigError(f"qemu option restore must be a snapshot id (hex), got {snapshot_id!r}")
    return os.path.join(_data_dir("snapshots"), snapshot_id)


def _inside(path: str, base: str) -> bool:
    p, b = os.path.realpath(path), os.path.realpath(base)
    return os.path.dirname(p) == b and os.path.basename(p) not in ("", ".", "..")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def kill_vm(run_dir: str, *, grace: float = 0.0) -> float:
    """Stop the VM of ``run_dir`` (SIGTERM, then SIGKILL after ``grace``); returns ms until it was gone."""
    import asyncio
    t0 = time.perf_counter()
    pid = vm_pid(run_dir)
    if pid is None:
        return 0.0
    try:
        os.kill(pid, signal.SIGTERM if grace else signal.SIGKILL)
    except ProcessLookupError:
        return 0.0
    deadline = time.monotonic() + max(grace, 5.0)
    killed = not grace
    while vm_pid(run_dir) == pid:
        if not killed and time.monotonic() > t0 + grace:
            os.kill(pid, signal.SIGKILL)
            killed = True
        if time.monotonic() > deadline:
            raise SandboxError(f"QEMU pid {pid} did not exit")
        await asyncio.sleep(0.002)
    return (time.perf_counter() - t0) * 1e3


class GuestPlan:
    """What one VM runs: the guest image, resources, the agent's policy arguments and QEMU's argv."""

    def __init__(self, spec, accel: str, *, quiet: bool = True) -> None:
        from ..vm import guestimage

        self.spec = spec
        self.accel = accel
        self.guest = guestimage.build(spec.image, quiet=quiet)
        res, pol = spec.resources, spec.policy
        self.memory_mb = int(res.memory_mb or DEFAULT_MEMORY_MB)
        self.vcpus = max(1, int(res.vcpus or 1))
        uid, _, gid = pol.user.partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)
        if pol.seccomp not in self.guest["initramfs"]["seccomp"]:
            raise PolicyNotEnforceable(
                f"backend 'qemu' cannot enforce seccomp_{pol.seccomp}: no compiled seccomp program "
                "(crun compiles them; it is not installed)", hint="apt-get install -y crun, then "
                "agentkernel images build --vm")
        init = ["vm-init", "--root", "/dev/vda", "--device", guestimage.AGENT_PORT, "--restrict",
                "--seccomp", f"/ak/seccomp/{pol.seccomp}.bpf", "--hostname", spec.hostname,
                "--workdir", spec.workdir]
        if self.uid != 0:
            init += ["--user", f"{self.uid}:{self.gid}"]
        if res.pids is not None:
            init += ["--pids", str(int(res.pids))]
        if pol.read_only_root:
            from ..spec import DEFAULT_TMPFS_MB

            init += ["--readonly", str(int(res.disk_mb or DEFAULT_TMPFS_MB))]
        self.cmdline = " ".join([
            "console=ttyS0", "reboot=k", "panic=-1", "quiet", "loglevel=4", "i8042.nokbd", "i8042.noaux",
            "i8042.nopnp", "i8042.dumbkbd", "pci=off", "tsc_early_khz=2600000", "tsc=reliable",
            "random.trust_cpu=on", "init_on_free=1", "psi=0", "cgroup_disable=memory", "lsm=landlock,lockdown,yama",
            "audit=0", "sysctl.net.core.bpf_jit_enable=0", "rdinit=/init", "--", *init,
        ])
        env = {}
        for kv in self.guest["rootfs"]["env"]:
            k, sep, v = kv.partition("=")
            if sep:
                env[k] = v
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.setdefault("HOME", self.guest["rootfs"]["homes"].get(str(self.uid), "/root" if self.uid == 0 else "/"))
        env.update(spec.env)
        self.env = env
        self.template_key = hashlib.sha256(json.dumps(
            [TEMPLATE_VERSION, self.guest["key"], self.accel, self.memory_mb, self.vcpus, self.cmdline,
             _qemu_stamp()]).encode()).hexdigest()[:16]

    def argv(self, run_dir: str, disk: str, *, ram: str | None = None, incoming: bool = False,
             listen_fds: tuple[int, int] | None = None) -> list[str]:
        """QEMU's command line. ``ram``: the guest RAM is that file (a template's RAM: mapped shared while
        the template is made, privately = copy-on-write by every clone restored from it, so a restore maps
        the RAM instead of copying it). ``incoming``: restore the device state from fd 3. ``listen_fds``:
        (agent, QMP) unix sockets already bound at ``agent.sock`` / ``qmp.sock`` and listening, inherited
        by QEMU (see ``_listeners``); else QEMU binds those paths itself."""
        from ..vm import guestimage

        k = self.guest["kernel"]
        # a restore runs the kernel in the snapshot's RAM: QEMU gets only the kernel's header, no initramfs
        boot = (["-kernel", guestimage.restore_kernel(k)] if incoming else
                ["-kernel", k["vmlinuz"], "-initrd", self.guest["initramfs"]["path"]])
        cpu = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        argv = [
            _qemu_binary(), "-name", f"agentkernel,process=ak-qemu-{os.path.basename(run_dir)}",
            "-M", "microvm,pit=on,pic=on,rtc=on,isa-serial=on", *cpu,
            "-m", f"{self.memory_mb}M", "-smp", str(self.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *boot, "-append", self.cmdline,
            "-drive", f"id=root,file={disk},format=qcow2,if=none,cache=writeback,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", (f"socket,id=agent,fd={listen_fds[0]},server=on,wait=off" if listen_fds else
                         f"socket,id=agent,path={os.path.join(run_dir, 'agent.sock')},server=on,wait=off"),
            "-device", f"virtserialport,chardev=agent,name={guestimage.AGENT_PORT.split(':', 1)[1]},nr=1",
            *(["-chardev", f"socket,id=qmp,fd={listen_fds[1]},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
              if listen_fds else ["-qmp", f"unix:{os.path.join(run_dir, 'qmp.sock')},server=on,wait=off"]),
            "-serial", f"file:{os.path.join(run_dir, 'console.log')}",
            "-pidfile", os.path.join(run_dir, "qemu.pid"),
        ]
        # the RAM is always the memory backend "ram", so that a snapshot of any VM restores into any other
        if ram:
            argv += ["-object", f"memory-backend-file,id=ram,size={self.memory_mb}M,mem-path={ram},"
                                f"share={'off' if incoming else 'on'}"]
        else:
            argv += ["-object", f"memory-backend-ram,id=ram,size={self.memory_mb}M"]
        argv += ["-machine", "memory-backend=ram"]
        if incoming:  # started over QMP (migration capabilities first): see QemuBackend._restore
            argv += ["-incoming", "defer"]
        return argv


_QEMU_STAMP: str | None = None


def _qemu_binary() -> str:
    exe = shutil.which(QEMU_BIN)
    if exe is None:
        raise BackendUnavailable(f"{QEMU_BIN} is not installed", hint="apt-get install -y qemu-system-x86")
    return exe


def _qemu_stamp() -> str:
    global _QEMU_STAMP
    if _QEMU_STAMP is None:
        st = os.stat(_qemu_binary())
        _QEMU_STAMP = f"{st.st_size}-{st.st_mtime_ns}"
    return _QEMU_STAMP


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _tail(path: str, n: int = 800) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# the first line of a guest kernel's crash report (an oops, a BUG, a panic): what a console tail of the
# register dump that follows it would hide
_CRASH_MARKERS = (b"Kernel panic", b"BUG:", b"Oops:", b"general protection fault", b"invalid opcode",
                  b"unable to handle", b"Unable to handle", b"double fault", b"WARNING:", b"watchdog:")


def _console(run_dir: str, n: int = 400) -> str:
    """What the guest's console says about why it stopped: from the first line of a kernel crash report
    (with what follows it, ``n`` * 2 characters) and the console's last line; else its last ``n`` characters."""
    try:
        with open(os.path.join(run_dir, "console.log"), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - (256 << 10)))
            text = f.read()
    except OSError:
        return ""
    hits = [i for i in (text.find(m) for m in _CRASH_MARKERS) if i >= 0]
    if not hits:
        return text[-n:].decode(errors="replace").strip()
    start = text.rfind(b"\n", 0, min(hits)) + 1
    report = text[start:start + 2 * n].decode(errors="replace").strip()
    last = text.rstrip().rsplit(b"\n", 1)[-1].decode(errors="replace").strip()
    return f"guest kernel: {report} [...] {last}" if start + 2 * n < len(text.rstrip()) else f"guest kernel: {report}"


def _clone_overlay(snap_dir: str, dest: str) -> None:
    """A new, empty qcow2 overlay of ``snap_dir``'s frozen disk at ``dest``: a copy of a pristine overlay
    made once per snapshot (``qemu-img create`` costs a process start, 70-190 ms on a busy host; a copy of
    its ~200 KB result well under a millisecond). Overlays do not depend on their own path."""
    from ..vm import guestimage

    pristine = os.path.join(snap_dir, "overlay.qcow2")
    if not os.path.exists(pristine):
        tmp = f"{pristine}.{os.getpid()}.tmp"
        guestimage.overlay(os.path.join(snap_dir, "disk.qcow2"), tmp, backing_format="qcow2")
        os.chmod(tmp, 0o444)
        os.replace(tmp, pristine)
    shutil.copyfile(pristine, dest)
    os.chmod(dest, 0o600)


SNAPSHOT_BASE = "base.qcow2"  # a restored sandbox's own hard link of its snapshot's frozen disk


def _link_or_copy(src: str, dest: str) -> None:
    """``dest`` becomes another name of the read-only file ``src`` (a copy where a hard link cannot be made)."""
    try:
        os.link(src, dest)
    except FileExistsError:
        pass
    except OSError:  # another file system, or links not allowed: a copy (reflinked where the FS can)
        tmp = f"{dest}.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)


def _snapshot_overlay(snap_dir: str, run_dir: str) -> str:
    """The disk of a sandbox restored from the memory snapshot in ``snap_dir``: a new, empty qcow2 overlay
    whose backing file is ``base.qcow2`` *relative to the run dir*, a hard link of the snapshot's frozen
    (read-only) disk made there. The sandbox holds what it needs: deleting the snapshot removes only the
    snapshot's own name of that disk, and the sandbox can still stop and boot again; the last link goes
    with the run dir. Returns the overlay's path."""
    from ..vm import guestimage

    frozen = os.path.join(snap_dir, "disk.qcow2")
    pristine = os.path.join(snap_dir, "overlay-rel.qcow2")
    if not os.path.exists(pristine):
        # made once per snapshot beside a link of the same name, so that the relative name resolves
        _link_or_copy(frozen, os.path.join(snap_dir, SNAPSHOT_BASE))
        tmp = f"{pristine}.{os.getpid()}.tmp"
        guestimage.overlay(SNAPSHOT_BASE, tmp, backing_format="qcow2")
        os.chmod(tmp, 0o444)
        os.replace(tmp, pristine)
    _link_or_copy(frozen, os.path.join(run_dir, SNAPSHOT_BASE))
    disk = os.path.join(run_dir, "disk.qcow2")
    shutil.copyfile(pristine, disk)
    os.chmod(disk, 0o600)
    return disk


def _rebase_onto_template(disk: str) -> None:
    """Make ``disk`` (a qcow2 overlay) depend on nothing but the first template disk in its backing chain
    (``qemu-img rebase`` copies in whatever the layers in between hold)."""
    import subprocess

    r = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", "-U", disk], capture_output=True)
    if r.returncode != 0:
        raise SandboxError(f"qemu-img info {disk}: {r.stderr.decode(errors='replace').strip()}")
    chain = json.loads(r.stdout)
    tdir = os.path.realpath(templates_dir())
    base = next((c["filename"] for c in chain[1:] if os.path.realpath(c["filename"]).startswith(tdir + os.sep)),
                None)
    if base is None or base == chain[0].get("backing-filename"):
        return
    r = subprocess.run(["qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", base, disk], capture_output=True)
    if r.returncode != 0:
        raise SandboxError(f"qemu-img rebase {disk}: {r.stderr.decode(errors='replace').strip()}")


async def _migrate_to_file(qmp: Any, path: str, *, ignore_shared: bool, poll_s: float) -> None:
    """Save the VM's state into ``path`` with QMP ``migrate`` (the VM ends paused) and wait until it has
    completed. ``ignore_shared``: RAM in a shared file stays there and the stream holds only device state.

    QEMU says "completed" once it has closed its end of the pipe, which can be before ``cat`` has written
    the last of it: the file is whole only when ``cat`` has exited, which it records (with its status) in
    ``<path>.done``."""
    import asyncio
    done = f"{path}.done"
    await qmp.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
    await qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(path)}; echo $? > {shlex.quote(done)}")
    while True:
        st = await qmp.cmd("query-migrate")
        if st.get("status") == "completed":
            break
        if st.get("status") in ("failed", "cancelled"):
            raise SandboxError(f"saving the VM snapshot failed: {st.get('error-desc', st)}")
        await asyncio.sleep(poll_s)
    deadline = time.monotonic() + 60
    while True:
        try:
            with open(done) as f:
                status = f.read()
        except FileNotFoundError:
            status = ""
        if status.endswith("\n"):  # written whole
            break
        if time.monotonic() > deadline:
            raise SandboxError(f"saving the VM snapshot: the writer of {path} did not finish within 60 s")
        await asyncio.sleep(poll_s)
    os.unlink(done)
    if status.strip() != "0":
        raise SandboxError(f"saving the VM snapshot: writing {path} failed (cat exited with {status.strip()}; "
                           "is the disk full?)")


def _can_raise_priority() -> bool:
    """Whether this process may lower a nice value again (CAP_SYS_NICE, bit 23 of CapEff)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)
    except (OSError, ValueError):
        pass
    return False


def _renice(pid: int, nice: int, *, threads: bool) -> None:
    """Set the nice value of ``pid``'s session autogroup (where autogroup scheduling is on) and, with
    ``threads``, of its every thread (a nice value is per thread on Linux)."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup scheduling in this kernel
        pass
    try:
        tids = os.listdir(f"/proc/{pid}/task") if threads else []
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError:  # the thread ended meanwhile
            pass


async def _qmp_command(run_dir: str, name: str) -> None:
    """One QMP command (without arguments) to the VM of ``run_dir``, in one round trip."""
    from ..vm.qmp import QMP

    await QMP.run(os.path.join(run_dir, "qmp.sock"), name)


def _dig_holes(path: str) -> None:
    """Punch a hole (``fallocate -d``) wherever ``path`` holds only zeros."""
    import subprocess

    r = subprocess.run(["fallocate", "--dig-holes", path], capture_output=True)
    if r.returncode != 0:
        raise SandboxError(f"fallocate --dig-holes {path}: {r.stderr.decode(errors='replace').strip()}")


def _hello_end(buf: bytes) -> int:
    """Where the agent's HELLO reply in ``buf`` (what the agent port gave since our HELLO) ends, -1 while it is
    not whole: its frame header (4-byte length, 4 zero bytes) right before the R_HELLO marker, and the
    frame's full length."""
    from ..agent import protocol as P

    i = buf.find(bytes([P.R_HELLO, 0]) + P.MAGIC)
    if i < 8 or buf[i - 4:i] != b"\0\0\0\0":
        return -1
    end = i + 2 + int.from_bytes(buf[i - 8:i - 4], "big")
    return end if len(buf) >= end else -1


def _hello_answered(buf: bytes) -> bool:
    return _hello_end(buf) >= 0


async def _reseed_port(path: str, entropy: bytes = b"", timeout: float = 10.0) -> None:
    """One agent session on the port at ``path`` that writes HELLO and RESEED (the wall clock, and
    ``entropy``: none by default, the clock only) together and returns once the agent confirmed the
    RESEED: a single round trip to the guest, which can be paused when it starts (the bytes wait in the
    port until it runs)."""
    import asyncio

    from ..agent import protocol as P

    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20), timeout)
    try:
        writer.write(P.encode_hello() + P.encode_frame(P.RESEED, 1, P.encode_reseed(entropy, time.time_ns())))
        deadline = time.monotonic() + timeout
        buf, dec = b"", None
        while True:
            data = await _read_port(reader, deadline, "RESEED")
            if dec is None:  # everything up to the HELLO reply is an earlier session's (PortTransport.connect)
                buf = buf[-(1 << 16):] + data
                end = _hello_end(buf)
                if end < 0:
                    continue
                dec, data = P.FrameDecoder(), buf[end:]
            for ftype, stream, payload in dec.feed(data):
                if stream == 1 and ftype == P.R_OK:
                    return
                if stream == 1 and ftype == P.R_ERROR:
                    raise P.decode_error(payload)
    finally:
        writer.close()


async def _read_port(reader, deadline: float, request: str) -> bytes:
    """The next bytes from the agent's port before ``deadline`` (monotonic), else TimeoutError naming the
    unanswered ``request``; ConnectionResetError when QEMU closed the port."""
    import asyncio

    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"the guest agent did not answer {request}")
    data = await asyncio.wait_for(reader.read(65536), left)
    if not data:
        raise ConnectionResetError("QEMU closed the agent port connection")
    return data


class PortTransport(Transport):
    """The agent's virtio-serial port through QEMU's chardev socket. A new host session may find bytes
    the agent wrote for the previous one still in flight, so ``connect`` first syncs: it sends a HELLO
    and drops everything up to the agent's HELLO reply; the client's own HELLO then starts a clean
    session (the agent treats every HELLO as a session start)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    async def connect(self):
        import asyncio

        from ..agent import protocol as P

        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path, limit=1 << 20),
                                                self.timeout)
        try:
            writer.write(P.encode_hello())
            buf = b""
            deadline = time.monotonic() + self.timeout
            while not _hello_answered(buf):
                buf = buf[-(1 << 16):] + await _read_port(reader, deadline, "HELLO")
        except BaseException:
            writer.close()
            raise
        return reader, writer

    def connect_sync(self):
        """``connect`` without asyncio (the CLI's one-shot): a blocking socket, synced the same way."""
        import _socket

        from ..agent import protocol as P

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(P.encode_hello())
        except BaseException:
            s.close()
            raise
        return self.synced(s)

    def synced(self, s):
        """``s``, connected to the port with our sync HELLO sent, once the agent's HELLO reply has been read
        (everything before it is dropped); closed on failure."""
        try:
            buf = b""
            deadline = time.monotonic() + self.timeout
            while not _hello_answered(buf):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the guest agent did not answer HELLO")
                s.settimeout(left)
                data = s.recv(65536)
                if not data:
                    raise ConnectionResetError("QEMU closed the agent port connection")
                buf = buf[-(1 << 16):] + data
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return s

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return f"virtio-serial:{self.path}"


def _qmp_incoming_sync(path: str, *, shared_ram: bool, timeout: float) -> float:
    """``QemuBackend._restore`` without asyncio: QMP over a blocking socket (the socket listens already,
    so the connection waits in the backlog until QEMU is up). Returns when QEMU greeted (perf_counter)."""
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(prelaunch.qmp_incoming_commands(shared_ram))  # QMP reads them after its greeting
        return _qmp_replies_sync(s, 3 if shared_ram else 2, timeout)
    finally:
        s.close()


def _qmp_replies_sync(s, n: int, timeout: float) -> float:
    """Read QEMU's greeting and the replies to the ``n`` commands written to the QMP socket ``s`` (events
    are skipped); raises on an error reply. Returns when QEMU greeted (perf_counter)."""
    s.settimeout(timeout)
    buf = b""

    def reply() -> dict:
        nonlocal buf
        while True:
            line, sep, rest = buf.partition(b"\n")
            if sep:
                buf = rest
                msg = json.loads(line)
                if "event" not in msg:
                    return msg
                continue
            data = s.recv(65536)
            if not data:
                raise ConnectionResetError("QEMU closed the QMP connection")
            buf += data

    if "QMP" not in reply():
        raise SandboxError("QEMU's QMP socket sent no greeting")
    t_up = time.perf_counter()
    for _ in range(n):
        msg = reply()
        if "error" in msg:
            raise SandboxError(f"QEMU could not restore the snapshot: {msg['error'].get('desc', msg['error'])}")
    return t_up


def check_disk_size(spec, rootfs: str, backend: str) -> None:
    """A VM's writable storage is its fixed-size root disk: refuse a disk_mb cap below that size."""
    cap = spec.resources.disk_mb
    if cap is None or spec.policy.read_only_root:  # a read-only root's disk_mb sizes its tmpfs places
        return
    size_mb = -(-os.stat(rootfs).st_size // (1 << 20))
    if size_mb > cap:
        raise PolicyNotEnforceable(
            f"backend {backend!r} cannot cap writable storage at {cap} MiB: the VM's root disk of {spec.image} is "
            f"{size_mb} MiB (its size is fixed when the image is built)",
            hint=f"ask for --disk {size_mb} or more, or use a container backend for smaller caps")


class QemuBackend(Backend, AgentAccess, OneShot):
    name = "qemu"
    capabilities = Capabilities(QEMU_CONTROLS, {"exec", "files", "agent", "pool", "snapshot", "oneshot"},
                                isolation="microVM (QEMU microvm, own guest kernel)")
    # restore=ID: start from the memory snapshot ID (take_memory_snapshot) instead of the image's template
    options_allowed: ClassVar[tuple[str, ...]] = ("snapshot", "accel", "restore")
    # the benchmark's modes (suites/headline.py): a cold boot, and a restore from the snapshot
    bench_cold_args: ClassVar[tuple[str, ...]] = ("-o", "snapshot=off")
    bench_snapshot_args: ClassVar[tuple[str, ...]] = ("-o", "snapshot=on")
    # run_oneshot is the CLI's; in-process runs keep run() (a request's cwd must not key a new template)
    oneshot_in_process: ClassVar[bool] = False

    @classmethod
    def bench_baselines(cls) -> list[dict[str, Any]]:
        """The benchmark's raw row: QEMU restoring the same template by itself (``vm.rawrestore``)."""
        import asyncio

        from ..vm import rawrestore

        label = "raw QEMU restore of the same template to a running guest (no CLI, no agent)"
        avail = cls.probe()
        if not avail.available:
            return [{"name": "raw_qemu_restore", "label": label, "reason": avail.reason}]
        from ..config import default_spec_for

        backend = cls()
        plan = GuestPlan(default_spec_for("qemu"), backend.accel())
        tdir = asyncio.run(backend._template(plan))
        return [{"name": "raw_qemu_restore", "label": label, "argv": rawrestore.baseline_argv(plan, tdir)}]

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.snapshot = self.options.get("snapshot", "on")
        if self.snapshot not in ("on", "off"):
            raise ConfigError(f"qemu option snapshot must be on or off, got {self.snapshot!r}")
        self.accel_opt = self.options.get("accel", "auto")
        if self.accel_opt not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"qemu option accel must be auto, kvm or tcg, got {self.accel_opt!r}")
        self._plans: dict[str, tuple[float, GuestPlan]] = {}
        self._idle_timers: dict[str, Any] = {}  # pool members that pause when idle (_pause_when_idle)
        self._pausing: dict[str, Any] = {}
        self._sessions: Any = None  # the open agent-port sessions, shared by concurrent users (_client)
        self.restore_from = self.options.get("restore")
        if self.restore_from is not None:
            snapshot_dir(self.restore_from)  # a well-formed id

    async def _plan(self, spec) -> GuestPlan:
        """The guest plan of ``spec``, made once per backend object for a few seconds (a pool's refills
        and a run's create + start need the same one; a rebuilt image is seen after the TTL)."""
        import asyncio
        key = json.dumps(spec.replace(name=None).to_dict(), sort_keys=True)
        hit = self._plans.get(key)
        if hit is not None and time.monotonic() - hit[0] < 30.0:
            return hit[1]
        plan = await asyncio.to_thread(self._plan_sync, spec)
        return plan

    def _plan_sync(self, spec) -> GuestPlan:
        key = json.dumps(spec.replace(name=None).to_dict(), sort_keys=True)
        hit = self._plans.get(key)
        if hit is not None and time.monotonic() - hit[0] < 30.0:
            return hit[1]
        plan = GuestPlan(spec, self.accel())
        check_disk_size(spec, plan.guest["rootfs"]["path"], self.name)
        self._plans[key] = (time.monotonic(), plan)
        return plan

    # -- host checks --
    @classmethod
    def probe(cls) -> Availability:
        from ..vm import kvmprobe

        exe = shutil.which(QEMU_BIN)
        if exe is None:
            return Availability(False, f"{QEMU_BIN} is not installed", fix="apt-get install -y qemu-system-x86")
        for tool in ("qemu-img", "mkfs.ext4"):
            if shutil.which(tool) is None:
                return Availability(False, f"{tool} is not installed",
                                    fix="apt-get install -y qemu-utils e2fsprogs (or bash scripts/setup.sh)")
        from .. import paths

        if paths.agent_binary() is None:
            return Availability(False, "the in-sandbox agent binary is missing", fix="make -C agent")
        v = kvmprobe.probe()
        accel = "kvm" if v.ok else "tcg"
        return Availability(True, f"QEMU microvm with {accel.upper()}" + ("" if v.ok else f" ({v.reason})"),
                            details={"accel": accel, "kvm": v.to_dict()})

    def accel(self) -> str:
        from ..vm import kvmprobe

        if self.accel_opt == "tcg":
            return "tcg"
        v = kvmprobe.probe()
        if self.accel_opt == "kvm" and not v.ok:
            raise BackendUnavailable(f"qemu accel=kvm: {v.reason}", hint="use accel=auto or accel=tcg")
        return "kvm" if v.ok else "tcg"

    def check(self, spec) -> None:
        missing = [c for c in required_controls(spec) if c not in self.capabilities.controls]
        why = {c: CONTROLS[c] for c in missing}
        vcpus = spec.resources.vcpus
        if vcpus is not None and (vcpus < 1 or vcpus != int(vcpus)):
            missing.insert(0, "cpu")
            why["cpu"] = f"a CPU quota of {vcpus:g} cores: a VM gets whole vCPUs (vcpus = 1, 2, ...)"
        if missing:
            hints = []
            if "cpu" in missing:
                hints.append("use a whole number of vcpus")
            if "mount_cwd" in missing:
                hints.append("copy files in with cp instead of mount_cwd")
            if "network_full" in missing or "network_allowlist" in missing:
                hints.append("qemu sandboxes have no network device: use network = false")
            raise PolicyNotEnforceable("backend 'qemu' cannot enforce: "
                                       + "; ".join(f"{c} ({why[c]})" for c in missing),
                                       hint="; ".join(hints) or "choose another backend or relax the spec")

    # -- lifecycle --
    async def create(self, spec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        plan = await self._plan(spec)
        run_dir = os.path.join(sandboxes_dir(), sandbox_id)
        if len(os.path.join(run_dir, "agent.sock")) > 100:
            raise SandboxError(f"run dir path too long for a unix socket: {run_dir}")
        os.mkdir(run_dir, 0o700)
        meta = {"id": sandbox_id, "labels": owner_labels(sandbox_id, owner, spec.name), "state": "created",
                "spec": spec.to_dict(), "template": plan.template_key, "created": time.time()}
        _write_json(os.path.join(run_dir, "meta.json"), meta)
        return SandboxRef(self.name, sandbox_id, {"dir": run_dir}, spec)

    def _dir(self, ref: SandboxRef) -> str:
        d = ref.handle.get("dir") or os.path.join(sandboxes_dir(), ref.id)
        if not _inside(d, sandboxes_dir()):
            raise SandboxError(f"refusing a run dir outside {sandboxes_dir()}: {d}")
        return d

    async def create_started(self, spec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        """``create`` + ``start``; a pool member of the daemon (``background`` set, the id a pool's) is restored
        and warmed at a low priority and paused once idle: see ``_boot``'s ``member`` and ``_pause_when_idle``."""
        ref = await self.create(spec, sandbox_id=sandbox_id, owner=owner)
        try:
            await self._start(ref, member=self.background and sandbox_id.startswith(POOL_MEMBER_PREFIX))
        except BaseException:
            await self.remove(ref)
            raise
        return ref

    async def start(self, ref: SandboxRef) -> None:
        await self._start(ref)

    async def _start(self, ref: SandboxRef, *, member: bool = False) -> None:
        import asyncio
        run_dir = self._dir(ref)
        meta = _read_json(os.path.join(run_dir, "meta.json"))
        if meta is None:
            raise NotFound(f"sandbox {ref.spec.name or ref.id} no longer exists in qemu")
        if vm_pid(run_dir) is not None:
            return
        plan = await self._plan(ref.spec)
        disk = os.path.join(run_dir, "disk.qcow2")
        tdir = None
        from ..vm import guestimage

        if not os.path.exists(disk):
            if self.restore_from is not None:
                tdir = snapshot_dir(self.restore_from)
                if not os.path.exists(os.path.join(tdir, "state")):
                    raise NotFound(f"no qemu memory snapshot {self.restore_from}")
                await asyncio.to_thread(_snapshot_overlay, tdir, run_dir)
            elif self.snapshot == "on":
                tdir = await self._template(plan)
                _clone_overlay(tdir, disk)
            else:
                await asyncio.to_thread(guestimage.overlay, plan.guest["rootfs"]["path"], disk)
        timings = await self._boot(plan, run_dir, disk, tdir, member=member)
        meta.update({"state": "running", "timings": timings, "env": plan.env, "paused": False})
        _write_json(os.path.join(run_dir, "meta.json"), meta)
        ref.handle["timings"] = timings
        if member:
            self._pause_when_idle(ref)

    async def _boot(self, plan: GuestPlan, run_dir: str, disk: str, template: str | None, *,
                    ram: str | None = None, member: bool = False) -> dict:
        """Start QEMU and wait for the agent; returns the phase timings (ms). ``template``: restore the
        snapshot in that dir (its device state, its RAM file mapped copy-on-write) instead of booting;
        ``ram``: the guest RAM is that (shared) file (a template being made). ``member``: a pool member
        restored in the background: QEMU runs at nice ``REFILL_NICE`` while it restores and warms (so a
        refill does not slow the command a leased member is running), runs one ``true`` (TCG: translate
        the fork/exec path now, not on the lease) and gets its normal priority back; ``_start`` then has it
        paused once idle (``_pause_when_idle``)."""
        import asyncio

        from ..agent.client import AgentClient

        for f in ("agent.sock", "qmp.sock", "qemu.pid"):
            try:
                os.unlink(os.path.join(run_dir, f))
            except FileNotFoundError:
                pass
        t0 = time.perf_counter()
        # QEMU is not our child (a shell starts it in the background and exits): it belongs to no event
        # loop and leaves no zombie in a long-lived owner; the pid it prints is checked while booting
        incoming = template is not None
        if incoming:
            ram = os.path.join(template, "ram")
            if not os.path.exists(ram):
                ram = None  # a snapshot of a running sandbox: its RAM is in the state stream
        script = '"$@" </dev/null >>"$0" 2>&1 & echo $!'
        if incoming:  # the device state on fd 3 (no cat, no pipe)
            script = f'"$@" </dev/null >>"$0" 2>&1 3<{shlex.quote(os.path.join(template, "state"))} & echo $!'
        renice = member and _can_raise_priority()
        if member:  # QEMU's session (start_new_session) is its autogroup: the shell sets its nice value
            script = f"echo {REFILL_NICE} >/proc/self/autogroup 2>/dev/null; {script}"
        socks, fds = prelaunch.listeners(run_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", script, os.path.join(run_dir, "qemu.log"),
                *(["nice", "-n", str(REFILL_NICE)] if renice else []),
                *plan.argv(run_dir, disk, ram=ram, incoming=incoming, listen_fds=fds), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
                pass_fds=fds)
            out, _ = await proc.communicate()
        finally:  # from here on only QEMU holds them: a connect fails once QEMU is gone
            for sk in socks:
                sk.close()
            for fd in fds:
                os.close(fd)
        qpid = int(out.strip() or 0)
        t_proc = None  # QEMU up: its QMP greeting (a restore), else its pidfile written (a cold boot)
        sock = os.path.join(run_dir, "agent.sock")
        pidfile = os.path.join(run_dir, "qemu.pid")
        deadline = time.monotonic() + BOOT_TIMEOUT
        client = None
        try:
            if incoming:
                t_proc = await self._restore(run_dir, qpid, shared_ram=ram is not None)
            while client is None:
                if not _alive(qpid):
                    raise SandboxError("QEMU exited while starting: "
                                       f"{_tail(os.path.join(run_dir, 'qemu.log'))} "
                                       f"{_console(run_dir)}".strip())
                if time.monotonic() > deadline:
                    raise SandboxError(f"the guest agent did not answer within {BOOT_TIMEOUT:.0f} s: "
                                       f"{_console(run_dir)}")
                if t_proc is None:
                    if os.path.exists(pidfile):
                        t_proc = time.perf_counter()
                    else:
                        await asyncio.sleep(0.002)
                    continue
                try:
                    left = max(0.5, deadline - time.monotonic())
                    client = await AgentClient.connect(PortTransport(sock, timeout=left),
                                                       timeout=10.0)
                except (TimeoutError, OSError):
                    await asyncio.sleep(0.01)
            t_boot = time.perf_counter()
            if incoming:  # a restored clone: fresh entropy and the real time before anything runs
                await client.reseed(os.urandom(256), time_ns=time.time_ns())
            t_ready = time.perf_counter()
            if member:
                if plan.accel == "tcg":
                    # TCG's translated-code cache is not part of a snapshot, so the clone's first command
                    # would pay for translating the fork/exec paths again: pay it here, off the request path
                    await client.exec(["true"], env=plan.env, cwd=plan.spec.workdir)
                _renice(qpid, 0, threads=renice)
        except BaseException:
            await kill_vm(run_dir)
            raise
        finally:
            if client is not None:
                await client.close()
        return {"process_ms": round((t_proc - t0) * 1e3, 2), "boot_ms": round((t_boot - t_proc) * 1e3, 2),
                "agent_ms": round((t_ready - t_boot) * 1e3, 2), "ready_ms": round((t_ready - t0) * 1e3, 2),
                "restored": bool(incoming), "accel": plan.accel,
                **({"warm_ms": round((time.perf_counter() - t_ready) * 1e3, 2)} if member else {})}

    async def _template(self, plan: GuestPlan) -> str:
        """The snapshot for this image/spec: made once (under a lock), then shared read-only."""
        import asyncio
        import fcntl

        tdir = os.path.join(templates_dir(), plan.template_key)
        if os.path.exists(os.path.join(tdir, "state")):
            return tdir
        lock = open(os.path.join(templates_dir(), f"{plan.template_key}.lock"), "w")  # noqa: SIM115
        try:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            if os.path.exists(os.path.join(tdir, "state")):
                return tdir
            await self._make_template(plan, tdir)
            return tdir
        finally:
            lock.close()

    async def _restore(self, run_dir: str, qpid: int, *, shared_ram: bool) -> float:
        """Load a template's device state (fd 3 of QEMU) into a QEMU started with ``-incoming defer``. With
        the template's RAM file mapped, the stream holds no RAM (capability x-ignore-shared, which has to
        match the side that saved it). Returns when QEMU was up (its QMP greeting; perf_counter)."""
        from ..vm.qmp import QMP

        # the socket listens already (_listeners): the connection waits in its backlog until QEMU is up
        try:
            qmp = await QMP.connect(os.path.join(run_dir, "qmp.sock"), timeout=BOOT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            if not _alive(qpid):
                raise SandboxError(f"QEMU exited while starting: {_tail(os.path.join(run_dir, 'qemu.log'))}") from None
            raise SandboxError(f"QEMU's QMP did not answer: {exc}") from None
        t_up = time.perf_counter()
        try:
            if shared_ram:
                await qmp.cmd("migrate-set-capabilities",
                              capabilities=[{"capability": "x-ignore-shared", "state": True}])
            await qmp.cmd("migrate-incoming", uri="fd:3")
        finally:
            await qmp.close()
        return t_up

    async def _warm_template(self, plan: GuestPlan, run_dir: str) -> None:
        """Before the save: run what every clone's first command runs (the agent's fork/exec path, the
        shell, echo) so that the guest's page cache, dentries and slabs in the snapshot already hold them."""
        from ..agent.client import AgentClient

        client = await AgentClient.connect(PortTransport(os.path.join(run_dir, "agent.sock")), timeout=10.0)
        try:
            for argv in (["true"], ["echo", "hello"], ["sh", "-c", "echo hello; cat /proc/self/stat >/dev/null"]):
                await client.exec(argv, env=plan.env, cwd=plan.spec.workdir)
        finally:
            await client.close()

    async def _make_template(self, plan: GuestPlan, tdir: str) -> None:
        import asyncio

        from ..vm import guestimage
        from ..vm.qmp import QMP

        work = f"{tdir}.building"
        if os.path.isdir(work):  # left by a builder that died: its VM may still run
            await kill_vm(work)
            shutil.rmtree(work, ignore_errors=True)
        os.mkdir(work, 0o700)
        try:
            disk = os.path.join(work, "disk.qcow2")
            await asyncio.to_thread(guestimage.overlay, plan.guest["rootfs"]["path"], disk)
            timings = await self._boot(plan, work, disk, None, ram=os.path.join(work, "ram"))
            await self._warm_template(plan, work)
            # let the guest see the host session end and finish the work the warm-up deferred (RCU callbacks,
            # per-CPU counters, LRU drains) before the save: whatever is still pending runs again in every clone,
            # under TCG with every code path translated afresh (a save 20 ms after the warm-up measured up to
            # ~2,000 more translated blocks and ~12 ms more QEMU CPU from restore to a ready agent)
            await asyncio.sleep(TEMPLATE_SETTLE_S)
            t0 = time.perf_counter()
            qmp = await QMP.connect(os.path.join(work, "qmp.sock"))
            try:
                state = os.path.join(work, "state")
                # the RAM stays in its file (shared mapping): the stream holds only the device state
                await _migrate_to_file(qmp, f"{state}.part", ignore_shared=True, poll_s=0.01)
                try:
                    await qmp.cmd("quit")
                except (OSError, ConnectionError):
                    pass
            finally:
                await qmp.close()
            await kill_vm(work, grace=2.0)
            ram = os.path.join(work, "ram")
            # the guest zeroes what it frees (init_on_free): make those pages holes, so the file holds only
            # the guest's live memory and a clone's read of a free page costs no disk read
            await asyncio.to_thread(_dig_holes, ram)
            os.rename(f"{state}.part", state)
            os.chmod(disk, 0o444)
            _write_json(os.path.join(work, "meta.json"), {
                "key": plan.template_key, "image": plan.spec.image, "boot": timings,
                "save_ms": round((time.perf_counter() - t0) * 1e3, 1), "state_bytes": os.path.getsize(state),
                "ram_bytes_allocated": os.stat(ram).st_blocks * 512})
            for f in ("agent.sock", "qmp.sock", "qemu.pid"):
                try:
                    os.unlink(os.path.join(work, f))
                except FileNotFoundError:
                    pass
            os.rename(work, tdir)
        except BaseException:
            await kill_vm(work)
            shutil.rmtree(work, ignore_errors=True)
            raise

    # -- memory snapshots of running sandboxes --
    async def take_memory_snapshot(self, ref: SandboxRef) -> dict[str, Any]:
        """Save the running VM (RAM + device state, with its disk as it is at that instant) as a new
        snapshot; the VM goes on running. Returns ``{id, state_bytes, disk_bytes, pause_ms}``; a sandbox
        started with option ``restore=<id>`` is a new VM with that memory: its processes still running."""
        import asyncio
        import uuid

        from ..vm.qmp import QMP

        run_dir = self._dir(ref)
        if vm_pid(run_dir) is None:
            from ..errors import InvalidState

            raise InvalidState(f"sandbox {ref.spec.name or ref.id} is not running: a memory snapshot needs a "
                               "running VM", hint=f"agentkernel start {ref.spec.name or ref.id}")
        await self._resume(ref)  # a paused pool member: the snapshot's clock is the real one
        snap_id = uuid.uuid4().hex
        final = snapshot_dir(snap_id)
        work = f"{final}.part"
        os.mkdir(work, 0o700)
        try:
            qmp = await QMP.connect(os.path.join(run_dir, "qmp.sock"))
            try:
                state = os.path.join(work, "state")
                # the RAM goes into the stream (a clone's RAM is a private mapping, never a shared file)
                t0 = time.perf_counter()
                await _migrate_to_file(qmp, state, ignore_shared=False, poll_s=0.005)
                try:  # paused with its disk flushed and closed: the disk as the RAM knows it
                    await asyncio.to_thread(shutil.copyfile, os.path.join(run_dir, "disk.qcow2"),
                                            os.path.join(work, "disk.qcow2"))
                finally:
                    await qmp.cmd("cont")
                pause_ms = (time.perf_counter() - t0) * 1e3
            finally:
                await qmp.close()
            base = os.path.join(run_dir, SNAPSHOT_BASE)
            if os.path.exists(base):
                # a copy of a restored sandbox: its disk sits on the other snapshot's disk (the relative
                # base.qcow2, linked here for the rebase); rebase it onto the template's, so that deleting
                # that snapshot never breaks this one
                _link_or_copy(base, os.path.join(work, SNAPSHOT_BASE))
                await asyncio.to_thread(_rebase_onto_template, os.path.join(work, "disk.qcow2"))
                os.unlink(os.path.join(work, SNAPSHOT_BASE))
            os.chmod(os.path.join(work, "disk.qcow2"), 0o444)
            info = {"id": snap_id, "state_bytes": os.path.getsize(state),
                    "disk_bytes": os.stat(os.path.join(work, "disk.qcow2")).st_blocks * 512,
                    "pause_ms": round(pause_ms, 1)}
            _write_json(os.path.join(work, "meta.json"), {**info, "spec": ref.spec.to_dict(), "created": time.time()})
            os.rename(work, final)
            return info
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    @staticmethod
    def delete_memory_snapshot(snapshot_id: str) -> None:
        shutil.rmtree(snapshot_dir(snapshot_id), ignore_errors=True)

    def _pause_when_idle(self, ref: SandboxRef) -> None:
        """Pause this warm pool member (QMP ``stop``: no CPU while it waits; TCG's translations are kept) if
        nothing takes it (``_claim``) within ``PAUSE_IDLE_S``."""
        import asyncio

        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._idle_timers.pop(ref.id, None)
            task = loop.create_task(self._pause(ref))
            self._pausing[ref.id] = task
            task.add_done_callback(lambda _t: self._pausing.pop(ref.id, None))

        self._idle_timers[ref.id] = loop.call_later(PAUSE_IDLE_S, fire)

    async def _pause(self, ref: SandboxRef) -> None:
        run_dir = self._dir(ref)
        path = os.path.join(run_dir, "meta.json")
        meta = _read_json(path)
        if meta is None:
            return
        # marked first: a VM marked paused that still runs only gets a harmless cont + clock set
        meta["paused"] = True
        _write_json(path, meta)
        try:
            await _qmp_command(run_dir, "stop")
        except Exception:  # removed meanwhile (or QEMU died: the hand-out check finds out)
            pass

    async def _claim(self, ref: SandboxRef) -> None:
        """The sandbox is taken (leased, used): no idle pause any more, and one under way is waited for."""
        import asyncio

        timer = self._idle_timers.pop(ref.id, None)
        if timer is not None:
            timer.cancel()
        task = self._pausing.get(ref.id)
        if task is not None:
            await asyncio.shield(task)

    async def _resume(self, ref: SandboxRef) -> bool:
        """Continue a paused pool member (``_boot``'s ``member``): QMP ``cont`` and, in parallel, the agent
        sets the guest's clock (it stood still while the VM was paused). Returns whether the VM was paused.
        Every way in to a sandbox (hand-out check, lease, agent client) calls it first."""
        import asyncio

        await self._claim(ref)
        run_dir = self._dir(ref)
        path = os.path.join(run_dir, "meta.json")
        meta = _read_json(path)
        if not meta or not meta.get("paused"):
            return False
        # the clock is sent while QEMU continues the VM (the guest reads it once it runs); its RNG was re-seeded
        # when it was restored, and a pause changes nothing there
        for r in await asyncio.gather(_reseed_port(os.path.join(run_dir, "agent.sock")),
                                      _qmp_command(run_dir, "cont"), return_exceptions=True):
            if isinstance(r, BaseException):
                raise r
        meta["paused"] = False
        _write_json(path, meta)
        return True

    # -- agent access --
    async def _client(self, ref: SandboxRef):
        """An agent client for ``ref``: the port takes one host session at a time, so concurrent users in
        this process share one (``PortSessions``: the client's API, ``close`` releases it)."""
        from ..agent.client import AgentClient
        from ._agentconns import PortSessions

        if self._sessions is None:
            self._sessions = PortSessions()
        run_dir = self._dir(ref)
        timeout = 10.0

        async def connect():
            await self._resume(ref)
            return await AgentClient.connect(PortTransport(os.path.join(run_dir, "agent.sock")), timeout=timeout)

        try:
            return await self._sessions.open(ref.id, connect)
        except (TimeoutError, OSError):
            state = await self.status(ref)
            if state == "missing":
                raise NotFound(f"sandbox {ref.spec.name or ref.id} no longer exists in qemu") from None
            if state == "running":
                raise SandboxError(f"sandbox {ref.spec.name or ref.id}: the VM's agent port did not take a session "
                                   f"within {timeout:.0f} s (it serves one process at a time: another process may "
                                   "hold it)") from None
            from ..errors import InvalidState

            raise InvalidState(f"sandbox {ref.spec.name or ref.id} is not running (state: {state})",
                               hint=f"agentkernel start {ref.spec.name or ref.id}") from None

    def _env(self, ref: SandboxRef) -> dict[str, str] | None:
        meta = _read_json(os.path.join(self._dir(ref), "meta.json")) or {}
        return meta.get("env")

    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        from ..agent.client import AgentConnectionLost
        from ._agentexec import exec_via_agent

        client = await self._client(ref)
        try:
            return await exec_via_agent(client, ref.spec, req, self._env(ref))
        except AgentConnectionLost:
            raise SandboxError(f"sandbox {ref.spec.name or ref.id}: the VM died while the command ran "
                               f"(state: {await self.status(ref)})") from None
        finally:
            await client.close()

    def _owner(self, ref: SandboxRef) -> tuple[int, int] | None:
        uid, _, gid = ref.spec.policy.user.partition(":")
        return None if uid == "0" else (int(uid), int(gid or uid))

    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        from ._agent_container import agent_write_file

        return await agent_write_file(lambda: self._client(ref), ref, path, data, mode, owner=self._owner(ref))

    def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        from ._agent_container import agent_read_file

        return agent_read_file(lambda: self._client(ref), ref, path)

    async def healthy(self, ref: SandboxRef) -> bool:
        """Pool hand-out check: a paused member continues (``_resume``: its agent answered), else the agent
        answers a HELLO on its port (one round trip)."""
        try:
            if await self._resume(ref):
                return True
        except Exception:
            return False
        try:
            _, writer = await PortTransport(os.path.join(self._dir(ref), "agent.sock"), 2.0).connect()
        except (TimeoutError, OSError):
            return False
        writer.close()
        return True

    # -- AgentAccess --
    async def agent_endpoint(self, ref: SandboxRef) -> dict[str, Any]:
        """A client runs one command through the VM's agent port itself (the policy is the agent's own)."""
        await self._resume(ref)
        return {"socket": os.path.join(self._dir(ref), "agent.sock"), "env": self._env(ref) or {},
                "cwd": ref.spec.workdir}

    async def open_agent(self, ref: SandboxRef):
        return await self._client(ref)

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        """Everything of a sandbox is in its run dir, named by its id (claimed before it exists)."""
        return {"dir": os.path.join(sandboxes_dir(), sandbox_id)}

    async def stop(self, ref: SandboxRef) -> None:
        run_dir = self._dir(ref)
        if vm_pid(run_dir) is not None:
            try:  # flush the guest's page cache to its disk before the power goes
                await self.exec(ref, ExecRequest(["sync"], timeout=10))
            except Exception:
                pass
            await kill_vm(run_dir, grace=1.0)
        meta = _read_json(os.path.join(run_dir, "meta.json"))
        if meta is not None:
            meta["state"] = "stopped"
            _write_json(os.path.join(run_dir, "meta.json"), meta)

    async def remove(self, ref: SandboxRef) -> None:
        import asyncio
        run_dir = self._dir(ref)
        await self._claim(ref)
        if not os.path.isdir(run_dir):
            return
        ms = await kill_vm(run_dir)
        ref.handle["shutdown_ms"] = round(ms, 2)
        await asyncio.to_thread(shutil.rmtree, run_dir, True)

    async def status(self, ref: SandboxRef) -> str:
        run_dir = self._dir(ref)
        meta = _read_json(os.path.join(run_dir, "meta.json"))
        if meta is None:
            return "missing"
        if vm_pid(run_dir) is not None:
            return "running"
        return "created" if meta.get("state") == "created" else "stopped"

    async def list(self) -> list[SandboxInfo]:
        out = []
        base = sandboxes_dir()
        for sid in sorted(os.listdir(base)):
            d = os.path.join(base, sid)
            meta = _read_json(os.path.join(d, "meta.json"))
            if meta is None:
                if os.path.isdir(d) and time.time() - os.path.getmtime(d) > 60:  # a create that died half-way
                    out.append(SandboxInfo(self.name, sid, None, "broken", {"dir": d},
                                           {"agentkernel.managed": "true", "agentkernel.sandbox-id": sid}))
                continue
            labels = dict(meta.get("labels") or {})
            status = "running" if vm_pid(d) is not None else (
                "created" if meta.get("state") == "created" else "stopped")
            out.append(SandboxInfo(self.name, sid, labels.get(LABEL_NAME), status, {"dir": d}, labels))
        return out

    # -- the CLI's one-shot: the same sandbox as create + start + exec + remove, without asyncio --
    def run_oneshot(self, spec, argv: list[str], stdio, timeout: float | None, *, sandbox_id: str,
                    owner: dict[str, Any]) -> Outcome:
        """One command in a fresh VM (restored from the template, from ``restore=<id>``, or cold booted
        with ``snapshot=off``), re-seeded before the command, on one agent session; then the VM is killed
        and its run dir deleted, whatever happens. Only a template that does not exist yet is made the
        asyncio way (once per image/spec). A VM the CLI started early for this sandbox id
        (``vm.prelaunch``) is used only if it is exactly the one this would start; else it is removed."""
        from ..agent.sync_client import SyncAgentClient
        from ..vm import guestimage

        early = prelaunch.take(self.name, sandbox_id)
        run_dir = os.path.join(sandboxes_dir(), sandbox_id)
        try:
            plan = self._plan_sync(spec)
            if len(os.path.join(run_dir, "agent.sock")) > 100:
                raise SandboxError(f"run dir path too long for a unix socket: {run_dir}")
            tdir = None
            if self.restore_from is not None:
                tdir = snapshot_dir(self.restore_from)
                if not os.path.exists(os.path.join(tdir, "state")):
                    raise NotFound(f"no qemu memory snapshot {self.restore_from}")
            elif self.snapshot == "on":
                tdir = os.path.join(templates_dir(), plan.template_key)
                if not os.path.exists(os.path.join(tdir, "state")):
                    import asyncio

                    tdir = asyncio.run(self._template(plan))
            meta = {"id": sandbox_id, "labels": owner_labels(sandbox_id, owner, spec.name), "state": "running",
                    "spec": spec.to_dict(), "template": plan.template_key, "created": time.time(), "env": plan.env}
            sock = None
            if early is not None and self._adoptable(early, plan, run_dir, tdir):
                _write_json(os.path.join(run_dir, "meta.json"), meta)
                sock = self._adopt(early)  # None: it failed to start; removed, and started again below
            if early is not None and sock is None:
                early.kill()
                shutil.rmtree(run_dir, ignore_errors=True)
                early = None
            if sock is None:
                os.mkdir(run_dir, 0o700)
                _write_json(os.path.join(run_dir, "meta.json"), meta)
                disk = os.path.join(run_dir, "disk.qcow2")
                if self.restore_from is not None:
                    _snapshot_overlay(tdir, run_dir)
                elif tdir is not None:
                    _clone_overlay(tdir, disk)
                else:
                    guestimage.overlay(plan.guest["rootfs"]["path"], disk)
                sock = self._boot_sync(plan, run_dir, disk, tdir, remember=self.restore_from is None)
            client = SyncAgentClient(sock)
            try:
                if tdir is not None:  # a restored clone: fresh entropy and the real time first
                    client.reseed(os.urandom(256), time_ns=time.time_ns(), timeout=30.0)
                code, sig, timed_out, oom, error = client.exec_stream(
                    argv, env=plan.env, cwd=spec.workdir, timeout=timeout,
                    stdin_fd=stdio.stdin if stdio.forward_stdin else None, stdout_fd=stdio.stdout,
                    stderr_fd=stdio.stderr)
            except ConnectionError:
                raise SandboxError(f"sandbox {sandbox_id}: the VM died while the command ran") from None
            finally:
                client.close()
            note = error if error and code in (126, 127) else None
            return Outcome(code, signal=sig or None, timed_out=bool(timed_out), oom=bool(oom), note=note)
        finally:
            if early is not None:
                early.kill()
            kill_vm_sync(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)

    @staticmethod
    def _adoptable(early: prelaunch.Early, plan: GuestPlan, run_dir: str, tdir: str | None) -> bool:
        """Whether the early VM is the template restore this run would start (``prelaunch.matches``)."""
        if tdir is None or early.run_dir != run_dir or early.fds is None or not tdir.startswith(templates_dir()):
            return False
        ram = os.path.join(tdir, "ram")
        argv = plan.argv(run_dir, os.path.join(run_dir, "disk.qcow2"), ram=ram if os.path.exists(ram) else None,
                         incoming=True, listen_fds=early.fds)
        return prelaunch.matches(early, argv, os.path.join(tdir, "state"))

    @staticmethod
    def _adopt(early: prelaunch.Early):
        """The early VM's agent socket, synced, once its device state is loaded and its agent answered our
        HELLO (both were sent when it was started); None if it failed to get there (the caller removes it
        and starts one the ordinary way, which reports what goes wrong)."""
        early.qemu_pid()
        shared_ram = any(a.startswith("memory-backend-file,") for a in early.argv)
        try:
            _qmp_replies_sync(early.qmp, 3 if shared_ram else 2, BOOT_TIMEOUT)
            sock, early.agent = early.agent, None
            return PortTransport(os.path.join(early.run_dir, "agent.sock"), timeout=BOOT_TIMEOUT).synced(sock)
        except (OSError, TimeoutError, ValueError, SandboxError):
            return None

    def _boot_sync(self, plan: GuestPlan, run_dir: str, disk: str, template: str | None, *, remember: bool = False):
        """``_boot`` without asyncio; returns the agent's socket, synced (``PortTransport.connect_sync``).
        ``remember``: a template restore, recorded for the CLI's next identical run (``prelaunch.remember``)."""
        incoming = template is not None
        ram = state = None
        if incoming:
            ram = os.path.join(template, "ram")
            if not os.path.exists(ram):
                ram = None  # a snapshot of a running sandbox: its RAM is in the state stream
            state = os.path.join(template, "state")
        socks, fds = prelaunch.listeners(run_dir)
        try:
            argv = plan.argv(run_dir, disk, ram=ram, incoming=incoming, listen_fds=fds)
            shell = prelaunch.spawn(argv, run_dir, state, fds)
        finally:
            for sk in socks:
                sk.close()
            for fd in fds:
                os.close(fd)
        qpid = prelaunch.shell_result(*shell)

        def died() -> SandboxError:
            return SandboxError("QEMU exited while starting: "
                                f"{_tail(os.path.join(run_dir, 'qemu.log'))} "
                                f"{_console(run_dir)}".strip())

        deadline = time.monotonic() + BOOT_TIMEOUT
        if incoming:
            try:
                _qmp_incoming_sync(os.path.join(run_dir, "qmp.sock"), shared_ram=ram is not None,
                                   timeout=BOOT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                if not _alive(qpid):
                    raise died() from None
                raise SandboxError(f"QEMU's QMP did not answer: {exc}") from None
            if remember:
                prelaunch.remember(argv, run_dir, fds, state=state, overlay=os.path.join(template, "overlay.qcow2"),
                                   shared_ram=ram is not None)
        while True:
            if not _alive(qpid):
                raise died()
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(f"the guest agent did not answer within {BOOT_TIMEOUT:.0f} s: "
                                   f"{_console(run_dir)}")
            try:
                return PortTransport(os.path.join(run_dir, "agent.sock"), timeout=max(0.5, left)).connect_sync()
            except (TimeoutError, OSError):
                time.sleep(0.01)

    async def run(self, spec, req: ExecRequest, *, sandbox_id: str, owner: dict[str, Any]) -> ExecResult:
        """One-shot, with the VM's phase timings (process, boot, ready, exec, shutdown) in the result."""
        ref, result = await self.run_timed(spec, req, sandbox_id=sandbox_id, owner=owner)
        t = result.timings
        phases = ref.handle.get("timings") or {}
        agent_ms = float(phases.get("agent_ms", 0.0))
        t.update({
            # the reference's phase table: boot = until the guest's agent answers (create, disk overlay,
            # QEMU start, kernel boot or snapshot restore), ready = the agent made usable (re-seeded),
            # exec = the command, shutdown = the VM killed and its run dir deleted
            "boot_ms": t["create_ms"] + t["start_ms"] - agent_ms, "ready_ms": agent_ms, "shutdown_ms": t["remove_ms"],
            **{f"vm_{k}": v for k, v in phases.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "vm_restored": 1.0 if phases.get("restored") else 0.0, "vm_shutdown_ms": ref.handle.get("shutdown_ms", 0.0),
        })
        return result
