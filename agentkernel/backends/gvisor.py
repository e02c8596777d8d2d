"""gVisor backend: runsc as the OCI runtime under podman (default) or docker (``-o engine=docker``).

Every sandbox gets a user-space kernel (the Sentry) between its processes and the host kernel, on
the ptrace platform (``--platform=kvm`` hangs on the PVM hosts we have; systrap is not in Debian's
runsc). Runtime flags, always:

- ``--network=none``: this runsc refuses to start with a network in the root netns on this kernel,
  so ``policy.network = true`` is refused (fail closed); loopback works inside.
- ``--oci-seccomp``: apply the spec's seccomp filter inside the sandbox too (runsc ignores it
  otherwise), so the policy's seccomp profile holds on top of the Sentry's own host filter.
- ``--host-uds=create``: lets the agent's listening socket in the bind-mounted run dir be a real host
  socket, so exec/files use the same ~1 ms agent path as the other container backends. It allows the
  sandbox to create unix sockets on its host-backed mounts only (its rootfs and that run dir), never to
  connect to host sockets.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from ._container import CONTAINER_CONTROLS
from .base import Availability, Capabilities
from .podman import PodmanBackend

RUNSC = "/usr/bin/runsc"
RUNSC_FLAGS = ("network=none", "platform=ptrace", "oci-seccomp", "host-uds=create")

GVISOR_CONTROLS = CONTAINER_CONTROLS - {"network_full"}


def runsc_path() -> str | None:
    return RUNSC if os.path.exists(RUNSC) else shutil.which("runsc")


class GVisorBackend(PodmanBackend):
    name = "gvisor"
    capabilities = Capabilities(GVISOR_CONTROLS, {"exec", "files", "agent", "oneshot", "pool"},
                                isolation="user-space kernel (gVisor, ptrace platform)")
    options_allowed = ("engine",)

    def __new__(cls, options: dict[str, str] | None = None):
        if cls is GVisorBackend and (options or {}).get("engine") == "docker":
            return super().__new__(GVisorDockerBackend.resolve())
        return super().__new__(cls)

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        engine = self.options.get("engine", "podman")
        if engine not in ("podman", "docker"):
            from ..errors import ConfigError

            raise ConfigError(f"gvisor option engine must be podman or docker, got {engine!r}")

    def runtime_args(self) -> list[str]:
        args = ["--runtime", runsc_path() or RUNSC]
        for f in RUNSC_FLAGS:
            args += ["--runtime-flag", f]
        return args

    @classmethod
    def probe(cls) -> Availability:
        exe = runsc_path()
        if not exe:
            return Availability(False, "runsc (gVisor) is not installed", fix="apt-get install -y runsc")
        base = PodmanBackend.probe()
        if not base.available:
            return Availability(False, f"needs podman: {base.reason}", fix=base.fix)
        out = subprocess.run([exe, "--version"], capture_output=True, text=True)
        ver = out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "runsc"
        return Availability(True, f"{ver} (ptrace platform) under {base.reason}", details={"runsc": exe})


class GVisorDockerBackend:
    """Resolved lazily so importing this module does not import the docker backend."""

    @staticmethod
    def resolve():
        from .docker import DockerBackend

        class _GVisorDocker(DockerBackend):
            name = "gvisor"
            capabilities = GVisorBackend.capabilities
            options_allowed = ("engine",)
            docker_runtime = "runsc"

        return _GVisorDocker
