"""Can an ordinary (non-PVM) guest run on this host's /dev/kvm? Decided in about a millisecond.

``/dev/kvm`` existing is not enough: on a host that is itself a PVM guest, KVM_CREATE_VM works but an
ordinary guest kernel runs through KVM's instruction emulator and dies on its first SSE instruction
(KVM_EXIT_INTERNAL_ERROR). So the probe runs a real guest: one vCPU in real mode with CR4.OSFXSR set
executes ``xorps xmm0, xmm0`` then ``hlt``. KVM_EXIT_HLT means hardware virtualization works; anything
else (an internal error, a failed ioctl, a missing device) is the reason it does not. The answer is
cached per boot (``<runtime dir>/kvm-probe.json``).

Used by ``doctor``, the ``qemu`` backend (``-accel kvm`` or TCG), the ``firecracker`` backend (refuses
at once without it) and the wasm backend's hyperlight mode. Standard library only.
"""

from __future__ import annotations

import json
import os

# ioctl numbers (linux/kvm.h, x86_64)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_RUN = 0xAE80
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84

KVM_EXIT_HLT = 5
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {0: "UNKNOWN", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 17: "INTERNAL_ERROR"}

GUEST_CODE = bytes.fromhex("0f57c0" "f4")  # xorps xmm0, xmm0 ; hlt
GUEST_ADDR = 0x1000
CACHE_VERSION = 1


class KvmVerdict:
    __slots__ = ("detail", "ok", "pvm", "reason")

    def __init__(self, ok: bool, reason: str, *, pvm: bool = False, detail: str = "") -> None:
        self.ok = ok
        self.reason = reason
        self.pvm = pvm
        self.detail = detail

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "pvm": self.pvm, "detail": self.detail}

    def __repr__(self) -> str:
        return f"KvmVerdict(ok={self.ok}, reason={self.reason!r})"


def kernel_is_pvm() -> bool:
    """CONFIG_KVM_PVM=y in /proc/config.gz: this host's KVM is the PVM flavour (explains a failure)."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return any(line.startswith("CONFIG_KVM_PVM=y") for line in f)
    except OSError:
        return False


def _run_guest() -> KvmVerdict:
    import ctypes
    import fcntl
    import mmap
    import struct

    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return KvmVerdict(False, "no /dev/kvm (no KVM in this kernel, or not exposed to this machine)")
    except PermissionError:
        return KvmVerdict(False, "/dev/kvm is not accessible to this user (add it to the kvm group)")
    fds = [kvm]
    try:
        ver = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
        if ver != 12:
            return KvmVerdict(False, f"unexpected KVM API version {ver}")
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        mem = mmap.mmap(-1, 0x1000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        mem[: len(GUEST_CODE)] = GUEST_CODE
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("=IIQQQ", 0, 0, GUEST_ADDR, 0x1000, addr))
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector
        cr0 = struct.unpack_from("=Q", sregs, 224)[0] & ~0x4  # CR0.EM off
        struct.pack_into("=Q", sregs, 224, cr0 | 0x2)  # CR0.MP
        cr4 = struct.unpack_from("=Q", sregs, 248)[0]
        struct.pack_into("=Q", sregs, 248, cr4 | 0x200 | 0x400)  # CR4.OSFXSR | OSXMMEXCPT
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = [0] * 18
        regs[16], regs[17] = GUEST_ADDR, 0x2  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, struct.pack("=18Q", *regs))
        try:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
        except OSError as exc:
            return KvmVerdict(False, f"KVM_RUN failed: {exc.strerror}")
        exit_reason = struct.unpack_from("=I", run, 8)[0]
        if exit_reason == KVM_EXIT_HLT:
            return KvmVerdict(True, "hardware virtualization works (a test guest ran an SSE instruction and halted)")
        detail = f"exit {EXIT_NAMES.get(exit_reason, exit_reason)}"
        if exit_reason == KVM_EXIT_INTERNAL_ERROR:
            detail += f" (suberror {struct.unpack_from('=I', run, 32)[0]})"
        pvm = kernel_is_pvm()
        why = ("this host's KVM is PVM (CONFIG_KVM_PVM=y: the host is itself a VM); only PVM-aware guest "
               "kernels run, an ordinary guest dies on its first SSE instruction") if pvm else \
            "/dev/kvm cannot run an ordinary guest (a test guest's SSE instruction failed)"
        return KvmVerdict(False, why, pvm=pvm, detail=detail)
    except OSError as exc:
        return KvmVerdict(False, f"KVM ioctl failed: {exc.strerror or exc}")
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _cache_path() -> str:
    from .. import paths

    return os.path.join(paths.runtime_dir(), "kvm-probe.json")


def probe(*, use_cache: bool = True) -> KvmVerdict:
    """The verdict for this boot (cached); ``use_cache=False`` runs the test guest again."""
    from ..owner import boot_id

    path = _cache_path()
    if use_cache:
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("boot") == boot_id() and d.get("v") == CACHE_VERSION:
                return KvmVerdict(d["ok"], d["reason"], pvm=d.get("pvm", False), detail=d.get("detail", ""))
        except (OSError, ValueError, KeyError):
            pass
    v = _run_guest()
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**v.to_dict(), "boot": boot_id(), "v": CACHE_VERSION}, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return v


if __name__ == "__main__":
    import sys
    import time

    t = time.perf_counter()
    v = probe(use_cache="--fresh" not in sys.argv)
    print(json.dumps({**v.to_dict(), "ms": round((time.perf_counter() - t) * 1e3, 3)}))
    sys.exit(0 if v.ok else 1)
