"""Policy -> OCI ``config.json``: the one place where the ``oci`` backend maps a sandbox's controls.

Input is the engine-neutral ``ContainerPlan`` (``backends._container.plan``: the same rules podman and
docker render as flags), the unpacked image (``rootfs.ImageRootfs``) and the runtime. The mapping, in
the order of the table in docs/backends/oci.md:

| control | config.json |
|---|---|
| user (policy.user) | ``process.user`` uid/gid, additionalGids [gid]; HOME from the image's /etc/passwd |
| capabilities | every set (bounding, effective, inheritable, permitted, ambient) empty |
| no-new-privileges | ``process.noNewPrivileges = true`` |
| seccomp (policy.seccomp) | crun: ``run.oci.seccomp_bpf_data``, the filter crun compiled from the |
|   | same rules (cached); runc/runsc: ``linux.seccomp`` converted from the Docker format |
| masked / read-only paths | ``linux.maskedPaths`` / ``readonlyPaths``: podman's + docker's lists |
| memory (resources.memory_mb) | limit on the sandbox's parent cgroup ``agentkernel/<id>``, OOM watched |
|   | there; the container cgroup gets limit + 1 MiB, swap the same (no swap) |
| cpu (resources.vcpus) | ``linux.resources.cpu``: quota = vcpus x 100 ms per 100 ms period |
| pids (resources.pids) | ``linux.resources.pids.limit`` (runsc: scaled for its own host tasks) |
| devices | deny all (runtimes add null, zero, full, tty, random, urandom) |
| network off | ``network`` namespace without a path: a fresh netns with only ``lo`` |
| read-only root | ``root.readonly`` + sized tmpfs at /tmp and the workdir (size, mode, uid from the plan) |
| writable root | ``root.path`` = overlay (image lower, sandbox upper/work) in a private mount namespace |
| hostname / env / cwd | ``hostname``; env = image env < PATH, HOME, HOSTNAME < spec env; ``process.cwd`` |
| rlimits | RLIMIT_NOFILE = the host's hard limit (max 1M), RLIMIT_CORE = 0 |
| namespaces | pid, ipc, uts, mount, network (no cgroup namespace on cgroup v1 hosts) |
| cgroups | ``linux.cgroupsPath`` = ``/agentkernel/<id>/ctr`` in every hierarchy |
| mounts | proc, /dev tmpfs, devpts, /dev/shm 64 MiB, mqueue, sysfs ro, cgroup ro, then the |
|   | plan's tmpfs and binds (agent ro, run dir, mount_cwd), nosuid+nodev |
| owner labels | ``annotations`` (agentkernel.*), also kept in meta.json for ``list`` and the reaper |

Standard library only; imported on the one-shot hot path.
"""

from __future__ import annotations

import os

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/fs/selinux",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# runsc (ptrace platform): the host cgroup's pids limit counts gVisor's own host tasks, not the sandbox's
# processes: the sentry's threads (~35 idle) plus a stub process and threads for each guest process (~7 per
# process, measured: 15 concurrent `sh -c "sleep 2"` execs took the container cgroup from 35 to 237 tasks).
# With the guest's limit used as is, a sandbox died at a few dozen processes ("panic: error initializing
# first thread: resource temporarily unavailable" in the sentry). The host limit is scaled instead, so the
# guest still gets about its ``pids`` processes and a fork bomb is still bounded on the host.
RUNSC_TASKS_PER_PROCESS = 8
RUNSC_SENTRY_TASKS = 64
MEMORY_SLACK = 1 << 20  # the container cgroup's limit sits above the parent's, so OOM hits the parent
CPU_PERIOD = 100_000
NOFILE_CAP = 1 << 20


def cgroup_rel(sandbox_id: str) -> str:
    """The sandbox's cgroup, relative to each hierarchy's root (the container's is ``<this>/ctr``)."""
    return f"agentkernel/{sandbox_id}"


def _host_nofile() -> int:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = NOFILE_CAP
    return min(hard, NOFILE_CAP)


def host_pids_limit(runtime: str, pids: int) -> int:
    """The container cgroup's pids limit for a sandbox of ``pids`` processes (see RUNSC_TASKS_PER_PROCESS)."""
    if runtime == "runsc":
        return pids * RUNSC_TASKS_PER_PROCESS + RUNSC_SENTRY_TASKS
    return pids


def standard_mounts(runtime: str) -> list[dict]:
    m = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    if runtime != "runsc":
        # gVisor has its own /dev/mqueue and cgroupfs emulation; the kernel runtimes mount the real ones.
        m.append(
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            }
        )
        m.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            }
        )
    return m


def plan_mounts(plan) -> list[dict]:
    out = []
    for path, opts in plan.tmpfs or ():
        out.append({"destination": path, "type": "tmpfs", "source": "tmpfs", "options": opts.split(",")})
    for src, dst, ro in plan.binds or ():
        out.append(
            {
                "destination": dst,
                "type": "bind",
                "source": src,
                "options": ["rbind", "rprivate", "nosuid", "nodev", "ro" if ro else "rw"],
            }
        )
    return out


def mount_destinations(plan) -> list[tuple[str, bool]]:
    """(path, is_dir) of every mount point the container needs in its root."""
    out = [("/proc", True), ("/dev", True), ("/sys", True)]
    out += [(p, True) for p, _ in plan.tmpfs or ()]
    out += [(dst, os.path.isdir(src)) for src, dst, _ in plan.binds or ()]
    return out


def root_has(root: str, path: str, is_dir: bool) -> bool:
    """``path`` exists in ``root`` as a real directory/file, no symlink on the way."""
    p = root
    for part in path.strip("/").split("/"):
        if not part:
            continue
        p = os.path.join(p, part)
        if os.path.islink(p):
            return False
    return os.path.isdir(p) if is_dir else os.path.isfile(p)


def needs_overlay(plan, rootfs_path: str) -> bool:
    """A read-only root can use the cached image directly when every mount point already exists in it
    (a runtime would otherwise create the missing ones in the shared base). Otherwise: an overlay."""
    if not plan.read_only:
        return True
    dests = [*mount_destinations(plan), (plan.workdir, True)]
    return not all(root_has(rootfs_path, p, d) for p, d in dests)


def process_env(plan, rf, uid: str) -> list[str]:
    env: dict[str, str] = {}
    for item in rf.env:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = rf.home_for(uid)
    env["HOSTNAME"] = plan.hostname
    env.update(plan.env or {})
    return [f"{k}={v}" for k, v in env.items()]


def render(
    plan,
    rf,
    *,
    sandbox_id: str,
    runtime: str,
    root_path: str,
    seccomp: dict | None,
    seccomp_bpf_b64: str | None,
    annotations: dict[str, str] | None = None,
    memory_slack: int = MEMORY_SLACK,
) -> dict:
    """The complete config.json for one sandbox (``seccomp``: OCI linux.seccomp; ``seccomp_bpf_b64``:
    crun's precompiled form of the same filter, used instead when given)."""
    uid, _, gid = plan.user.partition(":")
    gid = gid or uid
    nofile = _host_nofile()
    no_caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    process = {
        "terminal": False,
        "user": {"uid": int(uid), "gid": int(gid), "additionalGids": [int(gid)], "umask": 0o022},
        "args": list(plan.entrypoint or []) + list(plan.cmd or []),
        "env": process_env(plan, rf, uid),
        "cwd": plan.workdir,
        "capabilities": no_caps,
        "noNewPrivileges": True,
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
        ],
    }
    resources: dict = {"devices": [{"allow": False, "access": "rwm"}]}
    if plan.memory_bytes is not None:
        resources["memory"] = {
            "limit": plan.memory_bytes + memory_slack,
            "swap": plan.memory_bytes + memory_slack,
        }
    if plan.cpus is not None:
        resources["cpu"] = {"quota": max(1000, int(plan.cpus * CPU_PERIOD)), "period": CPU_PERIOD}
    if plan.pids is not None:
        resources["pids"] = {"limit": host_pids_limit(runtime, plan.pids)}
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if plan.network == "none":
        namespaces.append({"type": "network"})
    elif plan.network == "netns":  # made by agentkernel.egress: one route, to the egress gateway
        namespaces.append({"type": "network", "path": plan.netns})
    else:  # never silently share the host's network
        raise AssertionError("the oci backend renders only network-less or egress-namespace sandboxes")
    linux: dict = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": f"/{cgroup_rel(sandbox_id)}/ctr",
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    ann = dict(annotations or {})
    if seccomp_bpf_b64 and runtime == "crun":
        ann["run.oci.seccomp_bpf_data"] = seccomp_bpf_b64
    elif seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": root_path, "readonly": bool(plan.read_only)},
        "hostname": plan.hostname,
        "mounts": standard_mounts(runtime) + plan_mounts(plan),
        "annotations": ann,
        "linux": linux,
    }
