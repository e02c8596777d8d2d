"""Guest images for the microVM backends, built offline and cached by content.

A guest image is three files under ``<cache>/vm``:

- **kernel**: Debian's cloud kernel package (``linux-image-<ver>-cloud-amd64``: virtio drivers as modules,
  no graphics/sound), taken from apt's cache or fetched with ``apt-get download``; keyed by the .deb's
  sha256. ``vmlinuz`` is the bzImage QEMU boots; ``vmlinux`` (an ELF, for Firecracker) is extracted on
  demand from the bzImage's compressed payload.
- **initramfs**: a newc cpio with the static agent as ``/init`` (``ak-agent vm-init``), the virtio modules
  the root disk and the agent port need (loaded in dependency order) and the compiled seccomp programs;
  keyed by agent + kernel + seccomp programs.
- **root filesystem**: an ext4 image made with ``mkfs.ext4 -d`` from the unpacked OCI image (the same
  unpack the ``oci`` backend uses: podman's or docker's local store); keyed by the image id. It is a
  read-only base: every sandbox boots from its own qcow2 overlay on top (``overlay``), never from the
  base itself.

``build(image)`` makes whatever is missing, printing one progress line per step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from .. import paths
from ..errors import BackendUnavailable, SandboxError

BUILDER_VERSION = "2"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# dependency order: virtio_ring before virtio, the transports and drivers after them
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk",
           "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")  # vsock: Firecracker
ROOT_FREE_MB = 1024  # writable space left in a root filesystem (sparse: costs nothing until used)
AGENT_PORT = "name:ak.agent"  # the virtio-serial port the agent serves (found by name in sysfs)
SECCOMP_PROFILES = ("default", "restrictive")


def vm_dir() -> str:
    d = os.path.join(paths.cache_dir(), "vm")
    os.makedirs(d, exist_ok=True)
    return d


def _say(msg: str) -> None:
    sys.stderr.write(f"    {msg}\n")
    sys.stderr.flush()


class _Step:
    """One progress line per build step, with its duration."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet = label, quiet

    def __enter__(self) -> _Step:
        self.t0 = time.monotonic()
        if not self.quiet:
            sys.stderr.write(f"==> {self.label}\n")
            sys.stderr.flush()
        return self

    def __exit__(self, et, *exc) -> None:
        if not self.quiet and et is None:
            _say(f"done in {time.monotonic() - self.t0:.1f} s")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, **kw)
    except FileNotFoundError:
        raise BackendUnavailable(f"{argv[0]} is not installed",
                                 hint="bash scripts/setup.sh (installs qemu-utils, e2fsprogs, lz4)") from None
    if r.returncode != 0:
        err = (r.stderr or b"").decode(errors="replace").strip()[-600:]
        raise SandboxError(f"{' '.join(argv[:3])} failed (exit {r.returncode}): {err}")
    return r


# ---- kernel -------------------------------------------------------------------------------------------


def _newest(cands: list[str]) -> str | None:
    return max(cands, key=os.path.getmtime) if cands else None


def _find_kernel_deb() -> str | None:
    import glob

    env = os.environ.get("AGENTKERNEL_VM_KERNEL_DEB")
    if env:
        if not os.path.isfile(env):
            raise BackendUnavailable(f"AGENTKERNEL_VM_KERNEL_DEB={env} is not a file")
        return env
    pat = "linux-image-[0-9]*-cloud-amd64_*_amd64.deb"
    own = _newest(glob.glob(os.path.join(vm_dir(), "debs", pat)))
    if own:
        return own
    # apt's cache holds thousands of files: remember the answer until that directory changes
    apt = "/var/cache/apt/archives"
    try:
        stamp = str(os.stat(apt).st_mtime_ns)
    except OSError:
        return None
    memo = os.path.join(vm_dir(), "apt-kernel-deb.memo")
    try:
        with open(memo) as f:
            seen, path = f.read().split("\n", 1)
        if seen == stamp and (path == "" or os.path.isfile(path)):
            return path or None
    except (OSError, ValueError):
        pass
    path = _newest(glob.glob(os.path.join(apt, pat)))
    tmp = f"{memo}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{stamp}\n{path or ''}")
    os.replace(tmp, memo)
    return path


def _download_kernel_deb() -> str:
    """apt-get download the versioned package the cloud kernel metapackage depends on."""
    r = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    pkg = next((ln.split(":", 1)[1].strip() for ln in r.stdout.decode().splitlines()
                if ln.strip().startswith("Depends:") and "linux-image-" in ln), None)
    if not pkg:
        raise BackendUnavailable(f"apt knows no {KERNEL_PACKAGE} package", hint="apt-get update")
    d = os.path.join(vm_dir(), "debs")
    os.makedirs(d, exist_ok=True)
    _run(["apt-get", "download", pkg], cwd=d)
    found = _find_kernel_deb()
    if not found:
        raise SandboxError(f"apt-get download {pkg} left no .deb in {d}")
    return found


def _deb_digest(deb: str) -> str:
    """sha256 of the .deb, remembered by (path, size, mtime) so a start does not hash 26 MB each time."""
    st = os.stat(deb)
    stamp = hashlib.sha256(f"{os.path.realpath(deb)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = os.path.join(vm_dir(), f"deb-{stamp}.sha256")
    try:
        with open(memo) as f:
            return f.read().strip()
    except OSError:
        pass
    digest = _sha256_file(deb)
    tmp = f"{memo}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(digest)
    os.replace(tmp, memo)
    return digest


def ensure_kernel(*, quiet: bool = False) -> dict:
    """The unpacked guest kernel: {"dir", "vmlinuz", "modules", "version", "key"}."""
    deb = _find_kernel_deb()
    if deb is None:
        with _Step(f"fetching the guest kernel ({KERNEL_PACKAGE})", quiet):
            deb = _download_kernel_deb()
    key = hashlib.sha256(f"{_deb_digest(deb)}|{BUILDER_VERSION}|{','.join(MODULES)}".encode()).hexdigest()[:16]
    out = os.path.join(vm_dir(), f"kernel-{key}")
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    with _Step(f"unpacking the guest kernel {os.path.basename(deb)}", quiet):
        tmp = f"{out}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        x = os.path.join(tmp, "x")
        os.makedirs(x)
        _run(["dpkg-deb", "-x", deb, x])
        boot = os.path.join(x, "boot")
        vmlinuz = next((f for f in os.listdir(boot) if f.startswith("vmlinuz-")), None)
        if vmlinuz is None:
            raise SandboxError(f"{deb} has no /boot/vmlinuz-*")
        version = vmlinuz[len("vmlinuz-"):]
        shutil.copy(os.path.join(boot, vmlinuz), os.path.join(tmp, "vmlinuz"))
        shutil.copy(os.path.join(boot, f"config-{version}"), os.path.join(tmp, "config"))
        moddir = os.path.join(tmp, "modules")
        os.makedirs(moddir)
        kos = {}
        for root, _, files in os.walk(os.path.join(x, "lib", "modules", version)):
            for fn in files:
                if fn.endswith(".ko") and fn[:-3] in MODULES:
                    kos[fn[:-3]] = os.path.join(root, fn)
        with open(os.path.join(tmp, "config")) as f:
            config = f.read()
        order = []
        for m in MODULES:
            if m in kos:
                shutil.copy(kos[m], os.path.join(moddir, f"{m}.ko"))
                order.append(f"{m}.ko")
            elif f"CONFIG_{m.upper()}=y" not in config and not (m == "virtio_ring" and "CONFIG_VIRTIO=y" in config):
                raise SandboxError(f"the guest kernel {version} has module {m} neither built in nor as a file")
        with open(os.path.join(moddir, "order"), "w") as f:
            f.write("".join(f"{o}\n" for o in order))
        shutil.rmtree(x)
        meta = {"dir": out, "vmlinuz": os.path.join(out, "vmlinuz"), "modules": os.path.join(out, "modules"),
                "version": version, "key": key, "deb": os.path.basename(deb)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.exists(out):  # a concurrent build won
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    return meta


def ensure_vmlinux(kernel: dict) -> str:
    """The kernel as an uncompressed ELF (Firecracker boots only that): the bzImage's payload, found
    through its setup header (payload_offset/payload_length), decompressed."""
    out = os.path.join(kernel["dir"], "vmlinux")
    if os.path.exists(out):
        return out
    with open(kernel["vmlinuz"], "rb") as f:
        img = f.read()
    if img[0x202:0x206] != b"HdrS":
        raise SandboxError(f"{kernel['vmlinuz']} is not a bzImage")
    setup_sects = img[0x1F1] or 4
    off = int.from_bytes(img[0x248:0x24C], "little")
    length = int.from_bytes(img[0x24C:0x250], "little")
    start = (setup_sects + 1) * 512 + off
    payload = img[start:start + length]
    if payload[:2] == b"\x1f\x8b":
        import gzip

        elf = gzip.decompress(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        import lzma

        elf = lzma.decompress(payload)
    elif payload[:4] in (b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18"):
        # the kernel build appends the uncompressed size (le32) after the lz4 stream: not a block
        elf = _run(["lz4", "-dc"], input=payload[:-4]).stdout
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        elf = _run(["zstd", "-dc"], input=payload).stdout
    else:
        raise SandboxError(f"unknown kernel payload compression (magic {payload[:4].hex()})")
    # lz4 -dc of a legacy frame may carry trailing padding; the ELF header tells its real use
    if elf[:4] != b"\x7fELF":
        raise SandboxError("the kernel payload is not an ELF image")
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(elf)
    os.replace(tmp, out)
    return out


def restore_kernel(kernel: dict) -> str:
    """What a QEMU that restores a snapshot is given as ``-kernel``: the bzImage's setup sectors and its
    first 4 KiB of payload (``vmlinuz.restore``). QEMU reads the whole ``-kernel`` file into fw_cfg at start
    (the full 14 MB one: ~10 ms of CPU and ~3,500 page faults per start), but a restored guest runs the
    kernel in its RAM and never reads fw_cfg again; the option ROM that fw_cfg boot needs, which *is* part
    of the migrated machine, is the same whatever the kernel. Falls back to the full kernel where the stub
    cannot be written."""
    out = os.path.join(kernel["dir"], "vmlinuz.restore")
    if os.path.exists(out):
        return out
    with open(kernel["vmlinuz"], "rb") as f:
        head = f.read(64 << 10)
    if head[0x202:0x206] != b"HdrS":
        return kernel["vmlinuz"]
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head[:((head[0x1F1] or 4) + 1) * 512 + 4096])
        os.replace(tmp, out)
    except OSError:
        return kernel["vmlinuz"]
    return out


# ---- initramfs ------------------------------------------------------------------------------------------


def _seccomp_programs() -> dict[str, bytes]:
    """Compiled seccomp programs (classic BPF, as crun generates them for the policy's profiles).
    Missing ones (no crun here) are simply absent: the backend then refuses those policies."""
    import base64

    from ..oci import runtime as rt
    from ..oci import seccomp_oci

    crun = rt.binary("crun")
    out: dict[str, bytes] = {}
    if not crun:
        return out
    for name in SECCOMP_PROFILES:
        b64 = seccomp_oci.crun_bpf_b64(name, crun)
        if b64:
            bpf = base64.b64decode(b64)
            if bpf and len(bpf) % 8 == 0:
                out[name] = bpf
    return out


def ensure_initramfs(kernel: dict, *, quiet: bool = False) -> dict:
    """{"path", "key", "seccomp": [profile names carried]}"""
    from .cpio import NewcWriter

    agent = paths.agent_binary()
    if agent is None:
        raise BackendUnavailable("the in-sandbox agent binary is missing", hint="make -C agent")
    with open(agent, "rb") as f:
        agent_bytes = f.read()
    bpfs = _seccomp_programs()
    h = hashlib.sha256(f"{BUILDER_VERSION}|{kernel['key']}|".encode())
    h.update(agent_bytes)
    for name in sorted(bpfs):
        h.update(name.encode() + bpfs[name])
    key = h.hexdigest()[:16]
    path = os.path.join(vm_dir(), f"initramfs-{key}.cpio")
    info = {"path": path, "key": key, "seccomp": sorted(bpfs)}
    if os.path.exists(path):
        return info
    with _Step("writing the initramfs (agent as /init, virtio modules, seccomp programs)", quiet):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            w = NewcWriter(f)
            for d in ("dev", "proc", "sys", "newroot", "ak", "ak/modules", "ak/seccomp"):
                w.dir(d)
            w.chardev("dev/console", 5, 1)
            w.chardev("dev/null", 1, 3, 0o666)
            w.file("init", agent_bytes, 0o755)
            with open(os.path.join(kernel["modules"], "order")) as o:
                order = o.read()
            w.file("ak/modules/order", order.encode())
            for ko in order.split():
                with open(os.path.join(kernel["modules"], ko), "rb") as m:
                    w.file(f"ak/modules/{ko}", m.read())
            for name, bpf in sorted(bpfs.items()):
                w.file(f"ak/seccomp/{name}.bpf", bpf)
            w.close()
        os.replace(tmp, path)
    return info


# ---- root filesystem ------------------------------------------------------------------------------------


def _du_bytes(root: str) -> int:
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for fn in files + dirs:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_blocks * 512
            except OSError:
                pass
    return total


def ensure_rootfs(image: str, *, quiet: bool = False) -> dict:
    """{"path" (ext4, read-only base), "key", "image_id", "env", "workdir", "homes"}"""
    from ..oci import rootfs

    rf = rootfs.resolve(image, quiet=quiet)
    key = hashlib.sha256(f"{BUILDER_VERSION}|{rf.id}".encode()).hexdigest()[:16]
    path = os.path.join(vm_dir(), f"rootfs-{key}.ext4")
    info = {"path": path, "key": key, "image": image, "image_id": rf.id, "env": list(rf.env),
            "workdir": rf.workdir, "homes": dict(rf.homes)}
    if os.path.exists(path):
        return info
    with _Step(f"making the ext4 root filesystem of {image}", quiet):
        used = _du_bytes(rf.path)
        size_mb = int(used * 1.2 / 2**20) + 64 + ROOT_FREE_MB
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.truncate(size_mb * 2**20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "akroot", "-m", "0", "-E", "root_owner=0:0", "-d", rf.path, tmp])
        os.chmod(tmp, 0o444)  # a shared base: only ever the backing file of per-sandbox overlays
        os.replace(tmp, path)
        if not quiet:
            _say(f"{path}: {used / 2**20:.0f} MiB of files, {size_mb} MiB file system (sparse)")
    return info


def build(image: str, *, quiet: bool = False) -> dict:
    """Everything a VM of ``image`` boots from: {"kernel", "initramfs", "rootfs", "key"}."""
    kernel = ensure_kernel(quiet=quiet)
    initrd = ensure_initramfs(kernel, quiet=quiet)
    root = ensure_rootfs(image, quiet=quiet)
    key = hashlib.sha256(f"{kernel['key']}|{initrd['key']}|{root['key']}".encode()).hexdigest()[:16]
    return {"kernel": kernel, "initramfs": initrd, "rootfs": root, "key": key}


def overlay(base: str, dest: str, *, backing_format: str = "raw") -> None:
    """A copy-on-write qcow2 disk over ``base`` (which is never written). A relative ``base`` is stored
    as given and resolved against the overlay's own directory (by qemu-img here, by QEMU when opened)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", base, dest])


def build_cli(images: list[str]) -> int:
    """``agentkernel images build --vm [IMAGE ...]``."""
    from ..errors import AgentKernelError, print_error

    images = images or ["agentkernel/busybox"]
    try:
        for image in images:
            t0 = time.monotonic()
            g = build(image)
            progs = ", ".join(g["initramfs"]["seccomp"]) or "none"
            _say(f"{image}: guest image {g['key']} ready in {time.monotonic() - t0:.1f} s "
                 f"(kernel {g['kernel']['version']}, seccomp programs: {progs})")
    except AgentKernelError as exc:
        print_error(exc)
        return 1
    return 0
