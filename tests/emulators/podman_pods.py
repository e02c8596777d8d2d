"""TEST TOOL. Runs the emulators' workloads (Kubernetes pods, Nomad allocations) as podman containers, so
commands exec'd through the emulated APIs really run. Nothing in agentkernel/ imports this."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading

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
        self._net_lock = threading.Lock()
        self._service_net: tuple[str, str] | None = None

    async def _podman(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec("podman", *args, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def run(self, name: str, image: str, *, command: list[str] | None, user: str | None, env: dict[str, str],
                  workdir: str | None, hostname: str | None, cap_drop_all: bool, no_new_privs: bool,
                  read_only: bool, tmpfs: list[tuple[str, int | None]], memory_bytes: int | None,
                  cpus: float | None, pids: int | None, network_none: bool, extra_labels: dict[str, str],
                  networks: list[str] | None = None, dns: dict[str, list[str]] | None = None,
                  sysctls: dict[str, str] | None = None, binds: list[tuple[str, str]] | None = None) -> str:
        """``networks``: podman networks to join (``name`` or ``name:ip=IP``), instead of the default
        bridge; ``dns``: {"servers", "search", "options"}; ``binds``: read-only (host dir, path)."""
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
        if networks:
            for net in networks:
                a += ["--network", net]
        else:
            a += ["--network", "none" if network_none else "bridge"]
        for server in (dns or {}).get("servers", []):
            a += ["--dns", server]
        for domain in (dns or {}).get("search", []):
            a += ["--dns-search", domain]
        for opt in (dns or {}).get("options", []):
            a += ["--dns-option", opt]
        for k, v in (sysctls or {}).items():
            a += ["--sysctl", f"{k}={v}"]
        for host, path in binds or []:
            a += ["-v", f"{host}:{path}:ro"]
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

    async def logs(self, cid: str) -> str:
        rc, out, _ = await self._podman("logs", cid)
        return out if rc == 0 else ""

    async def ip_on(self, cid: str, network: str) -> str | None:
        rc, out, _ = await self._podman("inspect", "--type", "container", "--format", "json", cid)
        if rc != 0:
            return None
        nets = (json.loads(out)[0].get("NetworkSettings") or {}).get("Networks") or {}
        return (nets.get(network) or {}).get("IPAddress") or None

    async def remove(self, cid: str) -> None:
        await self._podman("rm", "-f", "-t", "0", "--ignore", cid)

    def remove_all_sync(self) -> None:
        out = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={EMULATOR_LABEL}={self.instance}"],
                             capture_output=True, text=True).stdout.split()
        if out:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *out], capture_output=True)
        nets = subprocess.run(["podman", "network", "ls", "-q", "--filter", f"label={EMULATOR_LABEL}={self.instance}"],
                              capture_output=True, text=True).stdout.split()
        if nets:
            subprocess.run(["podman", "network", "rm", "-f", *nets], capture_output=True)

    def service_network(self) -> tuple[str, str]:
        """(name, subnet) of this emulator's internal network (no route out; created on first use): where
        Service clusterIPs live, and all a pod whose NetworkPolicy allows egress only to pods is on. A /22:
        podman hands out pods' addresses from its lower half only; ``service_ip`` takes from the upper
        half, so a Service's address is never a pod's."""
        with self._net_lock:
            if not getattr(self, "_service_net", None):
                self._service_net = self._create_service_network()
        return self._service_net

    def service_ip(self, n: int) -> str:
        import ipaddress

        net = ipaddress.ip_network(self.service_network()[1])
        return str(net.network_address + net.num_addresses // 2 + n)

    def _create_service_network(self) -> tuple[str, str]:
        import ipaddress
        import re
        import secrets as rnd

        routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        used = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", routes)]
        for _ in range(50):
            net = ipaddress.ip_network(f"10.{240 + rnd.randbelow(10)}.{4 * rnd.randbelow(63)}.0/22")
            if not any(u.overlaps(net) for u in used if u.prefixlen >= 8):
                break
        lower = next(net.subnets(new_prefix=23))
        name = f"akemu-svc-{self.instance}"
        r = subprocess.run(["podman", "network", "create", "--internal", "--disable-dns", "--subnet", str(net),
                            "--ip-range", str(lower), "--label", f"{EMULATOR_LABEL}={self.instance}", name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"podman network create: {r.stderr.strip()}")
        return name, str(net)


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
