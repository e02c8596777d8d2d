"""Policy -> container configuration, in one place for every container engine.

``plan()`` turns a ``SandboxSpec`` into a ``ContainerPlan``: the engine-neutral list of everything the
container must have (user, capabilities, seccomp, limits, mounts, tmpfs, network, labels, entrypoint).
``podman_args`` renders it as podman/Apple-style CLI flags; the docker backend renders the same plan as
Engine API JSON. No backend re-derives a control from the spec itself.

Standard library only; imported on the CLI's hot path.
"""

from __future__ import annotations

import os

from .. import paths
from ..oci.bundle import host_pids_limit
from ..spec import DEFAULT_TMPFS_MB, SandboxSpec, check_engine_path, mount_source_of
from .base import owner_labels

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The controls every container engine here enforces (podman, docker; gVisor and Apple subtract).
CONTAINER_CONTROLS = {
    "network_none", "network_full", "read_only_root", "memory", "cpu", "pids", "disk_tmpfs",
    "seccomp_default", "seccomp_restrictive", "cap_drop_all", "no_new_privileges", "non_root",
    "mount_cwd", "env",
}

AGENT_DIR = "/.ak"  # where the agent binary and its socket directory appear inside a container
AGENT_BIN_IN = f"{AGENT_DIR}/ak-agent"
AGENT_RUN_IN = f"{AGENT_DIR}/run"
AGENT_SOCK_IN = f"{AGENT_RUN_IN}/agent.sock"
STATUS_FILE_IN = f"{AGENT_RUN_IN}/status"


class ContainerPlan:
    __slots__ = (
        "binds",
        "cmd",
        "cpus",
        "disk_cap_mb",
        "dns",
        "entrypoint",
        "env",
        "hostname",
        "image",
        "interactive",
        "labels",
        "memory_bytes",
        "name",
        "netns",
        "network",
        "pids",
        "read_only",
        "resolv",
        "seccomp_file",
        "tmpfs",
        "user",
        "workdir",
    )

    def __init__(self, **kw) -> None:
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


# AF_UNIX socket paths are limited to 107 bytes: the run dir is named by the id's random suffix (ids are
# "<name or run or pool>-<10 random hex digits>"), not by the whole id, which may carry a 63-char name.
SOCKET_PATH_MAX = 107


def container_name(sandbox_id: str) -> str:
    """The engine's name for sandbox ``sandbox_id``'s container (only container backends use it)."""
    return f"agentkernel-{sandbox_id}"


def sandbox_run_dir(sandbox_id: str) -> str:
    """Host directory bind-mounted at /.ak/run: the agent's socket and status files live there."""
    prefix, _, suffix = sandbox_id.rpartition("-")
    short = suffix if prefix and len(suffix) == 10 else sandbox_id
    return os.path.join(paths.runtime_dir(), "sb", short)


def prepare_run_dir(sandbox_id: str, user: str) -> str:
    d = sandbox_run_dir(sandbox_id)
    if len(os.path.join(d, "agent.sock")) > SOCKET_PATH_MAX:
        from ..errors import ConfigError

        raise ConfigError(f"the runtime dir {paths.runtime_dir()!r} is too long for a unix socket path "
                          f"({SOCKET_PATH_MAX} bytes at most)", hint="set AGENTKERNEL_RUNTIME_DIR to a shorter path")
    os.makedirs(d, mode=0o700, exist_ok=True)
    uid, _, gid = user.partition(":")
    try:
        os.chown(d, int(uid), int(gid or uid))
    except PermissionError:
        pass
    return d


def remove_run_dir(sandbox_id: str) -> None:
    remove_flat_dir(sandbox_run_dir(sandbox_id))
    remove_disk_dir(sandbox_id)


def rootfs_cap_mb(spec: SandboxSpec) -> int | None:
    """The cap on a writable root's own bytes (resources.disk_mb), None for a read-only root (its
    writable places are sized tmpfs) or an explicitly unlimited spec."""
    if spec.resources.disk_mb is None or spec.policy.read_only_root:
        return None
    return spec.resources.disk_mb


def check_rootfs_cap(backend: str, spec: SandboxSpec, status: Any) -> None:
    """Refuse ``spec`` when it asks for a capped writable root and ``status()`` (the engine's
    ``storage_cap_status``: (ok, why)) says this engine's storage cannot cap it."""
    cap = rootfs_cap_mb(spec)
    if cap is None:
        return
    ok, why = status()
    if not ok:
        from .. import diskquota
        from ..errors import PolicyNotEnforceable

        raise PolicyNotEnforceable(
            f"backend {backend!r} cannot cap the writable root at {cap} MiB (disk_rootfs): {why}", hint=diskquota.FIX)


def disk_dir(sandbox_id: str) -> str:
    """The sandbox's capped workdir on the storage volume (podman: its writable workdir, see plan)."""
    from ..diskquota import sandboxes_dir

    return os.path.join(sandboxes_dir(), sandbox_id)


def prepare_disk_dir(spec: SandboxSpec, sandbox_id: str) -> str | None:
    """Engines that would put the workdir in a volume of their own (podman: an anonymous volume outside
    the container's capped root) get a capped directory of ours bound there instead: a btrfs subvolume
    capped at disk_mb, owned by the sandbox user. None when the spec needs none."""
    cap = rootfs_cap_mb(spec)
    if cap is None or (spec.policy.mount_cwd and spec.workdir == "/workspace"):
        return None
    from .. import diskquota

    d = disk_dir(sandbox_id)
    if os.path.isdir(d):  # a named sandbox started again
        return d
    from ..errors import PolicyNotEnforceable

    ok, why = diskquota.quota_status(diskquota.volume())
    if not ok:
        raise PolicyNotEnforceable(f"cannot cap the sandbox's workdir at {cap} MiB: {why}", hint=diskquota.FIX)
    uid, _, gid = resolve_user(spec).partition(":")
    os.makedirs(os.path.dirname(d), mode=0o711, exist_ok=True)
    try:
        return diskquota.make_capped_dir(d, cap, (int(uid), int(gid or uid)))
    except diskquota.QuotaError as exc:
        raise PolicyNotEnforceable(f"cannot cap the sandbox's workdir: {exc}", hint=diskquota.FIX) from None


def remove_disk_dir(sandbox_id: str) -> None:
    from ..diskquota import sandboxes_dir

    base = sandboxes_dir()
    if os.path.lexists(os.path.join(base, sandbox_id)):
        from ..diskquota import remove_capped_dir

        remove_capped_dir(os.path.join(base, sandbox_id))


NET_READY_IN = f"{AGENT_RUN_IN}/net-ready"  # engines that make the namespace themselves: see egress.attach.complete


def attach_network(spec: SandboxSpec, sandbox_id: str, deferred: bool = False) -> Any:
    """The sandbox's egress attachment (network modes allowlist/open), or None for network none."""
    if not spec.policy.network:
        return None
    from ..egress.attach import attach

    return attach(spec, sandbox_id, deferred=deferred)


def release_network(sandbox_id: str) -> None:
    """Undo attach_network (no-op, one stat, when there is nothing)."""
    from ..egress.attach import release

    release(sandbox_id)


def remove_flat_dir(path: str) -> None:
    """Remove a run dir, which the sandbox's user can write into: the usual content (sockets, status
    files, links) goes with unlinks relative to the directory's own fd (never following a link); anything
    else, e.g. a directory the sandbox made, falls back to shutil.rmtree (also link-safe; it costs ~7 ms
    of imports, which a one-shot run should not pay). Missing is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
        for name in names:
            os.unlink(name, dir_fd=fd)
        os.rmdir(path)
        return
    except OSError:
        pass
    finally:
        os.close(fd)
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def resolve_user(spec: SandboxSpec) -> str:
    uid, _, gid = spec.policy.user.partition(":")
    return f"{uid}:{gid or uid}"


def plan(
    spec: SandboxSpec,
    *,
    sandbox_id: str,
    owner: dict,
    container_name: str,
    argv: list[str] | None = None,
    agent_bin: str | None = None,
    run_dir: str | None = None,
    cwd: str | None = None,
    interactive: bool = False,
    pids_runtime: str = "",
    net: Any = None,
    disk_dir: str | None = None,
    sized_tmp: bool = False,
) -> ContainerPlan:
    """``argv`` given: a one-shot container running argv (under ``ak-agent exec`` when the agent is
    available: signal forwarding, zombie reaping, exact status and OOM report). ``argv`` None: a
    long-lived sandbox whose PID 1 is ``ak-agent serve`` on a socket in ``run_dir``. ``disk_dir``: a capped
    directory (prepare_disk_dir) bound at the workdir unless a mount is there; ``sized_tmp``: the runtime
    keeps /tmp in memory of its own (gVisor), so a capped writable root gets a /tmp tmpfs of disk_mb."""
    pol, res = spec.policy, spec.resources
    user = resolve_user(spec)
    binds: list[tuple[str, str, bool]] = []
    tmpfs: list[tuple[str, str]] = []
    if pol.mount_cwd:
        binds.append((mount_source_of(spec, cwd), "/workspace", False))
    if spec.options.get("volumes"):  # named volumes only (never an arbitrary host path): volumes.py
        from ..volumes import parse_mounts

        binds += parse_mounts(spec.options["volumes"].split(","))
    if pol.read_only_root:
        size = res.disk_mb or DEFAULT_TMPFS_MB
        uid, _, gid = user.partition(":")
        writable = ["/tmp"]
        if not pol.mount_cwd or spec.workdir != "/workspace":
            writable.append(spec.workdir)
        for path in dict.fromkeys(writable):
            owned = "" if path == "/tmp" else f",uid={uid},gid={gid}"
            mode = "1777" if path == "/tmp" else "0755"
            tmpfs.append((path, f"rw,nosuid,nodev,size={size}m,mode={mode}{owned}"))
    cap = rootfs_cap_mb(spec)
    if cap is not None and sized_tmp and not any(d == "/tmp" for _, d, _ in binds):
        tmpfs.append(("/tmp", f"rw,nosuid,nodev,size={cap}m,mode=1777"))
    if disk_dir and not any(spec.workdir == d for _, d, _ in binds) \
            and not any(spec.workdir == d for d, _ in tmpfs):
        binds.append((disk_dir, spec.workdir, False))
    entrypoint: list[str] | None
    cmd: list[str]
    if net is not None:
        binds.extend(net.binds)
    if agent_bin:
        binds.append((agent_bin, AGENT_BIN_IN, True))
        if run_dir:
            binds.append((run_dir, AGENT_RUN_IN, False))
    if argv is not None:
        if agent_bin:
            entrypoint = [AGENT_BIN_IN, "exec"]
            if run_dir:
                entrypoint += ["--status-file", STATUS_FILE_IN]
            entrypoint.append("--")
        else:
            entrypoint = [argv[0]]
            argv = argv[1:]
        cmd = list(argv)
    else:
        if not (agent_bin and run_dir):
            from ..errors import BackendUnavailable

            raise BackendUnavailable(
                "the in-sandbox agent binary is missing (needed for long-lived sandboxes)",
                hint="build it: make -C agent (bash scripts/setup.sh does this)",
            )
        entrypoint = [AGENT_BIN_IN, "serve", "--listen", AGENT_SOCK_IN]
        cmd = []
    for path, _opts in tmpfs:
        check_engine_path(path, "tmpfs mount point")
    for src, dst, _ro in binds:
        check_engine_path(src, "bind mount source")
        check_engine_path(dst, "bind mount target")
    env = dict(spec.env)
    if net is not None:  # an egress.attach.Attachment: proxy variables and secret placeholders
        env.update(net.env)
    from ..seccomp import profile_path

    return ContainerPlan(
        name=container_name,
        image=spec.image,
        labels=owner_labels(sandbox_id, owner, spec.name),
        user=user,
        env=env,
        workdir=spec.workdir,
        hostname=spec.hostname,
        network="netns" if net is not None else ("default" if pol.network else "none"),
        netns=net.netns if net is not None else None,
        dns=net.dns if net is not None else None,
        resolv=net.resolv if net is not None else None,
        read_only=pol.read_only_root,
        tmpfs=tmpfs,
        binds=binds,
        memory_bytes=res.memory_mb * 1024 * 1024 if res.memory_mb is not None else None,
        cpus=res.vcpus,
        disk_cap_mb=cap,
        pids=host_pids_limit(pids_runtime, res.pids) if res.pids is not None else None,
        seccomp_file=profile_path(pol.seccomp),
        entrypoint=entrypoint,
        cmd=cmd,
        interactive=interactive,
    )


def podman_args(p: ContainerPlan, *, network_default: str | None = None) -> list[str]:
    """The plan as ``podman create/run`` flags (everything between the subcommand and the image)."""
    a = ["--name", p.name, "--pull", "never", "--hostname", p.hostname]
    for k, v in p.labels.items():
        a += ["--label", f"{k}={v}"]
    a += ["--cap-drop", "all", "--security-opt", "no-new-privileges", "--user", p.user]
    if p.seccomp_file:
        a += ["--security-opt", f"seccomp={p.seccomp_file}"]
    if p.network == "none":
        a += ["--network", "none"]
    elif p.network == "netns":  # the namespace the egress gateway made (egress/netns.py)
        a += ["--network", f"ns:{p.netns}", "--dns", p.dns]
    elif network_default:
        a += ["--network", network_default]
    if p.memory_bytes is not None:
        a += ["--memory", str(p.memory_bytes), "--memory-swap", str(p.memory_bytes)]
    if p.cpus is not None:
        a += ["--cpus", f"{p.cpus:g}"]
    if p.pids is not None:
        a += ["--pids-limit", str(p.pids)]
    if p.read_only:
        a += ["--read-only", "--read-only-tmpfs=false"]
    for path, opts in p.tmpfs:
        a += ["--tmpfs", f"{path}:{_podman_tmpfs_opts(opts)}"]
    for src, dst, ro in p.binds:
        a += ["-v", f"{src}:{dst}:{'ro' if ro else 'rw'}"]
    if p.disk_cap_mb is not None:
        # the prestart hook (diskquota.py) caps the container's root subvolume before its first process
        import sys

        from .. import diskquota

        a += ["--hooks-dir", diskquota.hooks_dir(paths.cache_dir(), sys.executable),
              "--annotation", f"{diskquota.HOOK_ANNOTATION}={p.disk_cap_mb}"]
    if not _on_mount(p, p.workdir):
        # podman refuses --workdir when the image lacks that directory: an anonymous volume there always exists;
        # podman fills it from the image's directory (content, owner) or gives it to the sandbox user, and
        # `run --rm` / `rm -v` remove it with the container
        a += ["--mount", f"type=volume,dst={p.workdir}"]
    a += ["--workdir", p.workdir]
    for k, v in p.env.items():
        a += ["--env", f"{k}={v}"]
    if p.interactive:
        a.append("-i")
    if p.entrypoint is not None:
        from .._fastjson import dumps

        a += ["--entrypoint", dumps(p.entrypoint)]
    return a


def _on_mount(p: ContainerPlan, path: str) -> bool:
    """``path`` is "/" or at/under a tmpfs or bind of the plan (the runtime makes those directories)."""
    dests = [d for d, _ in p.tmpfs or ()] + [d for _, d, _ in p.binds or ()]
    return path == "/" or any(path == d or path.startswith(d.rstrip("/") + "/") for d in dests)


def _podman_tmpfs_opts(opts: str) -> str:
    """podman rejects uid=/gid= on --tmpfs: an owned tmpfs becomes a sticky world-writable one instead
    (it is the sandbox's own private mount either way)."""
    parts = opts.split(",")
    if not any(o.startswith(("uid=", "gid=")) for o in parts):
        return opts
    parts = [o for o in parts if not o.startswith(("uid=", "gid=", "mode="))]
    return ",".join([*parts, "mode=1777"])


# ---- one-shot runs (podman, docker, gVisor under either): the pieces their run_oneshot share --------

STATUS_MAX = 4096  # the agent writes one short line


def oneshot_plan(spec, argv: list[str], *, sandbox_id: str, owner: dict, interactive: bool,
                 pids_runtime: str = "", egress: bool = False, egress_deferred: bool = False,
                 capped_workdir: bool = False, sized_tmp: bool = False) -> tuple[str | None, ContainerPlan]:
    """The run dir (None without the agent) and plan of a one-shot container: ``ak-agent exec`` as init
    reports the exact status into the run dir's ``status`` file. ``egress``: the backend joins network
    modes through ``agentkernel.egress`` (attached here; ``oneshot_cleanup`` releases it)."""
    agent = paths.agent_binary()
    run_dir = prepare_run_dir(sandbox_id, resolve_user(spec)) if agent else None
    net = ddir = None
    try:
        if egress and spec.policy.network:
            net = attach_network(spec, sandbox_id, egress_deferred)
        if capped_workdir:
            ddir = prepare_disk_dir(spec, sandbox_id)
    except BaseException:
        oneshot_cleanup(spec, sandbox_id, run_dir)
        raise
    p = plan(spec, sandbox_id=sandbox_id, owner=owner, container_name=container_name(sandbox_id), argv=argv,
             agent_bin=agent, run_dir=run_dir, cwd=os.getcwd(), interactive=interactive,
             pids_runtime=pids_runtime, net=net, disk_dir=ddir, sized_tmp=sized_tmp)
    return run_dir, p


def oneshot_cleanup(spec, sandbox_id: str, run_dir: str | None) -> None:
    """What ``oneshot_plan`` made on the host: the run dir and the sandbox's egress network."""
    if run_dir:
        remove_flat_dir(run_dir)
    if spec.policy.network:
        release_network(sandbox_id)
    if rootfs_cap_mb(spec) is not None:
        remove_disk_dir(sandbox_id)


def read_status(run_dir: str | None) -> dict[str, int] | None:
    """The status file ``ak-agent exec --status-file`` writes: exact exit code, signal, OOM. The sandbox
    can write its run dir: ``safefs`` reads it without following links or blocking on a FIFO, bounded."""
    if not run_dir:
        return None
    from ..safefs import read_regular_or_none

    data = read_regular_or_none(run_dir, "status", STATUS_MAX)
    if data is None:
        return None
    out: dict[str, int] = {}
    for part in data.decode("ascii", "replace").split():
        k, _, v = part.partition("=")
        if v.lstrip("-").isdigit() and len(v) < 12:
            out[k] = int(v)
    return out if "exit" in out else None


def status_outcome(status: dict[str, int]):
    from .base import Outcome

    return Outcome(status["exit"], signal=status.get("signal") or None, oom=bool(status.get("oom")))
