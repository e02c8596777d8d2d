"""gVisor under docker: the docker backend with runsc as dockerd's OCI runtime.

Selected as ``--backend gvisor-docker`` or ``--backend gvisor -o engine=docker`` (the registry routes
it). dockerd runs runsc as registered in its config under ``RUNTIME`` with the same flags as the podman
variant (``gvisor.RUNSC_FLAGS``): ``--oci-seccomp`` is what makes the spec's seccomp profile apply inside
the sandbox (without it runsc ignores it, and ``seccomp_restrictive`` would be a control declared but
not enforced); ``--host-uds=create`` lets the agent's socket in the bind-mounted run dir be reached from
the host. The probe refuses when dockerd's registration lacks any of those flags.
"""

from __future__ import annotations

from .base import Availability
from .docker import DockerBackend
from .gvisor import GVISOR_DOCKER_CAPABILITIES, GVISOR_PIDS_OVERHEAD, RUNSC_FLAGS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

RUNTIME = "runsc-agentkernel"


class GVisorDockerBackend(DockerBackend):
    name = "gvisor-docker"
    capabilities = GVISOR_DOCKER_CAPABILITIES
    pids_overhead = GVISOR_PIDS_OVERHEAD
    options_allowed: ClassVar[tuple[str, ...]] = ("engine", "volumes")
    docker_runtime: ClassVar[str | None] = RUNTIME
    sized_tmp = True

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        engine = self.options.get("engine", "docker")
        if engine != "docker":
            from ..errors import ConfigError

            raise ConfigError(f"gvisor-docker option engine must be docker, got {engine!r}")

    @classmethod
    def probe(cls) -> Availability:
        from .gvisor import runsc_path

        if not runsc_path():
            return Availability(False, "runsc (gVisor) is not installed", fix="apt-get install -y runsc")
        base = super().probe()
        if not base.available:
            return base
        missing = [f"--{f}" for f in RUNSC_FLAGS if f"--{f}" not in runtime_args(cls.docker_runtime)]
        if missing:
            return Availability(False, f"dockerd's runtime {cls.docker_runtime!r} lacks {' '.join(missing)} "
                                "(a declared control would not be enforced)",
                                fix="register it in /etc/agentkernel/dockerd.json (bash scripts/setup.sh) and "
                                "reload dockerd (kill -HUP)")
        return Availability(True, f"runsc (ptrace platform) under {base.reason}", details=base.details)


def runtime_args(runtime: str | None = RUNTIME) -> list[str]:
    """The runtimeArgs dockerd has registered for ``runtime`` ([] when it has none or dockerd is down)."""
    from .docker_api import SyncClient

    try:
        with SyncClient(timeout=10) as c:
            runtimes = c.json("GET", "/info").get("Runtimes") or {}
    except Exception:
        return []
    return list((runtimes.get(runtime or "") or {}).get("runtimeArgs") or [])
