"""TEST TOOL. Runs the emulators' workloads (Kubernetes pods, Nomad allocations) as podman containers, so
commands exec'd through the emulated APIs really run. Nothing in agentkernel/ imports this."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

EMULATOR_LABEL = "agentkernel-emulator"


class ContainerError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class PodmanRunner:
    """``podman run -d`` per workload, ``podman exec`` per command, ``podman rm -f`` at the end."""

    def __init__(self, instance: str) -> None:
        self.instance = instance  # label value: everything this emulator started, for cleanup

    async def _podman(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec("podman", *args, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def run(self, name: str, image: str, *, command: list[str] | None, user: str | None, env: dict[str, str],
                  workdir: str | None, hostname: str | None, cap_drop_all: bool, no_new_privs: bool,
                  read_only: bool, tmpfs: list[tuple[str, int | None]], memory_bytes: int | None,
                  cpus: float | None, pids: int | None, network_none: bool, extra_labels: dict[str, str]) -> str:
        rc, _, _ = await self._podman("image", "exists", image)
        if rc != 0:
            raise ContainerError("ErrImagePull", f"image {image!r} is not present on this node (the emulator "
                                 "never pulls)")
        a = ["run", "-d", "--pull=never", "--name", name, "--label", f"{EMULATOR_LABEL}={self.instance}"]
        for k, v in extra_labels.items():
            a += ["--label", f"{k}={v}"]
        if user:
            a += ["--user", user]
        if cap_drop_all:
            a += ["--cap-drop", "ALL"]
        if no_new_privs:
            a += ["--security-opt", "no-new-privileges"]
        if read_only:
            a += ["--read-only", "--read-only-tmpfs=false"]
        for path, size in tmpfs:
            a += ["--tmpfs", f"{path}:rw,mode=1777" + (f",size={size}" if size else "")]
        if memory_bytes:
            a += ["--memory", str(memory_bytes), "--memory-swap", str(memory_bytes)]
        if cpus:
            a += ["--cpus", f"{cpus:.3f}"]
        if pids:
            a += ["--pids-limit", str(pids)]
        a += ["--network", "none" if network_none else "bridge"]
        if hostname:
            a += ["--hostname", hostname]
        if workdir:
            a += ["--workdir", workdir]
        for k, v in env.items():
            a += ["--env", f"{k}={v}"]
        if command:
            a += ["--entrypoint", json.dumps(command[:1]), image, *command[1:]]
        else:
            a.append(image)
        rc, out, err = await self._podman(*a)
        if rc != 0:
            await self._podman("rm", "-f", "-t", "0", "--ignore", name)
            raise ContainerError("RunContainerError", err.strip().splitlines()[-1] if err.strip() else "failed")
        return out.strip()

    async def state(self, cid: str) -> dict:
        rc, out, _ = await self._podman("inspect", "--type", "container", "--format", "json", cid)
        if rc != 0:
            return {}
        return json.loads(out)[0]["State"]

    async def exec(self, cid: str, argv: list[str], *, stdin: bool, tty: bool = False) -> asyncio.subprocess.Process:
        a = ["exec"]
        if stdin:
            a.append("-i")
        return await asyncio.create_subprocess_exec(
            "podman", *a, cid, *argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if tty else subprocess.PIPE)

    async def remove(self, cid: str) -> None:
        await self._podman("rm", "-f", "-t", "0", "--ignore", cid)

    def remove_all_sync(self) -> None:
        out = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={EMULATOR_LABEL}={self.instance}"],
                             capture_output=True, text=True).stdout.split()
        if out:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *out], capture_output=True)


def parse_quantity(q: str | int | float | None) -> float | None:
    """Kubernetes quantity -> number (bytes, or cores for cpu)."""
    if q is None:
        return None
    if isinstance(q, int | float):
        return float(q)
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix]
    return float(q)


def instance_id() -> str:
    return f"{os.getpid()}-{os.urandom(3).hex()}"
