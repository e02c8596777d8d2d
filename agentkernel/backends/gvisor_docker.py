"""gVisor under docker: the docker backend with runsc as dockerd's OCI runtime.

Selected as ``--backend gvisor-docker`` or ``--backend gvisor -o engine=docker`` (the registry routes
it). dockerd runs runsc as registered in its config, with the same flags as the podman variant:

- ``RUNTIME`` (``gvisor.RUNSC_FLAGS``) for sandboxes without network: ``--network=none``;
  ``--oci-seccomp`` is what makes the spec's seccomp profile apply inside the sandbox (without it runsc
  ignores it, and ``seccomp_restrictive`` would be a control declared but not enforced);
  ``--host-uds=create`` lets the agent's socket in the bind-mounted run dir be reached from the host.
  The probe refuses when dockerd's registration lacks any of those flags.
- ``NET_RUNTIME`` (``gvisor.RUNSC_NET_FLAGS``: ``--network=host`` and the same others) for network modes
  open and allowlist. runsc's flags are per registered runtime, not per container, hence a second one.
  Its executable is agentkernel's wrapper (``_runsc_net_wrapper``): at ``create`` it points the bundle's
  network namespace at the egress namespace ``egress.attach`` made before the container was created (not
  deferred, unlike docker's runc), so the Sentry starts in it and sees its interface; its sockets are host
  sockets there, so the namespace's firewall, route and gateway apply exactly as for the other container
  backends. When dockerd's registration is missing, lacks a flag or runs anything but that wrapper,
  ``check`` refuses network modes with the reason (fail closed); sandboxes without network keep working.
"""

from __future__ import annotations

from .base import Availability
from .docker import DockerBackend
from .gvisor import GVISOR_DOCKER_CAPABILITIES, RUNSC_FLAGS, RUNSC_NET_FLAGS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

    from . import _container

RUNTIME = "runsc-agentkernel"
NET_RUNTIME = "runsc-agentkernel-net"
SETUP_FIX = ("agentkernel setup -y (installs the runtime wrapper, registers the runtimes in "
             "/etc/agentkernel/dockerd.json and reloads dockerd with SIGHUP: no restart)")


class GVisorDockerBackend(DockerBackend):
    name = "gvisor-docker"
    capabilities = GVISOR_DOCKER_CAPABILITIES
    pids_runtime = "runsc"
    options_allowed: ClassVar[tuple[str, ...]] = ("engine", "volumes")
    docker_runtime: ClassVar[str | None] = RUNTIME
    docker_net_runtime: ClassVar[str] = NET_RUNTIME
    sized_tmp = True
    egress_deferred = False  # the networked runtime's wrapper names the egress namespace in the bundle

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
        missing = missing_flags(cls.docker_runtime, RUNSC_FLAGS)
        if missing:
            return Availability(False, f"dockerd's runtime {cls.docker_runtime!r} lacks {' '.join(missing)} "
                                "(a declared control would not be enforced)", fix=SETUP_FIX)
        net_ok, net_why = net_runtime_status(cls.docker_net_runtime)
        details = dict(base.details or {}, network=("open and allowlist" if net_ok else f"refused: {net_why}"))
        return Availability(True, f"runsc (ptrace platform) under {base.reason}", details=details)

    def check(self, spec) -> None:
        super().check(spec)
        from ..spec import network_mode

        mode = network_mode(spec.policy)
        if mode == "none":
            return
        ok, why = net_runtime_status(self.docker_net_runtime)
        if not ok:
            from ..errors import PolicyNotEnforceable

            raise PolicyNotEnforceable(f"backend {self.name!r} cannot enforce network mode {mode}: {why}",
                                       hint=f"{SETUP_FIX}, or use --network none")

    def runtime_for(self, plan: _container.ContainerPlan) -> str | None:
        # only a sandbox whose namespace the egress attachment fills runs with --network=host
        return self.docker_net_runtime if plan.network == "netns" else self.docker_runtime


def runtime_entry(runtime: str | None) -> dict[str, Any] | None:
    """dockerd's registration of ``runtime`` ({"path", "runtimeArgs"}; None when it has no such runtime
    or dockerd does not answer)."""
    from .docker_api import SyncClient

    try:
        with SyncClient(timeout=10) as c:
            runtimes = c.json("GET", "/info").get("Runtimes") or {}
    except Exception:
        return None
    entry = runtimes.get(runtime or "")
    return entry if isinstance(entry, dict) else None


def runtime_args(runtime: str | None = RUNTIME) -> list[str] | None:
    """The runtimeArgs dockerd has registered for ``runtime`` (None when it has none registered)."""
    entry = runtime_entry(runtime)
    return None if entry is None else list(entry.get("runtimeArgs") or [])


def missing_flags(runtime: str | None, flags: tuple[str, ...]) -> list[str]:
    """The ``flags`` dockerd's registration of ``runtime`` lacks (all of them when it has none)."""
    return flag_problems(runtime_args(runtime) or [], flags)


def flag_problems(have: list[str], flags: tuple[str, ...]) -> list[str]:
    """Each of ``flags`` missing from ``have``, and any other ``--network=`` in it (runsc takes the last
    one given, so a second network flag would silently change the sandbox's network)."""
    want = [f"--{f}" for f in flags]
    out = [f for f in want if f not in have]
    out += [f"{a} (conflicts)" for a in have if a.startswith("--network=") and a not in want]
    return out


_NET_STATUS: dict[str, tuple[bool, str]] = {}


def net_runtime_status(runtime: str = NET_RUNTIME) -> tuple[bool, str]:
    """(usable, why not) for the networked runtime; asked once per process (dockerd only learns a new
    runtime from a SIGHUP, which a running command does not need to notice)."""
    if runtime not in _NET_STATUS:
        _NET_STATUS[runtime] = _net_runtime_status(runtime)
    return _NET_STATUS[runtime]


def _net_runtime_status(runtime: str) -> tuple[bool, str]:
    from . import _runsc_net_wrapper

    entry = runtime_entry(runtime)
    if entry is None:
        return False, (f"dockerd has no runtime {runtime!r} registered (runsc with --network=host, run only "
                       "inside the sandbox's egress namespace)")
    missing = flag_problems(list(entry.get("runtimeArgs") or []), RUNSC_NET_FLAGS)
    if missing:
        return False, (f"dockerd's runtime {runtime!r} lacks {' '.join(missing)} (a declared control would not "
                       "be enforced)")
    path = str(entry.get("path") or "")
    want = _runsc_net_wrapper.text().encode()
    try:
        with open(path, "rb") as f:  # it may be any executable (runsc itself): compare bytes, read no more
            ours = f.read(len(want) + 1) == want
    except OSError:
        ours = False
    if not ours:
        return False, (f"dockerd's runtime {runtime!r} runs {path or 'nothing'}, not agentkernel's current "
                       f"wrapper (the one that joins the egress namespace, installed at {_runsc_net_wrapper.PATH})")
    return True, ""
