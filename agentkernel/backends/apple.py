"""Apple Containers backend (macOS 26+, Apple silicon): one lightweight VM per container via the
``container`` CLI.

Only the command construction is exercised on our Linux machines (tests check the exact argv);
``probe`` says why it cannot run here. The CLI (``container run/create/start/stop/delete``) has no
flags for dropping capabilities, no-new-privileges, seccomp, a pids limit or a read-only root, so
those controls are not declared: the default policy is refused with the list of what is missing
(fail closed), instead of being silently ignored as the reference did. A spec can run here once it
asks only for what the VM boundary and these flags give (see ``APPLE_CONTROLS``); running as root
inside the per-container VM is then explicit (``policy.user = "0"``).

Exec and files go through the agent like every other container backend; the agent's socket is
published to the host with ``--publish-socket HOST:CONTAINER``.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess

from ..errors import BackendUnavailable, SandboxError
from . import _container
from ._agent_container import AgentContainerBackend
from .base import LABEL_MANAGED, Availability, Capabilities, SandboxInfo

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any


# No network_full: "open" means never the host, other sandboxes or metadata addresses (docs/network.md), and
# nothing here proves that for Apple's vmnet networking, so networked specs are refused (fail closed).
APPLE_CONTROLS = {"memory", "cpu", "env", "mount_cwd", "non_root"}
MIN_MACOS = 26


def apple_args(plan: _container.ContainerPlan) -> list[str]:
    """The plan as ``container create/run`` flags. Refuses what the CLI cannot express."""
    if plan.read_only or plan.tmpfs:
        raise SandboxError("Apple containers cannot make the root filesystem read-only")
    a = ["--name", plan.name]
    for k, v in plan.labels.items():
        a += ["--label", f"{k}={v}"]
    a += ["--user", plan.user]
    if plan.memory_bytes is not None:
        a += ["--memory", f"{max(1, plan.memory_bytes // (1024 * 1024))}M"]
    if plan.cpus is not None:
        a += ["--cpus", str(max(1, round(plan.cpus)))]
    for src, dst, ro in plan.binds:
        if dst == _container.AGENT_RUN_IN:
            a += ["--publish-socket", f"{src}/agent.sock:{_container.AGENT_SOCK_IN}"]
            continue
        a += ["--volume", f"{src}:{dst}" + (":ro" if ro else "")]
    a += ["--workdir", plan.workdir]
    for k, v in plan.env.items():
        a += ["--env", f"{k}={v}"]
    if plan.interactive:
        a.append("--interactive")
    if plan.entrypoint:
        a += ["--entrypoint", plan.entrypoint[0]]
    return a


def apple_command(plan: _container.ContainerPlan, subcommand: str = "run") -> list[str]:
    """Full argv. With an entrypoint, its remaining words become the first arguments."""
    rest = list(plan.entrypoint[1:]) if plan.entrypoint else []
    head = ["container", subcommand]
    if subcommand == "run":
        head.append("--rm")
    return [*head, *apple_args(plan), plan.image, *rest, *plan.cmd]


class AppleBackend(AgentContainerBackend):
    name = "apple"
    capabilities = Capabilities(APPLE_CONTROLS, {"exec", "files", "agent", "oneshot"},
                                isolation="VM per container (Apple Virtualization.framework)")

    @classmethod
    def probe(cls) -> Availability:
        if platform.system() != "Darwin":
            return Availability(False, f"needs macOS {MIN_MACOS}+ on Apple silicon (this host is "
                                f"{platform.system()} {platform.machine()})")
        major = int((platform.mac_ver()[0] or "0").split(".")[0])
        if major < MIN_MACOS:
            return Availability(False, f"needs macOS {MIN_MACOS}+ (this is {platform.mac_ver()[0]})")
        if not shutil.which("container"):
            return Availability(False, "the `container` CLI is not installed",
                                fix="install it from github.com/apple/container releases")
        r = subprocess.run(["container", "system", "status"], capture_output=True, text=True)
        if r.returncode != 0:
            return Availability(False, "the container system service is not running",
                                fix="container system start")
        return Availability(True, "Apple container CLI")

    async def _container(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        import asyncio

        try:
            proc = await asyncio.create_subprocess_exec("container", *args, stdin=subprocess.DEVNULL,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise BackendUnavailable("the `container` CLI is not installed") from None
        out, err = await proc.communicate()
        if check and proc.returncode:
            raise SandboxError(f"container {args[0]}: {err.decode(errors='replace').strip()}")
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def _engine_create(self, plan: _container.ContainerPlan) -> str:
        _, out, _ = await self._container(*apple_command(plan, "create")[1:])
        return out.strip()

    async def _engine_start(self, name: str) -> None:
        await self._container("start", name)

    async def _engine_stop(self, name: str) -> None:
        await self._container("stop", "--time", "2", name)

    async def _engine_remove(self, name: str) -> None:
        await self._container("delete", "--force", name, check=False)

    async def _engine_state(self, name: str) -> tuple[str, dict[str, Any]]:
        rc, out, _ = await self._container("inspect", name, check=False)
        if rc:
            return "missing", {}
        try:
            status = json.loads(out)[0].get("status", "")
        except (ValueError, LookupError, AttributeError):
            return "missing", {}
        return {"running": "running", "stopped": "stopped"}.get(status, status or "missing"), {}

    async def list(self) -> list[SandboxInfo]:
        _, out, _ = await self._container("list", "--all", "--format", "json")
        infos = []
        for c in json.loads(out or "[]"):
            labels = (c.get("configuration") or {}).get("labels") or {}
            if labels.get(LABEL_MANAGED) != "true":
                continue
            cid = (c.get("configuration") or {}).get("id", "")
            infos.append(SandboxInfo(self.name, labels.get("agentkernel.sandbox-id", ""),
                                     labels.get("agentkernel.name"), c.get("status", ""),
                                     {"container": cid}, labels))
        return infos
