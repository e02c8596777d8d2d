"""``mode=hyperlight``: Wasm inside a Hyperlight micro-VM (a hypervisor boundary around the Wasm sandbox).

Hyperlight needs *hardware* virtualization: /dev/mshv (Hyper-V on Linux) or /dev/kvm backed by VT-x/AMD-V.
``probe()`` checks that without starting anything: on our machines /dev/kvm exists but is PVM
(``CONFIG_KVM_PVM=y``, no ``kvm_intel``/``kvm_amd``, no vmx/svm CPU flag), where Hyperlight's guest dies on
its first SSE instruction (``Unknown KVM VCPU exit: InternalError``), so the mode is refused with that
reason instead of failing obscurely.

Where it is available the mode runs through the PyPI package ``hyperlight-sandbox`` (plus
``hyperlight-sandbox-backend-wasm`` and ``hyperlight-sandbox-python-guest``): its packaged guest is a
CPython interpreter compiled for hyperlight-wasm, so the mode runs ``python3 -c CODE`` (and code on stdin),
not arbitrary modules or shell commands.
"""

from __future__ import annotations

import gzip
import os
import platform
import threading
from typing import Any

from ..errors import BackendUnavailable, MissingExtra, ValidationError

INSTALL_HINT = "pip install 'hyperlight-sandbox[wasm,python_guest]'"

_PROBE: tuple[bool, str, dict[str, Any]] | None = None
_LOCK = threading.Lock()


def _kernel_config() -> str:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()
    except OSError:
        pass
    try:
        with open(f"/boot/config-{platform.release()}") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe_hardware_virt(refresh: bool = False) -> tuple[bool, str, dict[str, Any]]:
    """(usable, reason, details) for hardware virtualization as Hyperlight needs it."""
    global _PROBE
    with _LOCK:
        if _PROBE is not None and not refresh:
            return _PROBE
        _PROBE = _probe()
        return _PROBE


def _probe() -> tuple[bool, str, dict[str, Any]]:
    details: dict[str, Any] = {}
    if os.path.exists("/dev/mshv"):
        try:
            fd = os.open("/dev/mshv", os.O_RDWR | os.O_CLOEXEC)
            os.close(fd)
            return True, "/dev/mshv (Microsoft Hypervisor) is usable", {"hypervisor": "mshv"}
        except OSError as exc:
            return False, f"/dev/mshv exists but cannot be opened: {exc.strerror}", {"hypervisor": "mshv"}
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm and no /dev/mshv: this host has no usable hypervisor", details
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}", details
    cfg = _kernel_config()
    flags = _cpu_flags()
    hw_flag = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    modules = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")]
    details.update({"cpu_flag": hw_flag, "kvm_modules": modules, "pvm": "CONFIG_KVM_PVM=y" in cfg})
    if "kvm_pvm" in modules or ("CONFIG_KVM_PVM=y" in cfg and not ({"kvm_intel", "kvm_amd"} & set(modules))):
        from ..vm import kvmprobe

        details["kvm_probe"] = kvmprobe.probe().to_dict()
        return False, ("/dev/kvm is PVM (CONFIG_KVM_PVM=y, no kvm_intel/kvm_amd): a paravirtualized KVM that only "
                       "runs PVM-aware guests; Hyperlight's micro-guest fails there with 'Unknown KVM VCPU exit: "
                       "InternalError'. hyperlight mode needs hardware KVM (VT-x/AMD-V) or /dev/mshv"), details
    if hw_flag is None:
        return False, ("/dev/kvm exists but the CPU shows no vmx/svm flag: KVM is not hardware-backed here "
                       "(nested virtualization off?)"), details
    if not ({"kvm_intel", "kvm_amd"} & set(modules)) and cfg and "CONFIG_KVM_INTEL=y" not in cfg \
            and "CONFIG_KVM_AMD=y" not in cfg:
        return False, "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded", details
    # the flags can lie (a nested or paravirtualized KVM): the shared probe runs a real test guest
    from ..vm import kvmprobe

    v = kvmprobe.probe()
    details["kvm_probe"] = v.to_dict()
    if not v.ok:
        return False, f"/dev/kvm cannot run Hyperlight's micro-guest: {v.reason}", details
    return True, f"hardware KVM ({hw_flag}) is usable ({v.reason})", details


def require_available() -> None:
    ok, reason, _ = probe_hardware_virt()
    if not ok:
        raise BackendUnavailable(f"wasm backend mode=hyperlight cannot run on this host: {reason}",
                                 hint="use the default mode (wasmtime) here, or a host with hardware KVM or mshv")


def _sandbox_class() -> Any:
    try:
        from hyperlight_sandbox import Sandbox
    except ImportError:
        raise MissingExtra("mode=hyperlight needs the Python package 'hyperlight-sandbox'", hint=INSTALL_HINT) from None
    return Sandbox


def code_of(argv: list[str], stdin: bytes) -> str:
    """The Python code of a ``python3 -c CODE`` / ``python3 -`` command line (the only form this mode runs)."""
    import os.path

    if os.path.basename(argv[0]) not in ("python", "python3", "python3.12"):
        raise ValidationError("mode=hyperlight runs Python code only (python3 -c CODE, or python3 - with code on "
                              f"stdin); got {argv[0]!r}")
    if len(argv) >= 3 and argv[1] == "-c":
        return argv[2]
    if (len(argv) == 2 and argv[1] == "-") or len(argv) == 1:
        return stdin.decode("utf-8", "replace")
    raise ValidationError("mode=hyperlight runs python3 -c CODE or python3 - (code on stdin)")


class HyperlightRunner:
    """One Hyperlight sandbox per runner; ``snapshot()`` after start-up, ``restore()`` before each run so
    every run starts from the same clean state (use-once semantics without a new micro-VM)."""

    def __init__(self, heap_size: str | None = None) -> None:
        require_available()
        cls = _sandbox_class()
        self._sb = cls(backend="wasm", module="python_guest.path", heap_size=heap_size)
        self._sb.run("pass")
        self._snap = self._sb.snapshot()
        self._lock = threading.Lock()

    def run(self, code: str) -> tuple[int, bytes, bytes]:
        with self._lock:
            self._sb.restore(self._snap)
            r = self._sb.run(code)
        return int(r.exit_code), str(r.stdout).encode(), str(r.stderr).encode()
