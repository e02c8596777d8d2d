"""What every figure is labelled with: the machine, the tool versions, the git commit, the date.

Each probe is best-effort and bounded (a missing tool is ``null``, never an error): the benchmark must
run on a host where some engines are absent.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

from .. import paths


def _run(argv: list[str], timeout: float = 15) -> str | None:
    exe = shutil.which(argv[0]) if not os.path.isabs(argv[0]) else argv[0]
    if not exe or not os.path.exists(exe):
        return None
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    out = (r.stdout or r.stderr).strip()
    return out.splitlines()[0].strip() if out else None


def _cpuinfo() -> tuple[str | None, list[str]]:
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and model is None:
                    model = v.strip()
                elif k == "flags" and not flags:
                    flags = v.split()
    except OSError:
        pass
    return model, flags


def _meminfo_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _os_name() -> str | None:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def _virtualization(flags: list[str]) -> str:
    hw = "vmx" in flags or "svm" in flags
    pvm = False
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            pvm = any(line.strip() == "CONFIG_KVM_PVM=y" for line in f)
    except OSError:
        pass
    kvm = os.path.exists("/dev/kvm")
    if hw and kvm:
        return "hardware KVM"
    if kvm and pvm:
        return "PVM (paravirtualized KVM, no VT-x/AMD-V)"
    if kvm:
        return "/dev/kvm without VT-x/AMD-V flags"
    return "none"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    u = os.uname()
    return {
        "hostname": u.nodename,
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_mib": _meminfo_mib(),
        "kernel": u.release,
        "arch": u.machine,
        "os": _os_name(),
        "virtualization": _virtualization(flags),
        "cgroup": "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else
                  ("hybrid v1+v2" if os.path.isdir("/sys/fs/cgroup/unified") else "v1"),
        "loadavg_start": loadavg(),
    }


def _wasmtime_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("wasmtime")
    except Exception:
        return None


def versions() -> dict[str, Any]:
    from .. import __version__

    def strip(v: str | None, name: str) -> str | None:
        if v and v.lower().startswith(f"{name} version "):
            return v[len(name) + 9:].strip()
        return v

    docker_client = _run(["docker", "version", "--format", "{{.Client.Version}}"])
    docker_server = _run(["docker", "version", "--format", "{{.Server.Version}}"])
    return {
        "agentkernel": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "podman": _run(["podman", "version", "--format", "{{.Client.Version}}"]),
        "docker": docker_server,
        "docker_client": docker_client,
        "runsc": strip(_run(["runsc", "--version"]), "runsc"),
        "crun": strip(_run(["crun", "--version"]), "crun"),
        "runc": strip(_run(["runc", "--version"]), "runc"),
        "wasmtime": _wasmtime_version(),
        "qemu": strip(_run(["qemu-system-x86_64", "--version"]), "qemu emulator"),
    }


def git_info() -> dict[str, Any]:
    root = paths.repo_root()
    commit = _run(["git", "-C", root, "rev-parse", "HEAD"])
    dirty = None
    if commit:
        try:
            r = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=15)
            dirty = bool(r.stdout.strip()) if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            dirty = None
    return {"commit": commit, "dirty": dirty}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def short_label(machine: dict[str, Any]) -> str:
    """One line naming the machine, for chart titles and table captions."""
    cpu = (machine.get("cpu_model") or "unknown CPU").replace("(R)", "").replace("(TM)", "")
    mem = machine.get("memory_mib")
    mem_s = f", {mem / 1024:.0f} GiB" if mem else ""
    return f"{cpu} ({machine.get('cores')} cores{mem_s}), Linux {machine.get('kernel')}"
