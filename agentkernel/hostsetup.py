"""Host set-up for the chosen backends: what ``agentkernel setup`` checks, plans and does.

One :class:`Step` per piece of the host (system packages, engine configuration, the docker engine, the
in-sandbox agent, the WASI shell, local images, the oci rootfs cache, microVM guest images, Firecracker,
the reference system's published clients). Each step checks before it acts and says, before anything
changes, exactly what it would change (files written, commands run, packages installed). Applying a step
re-checks it first, so running set-up twice changes nothing the second time. A running dockerd is never
restarted; its configuration file is rewritten (and the daemon asked to reload it with SIGHUP) only when
its content differs from what agentkernel needs.

scripts/setup.sh bootstraps Python and the package, then runs ``agentkernel setup -y --all --dev
--reference-clients``; the package list of those options is exactly the one the script used to install.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import paths

BACKENDS = ("podman", "docker", "gvisor", "oci", "wasm", "qemu", "firecracker")
ALL_BACKENDS = ("podman", "docker", "gvisor", "oci", "wasm", "qemu")  # --all (firecracker is opt-in)

# Debian packages, by what needs them. --all --dev installs exactly the union (scripts/setup.sh's list).
PACKAGES: dict[str, tuple[str, ...]] = {
    "base": ("busybox-static", "debootstrap", "iproute2", "nftables", "util-linux", "procps", "openssl",
             "btrfs-progs"),
    "podman": ("podman", "crun", "runc", "uidmap", "slirp4netns", "containernetworking-plugins", "iptables"),
    "docker": ("docker.io", "containerd"),
    "gvisor": ("runsc",),
    "oci": ("crun", "runc", "runsc", "uidmap"),
    "wasm": ("clang", "lld", "wasi-libc", "libclang-rt-14-dev-wasm32"),
    "qemu": ("qemu-system-x86", "qemu-utils", "e2fsprogs", "lz4", "zstd"),
    "agent-build": ("musl-tools", "make", "gcc"),
    "dev": ("python3", "python3-venv", "python3-dev", "hyperfine", "docker-registry", "skopeo", "buildah"),
}
# which backends use which engine's image store for the local images
IMAGE_ENGINES = {"podman": "podman", "gvisor": "podman", "oci": "podman", "qemu": "podman", "docker": "docker"}

PODMAN_CONF = "/etc/containers/containers.conf.d/50-agentkernel.conf"
PODMAN_STORAGE_CONF = "/etc/containers/storage.conf"
# per-sandbox disk caps: loop-file btrfs volumes with quota groups (this kernel has no XFS/ext4 project
# quotas); podman's graphroot and dockerd's data-root live on them (docs/security.md, "Storage")
STORAGE_DIR = os.environ.get("AGENTKERNEL_STORAGE_DIR") or "/var/lib/agentkernel"
STORAGE_SIZE = os.environ.get("AGENTKERNEL_STORAGE_SIZE") or "64G"
DOCKERD_CONF = "/etc/agentkernel/dockerd.json"
RUNSC_NET_WRAPPER = "/usr/local/lib/agentkernel/runsc-agentkernel-net"  # = backends._runsc_net_wrapper.PATH
DOCKER_SOCK = "unix:///var/run/docker.sock"
DOCKER_PID = "/var/run/docker.pid"
REFNODE_VERSION = "0.18.1"
REFSDK_VERSION = "0.21.0"
# the coding agents whose own loaders read what `agentkernel plugin install` writes (tests/test_plugins.py)
AGENT_CLIS = {"@anthropic-ai/claude-code": "2.1.197", "@openai/codex": "0.171.0", "@google/gemini-cli": "0.61.0",
              "opencode-ai": "1.18.33"}


@dataclass
class Options:
    backends: list[str]
    images: list[str] = field(default_factory=list)  # default: the local images (busybox, debian)
    vm_images: list[str] = field(default_factory=lambda: ["agentkernel/busybox"])
    dev: bool = False  # the test tools (registry, skopeo, buildah, hyperfine)
    reference_clients: bool = False  # npm agentkernel / PyPI agentkernel-sdk under build/ (tests only)


@dataclass
class Finding:
    ok: bool
    detail: str
    plan: list[str] = field(default_factory=list)  # what applying would change, one line each
    manual: str | None = None  # set when it cannot be done automatically: what the user must do


@dataclass
class Step:
    name: str
    check: Callable[[], Finding]
    apply: Callable[[], str]  # returns one line saying what was done
    optional: bool = False  # for the tests only: a failure is reported and set-up goes on


class SetupError(Exception):
    pass


# ---- helpers ------------------------------------------------------------------------------------------


def log_dir() -> str:
    d = "/var/log/agentkernel" if os.geteuid() == 0 else os.path.join(paths.data_dir(), "logs")
    os.makedirs(d, exist_ok=True)
    return d


def _run_logged(argv: list[str], log: str, what: str, *, append: bool = False, env: dict | None = None) -> None:
    path = os.path.join(log_dir(), log)
    with open(path, "ab" if append else "wb") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    if rc != 0:
        with open(path, "rb") as f:
            tail = b"".join(f.readlines()[-20:]).decode(errors="replace")
        raise SetupError(f"{what} failed (exit {rc}; log: {path})\n{tail}")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _not_root(what: str) -> str | None:
    return None if os.geteuid() == 0 else f"{what} needs root: sudo agentkernel setup ..."


def _hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _source_dir(sub: str) -> str | None:
    """A directory of the source checkout (agent/, wasm/), or None for an installed wheel."""
    d = os.path.join(paths.repo_root(), sub)
    return d if os.path.isfile(os.path.join(d, "Makefile")) else None


# ---- system packages ----------------------------------------------------------------------------------


def wanted_packages(opts: Options) -> list[str]:
    groups = ["base", *opts.backends]
    if _source_dir("agent") is not None:
        groups.append("agent-build")
    if opts.dev:
        groups.append("dev")
    out: list[str] = []
    for g in groups:
        for p in PACKAGES.get(g, ()):
            if p not in out:
                out.append(p)
    return out


def _dpkg_installed(pkgs: list[str]) -> set[str]:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *pkgs], capture_output=True, text=True)
    return {ln.split()[0] for ln in r.stdout.splitlines() if ln.endswith(" install ok installed")}


def packages_step(opts: Options) -> Step:
    pkgs = wanted_packages(opts)

    def missing() -> list[str]:
        have = _dpkg_installed(pkgs)
        return [p for p in pkgs if p not in have]

    def check() -> Finding:
        if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
            return Finding(True, "not a Debian system: install the backends' engines with your package manager "
                                 "(agentkernel doctor says what is missing)")
        miss = missing()
        if not miss:
            return Finding(True, f"all {len(pkgs)} packages present")
        return Finding(False, f"{len(miss)} of {len(pkgs)} packages missing: {' '.join(miss)}",
                       plan=["apt-get update", "apt-get install -y " + " ".join(miss)],
                       manual=_not_root("installing packages"))

    def apply() -> str:
        miss = missing()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run_logged(["apt-get", "update", "-qq"], "apt.log", "apt-get update", env=env)
        _run_logged(["apt-get", "install", "-y", "-qq", *miss], "apt.log", "apt-get install", append=True, env=env)
        return f"installed {' '.join(miss)}"

    return Step("system packages", check, apply)


# ---- storage volumes ----------------------------------------------------------------------------------
# one for podman (graphroot), the wasm scratch and the sandboxes' capped workdirs; one for dockerd alone,
# because dockerd's btrfs driver switches quotas off on its whole filesystem when it shuts down


def _volumes() -> list[tuple[str, str, str]]:
    return [(f"{STORAGE_DIR}/storage.img", f"{STORAGE_DIR}/storage", "agentkernel"),
            (f"{STORAGE_DIR}/docker.img", f"{STORAGE_DIR}/docker", "agentkernel-docker")]


def _volume_ok(mnt: str) -> bool:
    if not os.path.ismount(mnt):
        return False
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", mnt], capture_output=True, text=True).stdout.strip()
    return fs == "btrfs" and subprocess.run(["btrfs", "qgroup", "show", mnt], capture_output=True).returncode == 0


def storage_step() -> Step:
    def check() -> Finding:
        bad = [(img, mnt) for img, mnt, _ in _volumes() if not _volume_ok(mnt)]
        if not bad:
            return Finding(True, f"btrfs volumes with quota groups at {', '.join(m for _, m, _ in _volumes())}")
        return Finding(False, f"not a btrfs volume with quotas: {', '.join(m for _, m in bad)}",
                       plan=[f"{img} ({STORAGE_SIZE} sparse, btrfs) mounted at {mnt}, quota groups enabled"
                             for img, mnt in bad], manual=_not_root("mounting the storage volumes"))

    def apply() -> str:
        for img, mnt, label in _volumes():
            os.makedirs(mnt, exist_ok=True)
            if not os.path.ismount(mnt):
                if not os.path.exists(img) or os.path.getsize(img) == 0:
                    subprocess.run(["truncate", "-s", STORAGE_SIZE, img], check=True)
                    _run_logged(["mkfs.btrfs", "-q", "-L", label, img], "storage.log", f"mkfs.btrfs {img}")
                _run_logged(["mount", "-o", "loop", img, mnt], "storage.log",
                            f"mounting {img} at {mnt} (loop devices and btrfs are needed)", append=True)
            fs = subprocess.run(["findmnt", "-no", "FSTYPE", mnt], capture_output=True, text=True).stdout.strip()
            if fs != "btrfs":
                raise SetupError(f"{mnt} is mounted but is not btrfs")
            if subprocess.run(["btrfs", "qgroup", "show", mnt], capture_output=True).returncode != 0:
                _run_logged(["btrfs", "quota", "enable", mnt], "storage.log", f"enabling quotas on {mnt}",
                            append=True)
        return "storage volumes ready"

    return Step("storage volumes (btrfs + quota groups for per-sandbox disk caps)", check, apply)


# ---- podman -------------------------------------------------------------------------------------------


def podman_conf_text() -> str:
    n = _hard_nofile()
    return ("# written by agentkernel scripts/setup.sh\n[containers]\n"
            f'default_ulimits = ["nofile={n}:{n}", "nproc=32768:32768"]\n\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')


def podman_conf_step() -> Step:
    # crun cannot raise RLIMIT_NOFILE above the hard limit root has without CAP_SYS_RESOURCE, and there may
    # be no systemd: cgroupfs manager and file events.
    def check() -> Finding:
        have = _read(PODMAN_CONF)
        if have == podman_conf_text():
            return Finding(True, PODMAN_CONF)
        return Finding(False, f"{PODMAN_CONF} {'differs' if have is not None else 'missing'}",
                       plan=[f"write {PODMAN_CONF} (nofile ulimit = the hard limit, cgroupfs, file events)"],
                       manual=_not_root(f"writing {PODMAN_CONF}"))

    def apply() -> str:
        _write_atomic(PODMAN_CONF, podman_conf_text())
        return f"wrote {PODMAN_CONF}"

    return Step("podman configuration", check, apply)


def podman_storage_text() -> str:
    return ("# written by agentkernel scripts/setup.sh (per-sandbox disk caps need the btrfs driver on this volume)\n"
            f'[storage]\ndriver = "btrfs"\ngraphroot = "{STORAGE_DIR}/storage/containers"\n'
            'runroot = "/run/containers/storage-btrfs"\n')


def podman_storage_step() -> Step:
    # the btrfs driver on the quota volume, so each container's root is a subvolume the podman backend caps
    # (prestart hook); a machine whose images were in the old graphroot gets them re-imported by "local images"
    def check() -> Finding:
        have = _read(PODMAN_STORAGE_CONF)
        if have == podman_storage_text():
            return Finding(True, PODMAN_STORAGE_CONF)
        return Finding(False, f"{PODMAN_STORAGE_CONF} {'differs' if have is not None else 'missing'}",
                       plan=[f"write {PODMAN_STORAGE_CONF} (btrfs driver, graphroot {STORAGE_DIR}/storage/containers)"],
                       manual=_not_root(f"writing {PODMAN_STORAGE_CONF}"))

    def apply() -> str:
        _write_atomic(PODMAN_STORAGE_CONF, podman_storage_text())
        return f"wrote {PODMAN_STORAGE_CONF}"

    return Step("podman storage", check, apply)


def _hugetlb_needed() -> bool:
    return os.path.isdir("/sys/fs/cgroup/unified") and not os.path.ismount("/sys/fs/cgroup/hugetlb")


def hugetlb_step() -> Step:
    # crun refuses a hybrid cgroup layout until hugetlb is mounted as a v1 controller
    def check() -> Finding:
        if not _hugetlb_needed():
            return Finding(True, "cgroup layout usable by crun")
        return Finding(False, "hybrid cgroups without the hugetlb v1 controller (crun refuses)",
                       plan=["mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb"],
                       manual=_not_root("mounting the hugetlb cgroup controller"))

    def apply() -> str:
        os.makedirs("/sys/fs/cgroup/hugetlb", exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", "/sys/fs/cgroup/hugetlb"], check=True)
        return "mounted the hugetlb cgroup controller"

    return Step("cgroup hugetlb controller", check, apply)


# ---- docker -------------------------------------------------------------------------------------------


def dockerd_conf_text() -> str:
    n = _hard_nofile()
    # runsc-agentkernel is the gvisor-docker backend's runtime: --oci-seccomp applies the sandbox's seccomp
    # profile (runsc ignores it otherwise), --host-uds=create lets the host reach the agent's socket.
    # runsc-agentkernel-net is the same with --network=host, used only for sandboxes in the egress namespace
    # (network modes open and allowlist: the namespace's firewall then sees every packet of the Sentry); its
    # executable is our wrapper, which points the bundle at that namespace (runsc_net_wrapper_step).
    return f"""{{
  "storage-driver": "btrfs",
  "data-root": "{STORAGE_DIR}/docker/data",
  "iptables": false,
  "ip6tables": false,
  "ip-masq": false,
  "bridge": "none",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "default-ulimits": {{"nofile": {{"Name": "nofile", "Hard": {n}, "Soft": {n}}}}},
  "runtimes": {{
    "crun": {{"path": "/usr/bin/crun"}},
    "runsc": {{"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--platform=ptrace"]}},
    "runsc-agentkernel": {{"path": "/usr/bin/runsc",
      "runtimeArgs": ["--network=none", "--platform=ptrace", "--oci-seccomp", "--host-uds=create"]}},
    "runsc-agentkernel-net": {{"path": "{RUNSC_NET_WRAPPER}",
      "runtimeArgs": ["--network=host", "--platform=ptrace", "--oci-seccomp", "--host-uds=create"]}}
  }}
}}
"""


def runsc_net_wrapper_step() -> Step:
    """gvisor-docker's networked runtime (backends/_runsc_net_wrapper.py): written before dockerd's
    configuration names it; rewritten only when it differs."""
    def check() -> Finding:
        have = _read(RUNSC_NET_WRAPPER)
        if have == _runsc_net_wrapper_text():
            return Finding(True, RUNSC_NET_WRAPPER)
        return Finding(False, f"{RUNSC_NET_WRAPPER} {'differs' if have is not None else 'missing'}",
                       plan=[f"write {RUNSC_NET_WRAPPER} (runsc for gvisor-docker sandboxes with network: joins "
                             "the sandbox's egress namespace)"],
                       manual=_not_root(f"writing {RUNSC_NET_WRAPPER}"))

    def apply() -> str:
        _write_atomic(RUNSC_NET_WRAPPER, _runsc_net_wrapper_text())
        os.chmod(RUNSC_NET_WRAPPER, 0o755)
        return f"wrote {RUNSC_NET_WRAPPER}"

    return Step("gvisor-docker network runtime", check, apply)


def _runsc_net_wrapper_text() -> str:
    from .backends import _runsc_net_wrapper

    return _runsc_net_wrapper.text()  # /usr/bin/runsc, as the other runsc runtimes registered below


def docker_up() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "-H", DOCKER_SOCK, "version", "--format", "{{.Server.Version}}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def _dockerd_pid() -> int | None:
    try:
        pid = int((_read(DOCKER_PID) or "").strip())
        os.kill(pid, 0)
        return pid
    except (ValueError, OSError):
        return None


def dockerd_conf_step() -> Step:
    def check() -> Finding:
        have = _read(DOCKERD_CONF)
        if have == dockerd_conf_text():
            return Finding(True, DOCKERD_CONF)
        plan = [f"write {DOCKERD_CONF} (overlay2, no iptables/bridge, cgroupfs, runtimes crun, runsc, "
                "runsc-agentkernel, runsc-agentkernel-net)"]
        if docker_up() and _dockerd_pid():
            plan.append(f"send SIGHUP to the running dockerd (pid {_dockerd_pid()}) to reload its runtimes "
                        "(no restart)")
        return Finding(False, f"{DOCKERD_CONF} {'differs' if have is not None else 'missing'}", plan=plan,
                       manual=_not_root(f"writing {DOCKERD_CONF}"))

    def apply() -> str:
        _write_atomic(DOCKERD_CONF, dockerd_conf_text())
        pid = _dockerd_pid()
        if pid and docker_up():
            os.kill(pid, signal.SIGHUP)  # runtimes are reloadable
            return f"wrote {DOCKERD_CONF}; dockerd (pid {pid}) reloaded it"
        return f"wrote {DOCKERD_CONF}"

    return Step("docker engine configuration", check, apply)


def _docker_storage() -> str:
    r = subprocess.run(["docker", "-H", DOCKER_SOCK, "info", "--format", "{{.Driver}} {{.DockerRootDir}}"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def dockerd_storage_step() -> Step:
    """Storage driver and data-root are not reloadable: a dockerd running with other ones is restarted (the
    only restart set-up ever does, and only when its storage must move)."""
    want = f"btrfs {STORAGE_DIR}/docker/data"

    def check() -> Finding:
        if not docker_up():
            return Finding(True, "dockerd not running (started with the right storage below)")
        have = _docker_storage()
        if have == want:
            return Finding(True, f"dockerd storage: {have}")
        return Finding(False, f"dockerd storage is {have!r}, not {want!r}",
                       plan=[f"restart dockerd (pid {_dockerd_pid()}): its storage moves to {STORAGE_DIR}/docker/data "
                             "(btrfs driver); its containers stop"], manual=_not_root("restarting dockerd"))

    def apply() -> str:
        pid = _dockerd_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            if not docker_up():
                return "dockerd stopped (started again below with the new storage)"
            time.sleep(0.1)
        raise SetupError("dockerd did not stop within 30 s")

    return Step("docker engine storage", check, apply)


def dockerd_step() -> Step:
    def check() -> Finding:
        if docker_up():
            return Finding(True, f"dockerd answering on {DOCKER_SOCK}")
        if not os.path.exists("/usr/sbin/dockerd"):
            return Finding(False, "dockerd is not installed (the system packages step installs docker.io)",
                           plan=[f"start /usr/sbin/dockerd --config-file {DOCKERD_CONF}"])
        return Finding(False, "dockerd is not running",
                       plan=[f"start /usr/sbin/dockerd --config-file {DOCKERD_CONF} in the background "
                             f"(log: {os.path.join(log_dir(), 'dockerd.log')})"],
                       manual=_not_root("starting dockerd"))

    def apply() -> str:
        if os.path.exists(DOCKER_PID) and _dockerd_pid() is None:
            os.unlink(DOCKER_PID)  # stale
        log = os.path.join(log_dir(), "dockerd.log")
        with open(log, "ab") as out:
            subprocess.Popen(["/usr/sbin/dockerd", "--config-file", DOCKERD_CONF], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        for _ in range(100):
            if docker_up():
                return "dockerd started"
            time.sleep(0.1)
        raise SetupError(f"dockerd did not answer within 10 s (log: {log})")

    return Step("docker engine", check, apply)


# ---- built artifacts ----------------------------------------------------------------------------------


def _make_stale(d: str) -> bool:
    return subprocess.run(["make", "-q", "-C", d], capture_output=True).returncode != 0


def agent_step() -> Step:
    def check() -> Finding:
        src = _source_dir("agent")
        have = paths.agent_binary()
        if src is not None and shutil.which("make") and _make_stale(src):
            return Finding(False, "in-sandbox agent binary: " + ("out of date" if have else "missing"),
                           plan=[f"make -C {src}"])
        if have is None:
            if src is None:
                return Finding(False, "in-sandbox agent binary: missing", manual="reinstall the package (its wheel "
                               "carries the agent) or set AGENTKERNEL_AGENT_BIN")
            return Finding(False, "in-sandbox agent binary: missing", plan=[f"make -C {src}"])
        return Finding(True, f"in-sandbox agent binary: {have}")

    def apply() -> str:
        src = _source_dir("agent")
        assert src is not None
        _run_logged(["make", "-s", "-C", src], "agent-build.log", "building the agent")
        return f"built {paths.agent_binary()}"

    return Step("in-sandbox agent", check, apply)


def _wasm_precompiled() -> bool:
    try:
        from .wasm import python as py
        from .wasm import shell
        from .wasm.cache import default_cache
        from .wasm.runtime import get_engine

        cache = default_cache()
        _, ekey = get_engine(False)
        for mod in (shell.aksh_path(), py.cpython_path(), py.micropython_path()):
            digest, _ = cache.file_sha256(mod)
            art = cache.artifact_path(digest, ekey)
            if art is None or not os.path.exists(art):
                return False
        return True
    except Exception:  # any failure means "not compiled yet"; apply() reports the real error
        return False


def wasm_step() -> Step:
    def check() -> Finding:
        src = _source_dir("wasm")
        plan = []
        if src is not None and shutil.which("make") and _make_stale(src):
            plan.append(f"make -C {src}")
        if not _wasm_precompiled():
            plan.append("compile the WASI shell, CPython and MicroPython guests into the module cache")
        if not plan:
            return Finding(True, "WASI shell built, guests compiled")
        return Finding(False, "WASI shell or guest compilation missing", plan=plan)

    def apply() -> str:
        src = _source_dir("wasm")
        if src is not None:
            _run_logged(["make", "-s", "-C", src], "wasm-build.log", "building the wasm shell")
        code = ("from agentkernel.wasm import runtime as rt, python as py, shell; rt.load_module(shell.aksh_path()); "
                "rt.load_module(py.cpython_path()); rt.load_module(py.micropython_path())")
        _run_logged([sys.executable, "-c", code], "wasm-build.log", "compiling the wasm guests", append=True)
        return "WASI shell built, guests compiled"

    return Step("wasm shell", check, apply)


def _engine_ok(engine: str) -> bool:
    if shutil.which(engine) is None:
        return False
    return engine != "docker" or docker_up()


def images_step(opts: Options) -> Step:
    from .images import LOCAL_IMAGES

    engines = sorted({IMAGE_ENGINES[b] for b in opts.backends if b in IMAGE_ENGINES})
    images = [i for i in LOCAL_IMAGES if not opts.images or i in opts.images or i.split("/")[-1] in opts.images]

    def missing() -> list[tuple[str, str]]:
        from .images import build

        out = []
        for e in engines:
            if not _engine_ok(e):
                out.append((e, "*"))
                continue
            for i in images:
                recipe_fn, _ = build.IMAGES[i]
                if build._engine_recipe(e, i) != recipe_fn():
                    out.append((e, i))
        return out

    def check() -> Finding:
        if not engines:
            return Finding(True, "no engine images needed")
        miss = missing()
        if not miss:
            return Finding(True, f"{', '.join(images)} up to date in {', '.join(engines)}")
        plan = [f"build {i} (busybox-static or debootstrap) and import it into {e}" if i != "*"
                else f"build {', '.join(images)} into {e} (once the engine is installed and running)"
                for e, i in miss]
        return Finding(False, "missing or outdated: " + ", ".join(f"{i} in {e}" for e, i in miss), plan=plan)

    def apply() -> str:
        from .images import build

        for i in images:
            build.ensure_image(i, [e for e in engines if _engine_ok(e)])
        return f"{', '.join(images)} up to date in {', '.join(engines)}"

    return Step("local images", check, apply)


def oci_step(opts: Options) -> Step:
    from .images import LOCAL_IMAGES

    images = [i for i in LOCAL_IMAGES if not opts.images or i in opts.images or i.split("/")[-1] in opts.images]

    def check() -> Finding:
        from .oci import rootfs

        miss = [i for i in images if rootfs.lookup_cached(i) is None]
        if not miss:
            return Finding(True, f"rootfs cache holds {', '.join(images)}")
        return Finding(False, f"rootfs cache lacks {', '.join(miss)}",
                       plan=[f"unpack {', '.join(miss)} into {rootfs.rootfs_dir()}; precompile the seccomp "
                             "profiles with crun"])

    def apply() -> str:
        _run_logged([sys.executable, "-m", "agentkernel.oci", "prepare", *images], "oci-prepare.log", "oci prepare")
        return "oci rootfs cache ready"

    return Step("oci backend (rootfs cache, precompiled seccomp)", check, apply)


def _vm_ready(image: str) -> bool:
    """Cheap check of what guestimage.build() caches: the unpacked kernel and the image's ext4 root."""
    import hashlib

    from .oci import rootfs
    from .vm import guestimage as g

    d = g.vm_dir()
    names = os.listdir(d)
    if g._find_kernel_deb() is None or not any(n.startswith("kernel-") for n in names):
        return False
    if not any(n.startswith("initramfs-") for n in names):
        return False
    rf = rootfs.lookup_cached(image)
    if rf is None:
        return False
    key = hashlib.sha256(f"{g.BUILDER_VERSION}|{rf.id}".encode()).hexdigest()[:16]
    return os.path.exists(os.path.join(d, f"rootfs-{key}.ext4"))


def vm_step(opts: Options) -> Step:
    def check() -> Finding:
        try:
            miss = [i for i in opts.vm_images if not _vm_ready(i)]
        except OSError:
            miss = list(opts.vm_images)
        if not miss:
            return Finding(True, f"guest images of {', '.join(opts.vm_images)} (content-keyed; re-checked when built)")
        return Finding(False, f"guest images missing for {', '.join(miss)}",
                       plan=[f"agentkernel images build --vm {' '.join(opts.vm_images)} (Debian cloud kernel via "
                             "apt-get download, initramfs with the agent as init, ext4 root)"])

    def apply() -> str:
        _run_logged([sys.executable, "-m", "agentkernel", "images", "build", "--vm", *opts.vm_images],
                    "vm-images.log", "building the microVM guest images")
        return "microVM guest images ready"

    return Step("microVM guest images", check, apply)


def firecracker_step() -> Step:
    from .vm import fcinstall

    def check() -> Finding:
        if fcinstall.installed_version(fcinstall.DEFAULT_DEST) == fcinstall.VERSION:
            return Finding(True, f"firecracker {fcinstall.VERSION} in {fcinstall.DEFAULT_DEST}")
        return Finding(False, "firecracker missing",
                       plan=[f"pip download {fcinstall.WHEEL} (no install) and copy firecracker + jailer "
                             f"{fcinstall.VERSION} to {fcinstall.DEFAULT_DEST}"],
                       manual=_not_root(f"writing {fcinstall.DEFAULT_DEST}"))

    def apply() -> str:
        return fcinstall.install()

    return Step("firecracker", check, apply)


def reference_clients_step() -> Step:
    # The reference system's published clients, for the compatibility tests (tests/api/test_api_refclients.py),
    # each in its own directory under build/ (the Python SDK's import name is ours too: never in the venv).
    build = os.path.join(paths.repo_root(), "build")
    npm_dir, sdk_dir = os.path.join(build, "refnode"), os.path.join(build, f"refsdk-{REFSDK_VERSION}")

    def npm_ok() -> bool:
        text = _read(os.path.join(npm_dir, "node_modules", "agentkernel", "package.json")) or "{}"
        try:
            return json.loads(text).get("version") == REFNODE_VERSION
        except ValueError:
            return False

    def check() -> Finding:
        plan = []
        if not npm_ok():
            plan.append(f"npm install --prefix {npm_dir} agentkernel@{REFNODE_VERSION}" if shutil.which("npm")
                        else "(npm missing: the npm reference client tests will be skipped)")
        if not os.path.isdir(os.path.join(sdk_dir, "agentkernel")):
            plan.append(f"pip install --no-deps --target {sdk_dir} agentkernel-sdk=={REFSDK_VERSION}")
        if not plan:
            return Finding(True, f"npm agentkernel {REFNODE_VERSION}, agentkernel-sdk {REFSDK_VERSION} present")
        return Finding(False, "reference clients missing", plan=plan)

    def apply() -> str:
        done = []
        if not npm_ok() and shutil.which("npm"):
            os.makedirs(npm_dir, exist_ok=True)
            _run_logged(["npm", "install", "--no-audit", "--no-fund", "--prefix", npm_dir,
                         f"agentkernel@{REFNODE_VERSION}"], "npm-refclient.log", "npm install")
            done.append(f"npm agentkernel {REFNODE_VERSION}")
        if not os.path.isdir(os.path.join(sdk_dir, "agentkernel")):
            _run_logged([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", sdk_dir,
                         f"agentkernel-sdk=={REFSDK_VERSION}"], "pip-refsdk.log", "pip install agentkernel-sdk")
            done.append(f"agentkernel-sdk {REFSDK_VERSION}")
        return "installed " + ", ".join(done) if done else "nothing to install"

    return Step("reference clients (compatibility tests)", check, apply, optional=True)


def agent_clis_dir() -> str:
    return os.path.join(paths.repo_root(), "build", "agentclis")


def agent_clis_step() -> Step:
    """Claude Code, Codex, Gemini CLI and OpenCode (npm), under build/agentclis: the plugin tests load the
    files `plugin install` writes with each agent's own configuration loader (`<agent> mcp list`)."""
    d = agent_clis_dir()

    def missing() -> list[str]:
        out = []
        for pkg, version in AGENT_CLIS.items():
            text = _read(os.path.join(d, "node_modules", pkg, "package.json")) or "{}"
            try:
                ok = json.loads(text).get("version") == version
            except ValueError:
                ok = False
            if not ok:
                out.append(f"{pkg}@{version}")
        return out

    def check() -> Finding:
        miss = missing()
        if not miss:
            return Finding(True, "Claude Code, Codex, Gemini CLI, OpenCode present")
        if shutil.which("npm") is None:
            return Finding(False, "agent CLIs missing", manual="npm is not installed (the plugin loader tests "
                           "will be skipped)")
        return Finding(False, f"missing: {' '.join(miss)}",
                       plan=[f"npm install --prefix {d} {' '.join(miss)} (~1 GB)"])

    def apply() -> str:
        miss = missing()
        os.makedirs(d, exist_ok=True)
        _run_logged(["npm", "install", "--no-audit", "--no-fund", "--prefix", d, *miss], "npm-agentclis.log",
                    "npm install of the agent CLIs")
        return f"installed {' '.join(miss)}"

    return Step("coding agent CLIs (plugin tests)", check, apply, optional=True)


# ---- the plan -----------------------------------------------------------------------------------------


def steps(opts: Options) -> list[Step]:
    """The steps the chosen backends need, in the order they must run."""
    b = set(opts.backends)
    out = [packages_step(opts)]
    if b & {"podman", "docker", "gvisor", "oci", "wasm", "qemu"}:
        out.append(storage_step())
    if b & {"podman", "gvisor", "oci", "qemu"}:
        out += [podman_conf_step(), podman_storage_step(), hugetlb_step()]
    if "docker" in b:
        out += [runsc_net_wrapper_step(), dockerd_conf_step(), dockerd_storage_step(), dockerd_step()]
    out.append(agent_step())
    if "wasm" in b:
        out.append(wasm_step())
    if b & set(IMAGE_ENGINES):
        out.append(images_step(opts))
    if b & {"oci", "qemu"}:
        out.append(oci_step(opts))
    if b & {"qemu", "firecracker"}:
        out.append(vm_step(opts))
    if "firecracker" in b:
        out.append(firecracker_step())
    if opts.reference_clients:
        out += [reference_clients_step(), agent_clis_step()]
    return out


def check_all(opts: Options) -> list[tuple[Step, Finding]]:
    out = []
    for s in steps(opts):
        try:
            f = s.check()
        except Exception as exc:  # a check that cannot run is reported, not fatal
            f = Finding(False, f"cannot check: {exc}", manual=str(exc))
        out.append((s, f))
    return out
