"""OCI runtime invocations (crun, runc, runsc), the sandbox's cgroups, mounts and state, and the
clean-up that removes all of it from a sandbox id alone.

Layout (``<rt>`` = ``paths.runtime_dir()``, e.g. /run/agentkernel):
- ``<rt>/oci/bundles/<id>/``: ``config.json``, ``meta.json`` (runtime, image), ``rootfs/`` (the overlay
  mount point: empty on the host), ``upper/`` + ``work/`` or ``layer/`` (the sandbox's writable layer; a
  tmpfs of disk_mb), ``init.pid`` (the container's init), ``console.log`` (named sandboxes),
  ``runsc-<command>.log`` (runsc only: its own log of the sandbox it started, ``run_log_flags``).
- ``<rt>/oci/state/<runtime>/``: the runtime's own ``--root`` (only our containers are in it).
- cgroups: ``agentkernel/<id>`` in every hierarchy (the memory limit and OOM watch sit here), the
  container itself in ``agentkernel/<id>/ctr``.

The overlay root is mounted in a private mount namespace made just for the runtime process
(``unshare(CLONE_NEWNS)`` + ``mount``, then exec of the runtime: ``launch``, by ``ak-agent spawn-runtime``
or else ``Preexec``): the container's own mount namespace is a copy of it, so the overlay lives exactly
as long as the container and never appears in the host's mount table; a killed CLI or runtime cannot
leak it. crun and runc containers are removed without exec'ing the runtime (``delete_container``,
``destroy``). Nothing here imports asyncio.
"""

from __future__ import annotations

import _signal as signal  # not `signal`: it imports enum (~5 ms on the one-shot path)
import os

from .._proc import Proc, WaitTimeout  # noqa: F401  (re-exported: the one-shot's process handle)
from ..errors import BackendUnavailable

RUNTIMES = ("crun", "runc", "runsc")
DEFAULT_RUNTIME = "crun"
_CANDIDATES = {
    "crun": ("/usr/bin/crun", "/usr/local/bin/crun"),
    "runc": ("/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc"),
    "runsc": ("/usr/bin/runsc", "/usr/local/bin/runsc"),
}
# gVisor, always: the ptrace platform (kvm hangs on PVM hosts), the spec's seccomp applied inside the
# sandbox too, and host-backed unix sockets so the agent's socket in the bind-mounted run dir is
# reachable from the host. Network: none, or (network modes open/allowlist) ``host`` inside the
# namespace agentkernel.egress made: the Sentry's sockets are host sockets in that namespace, so its
# firewall (output hook) sees every packet. ``sandbox`` (gVisor's own stack) would write frames through
# a packet socket, past that hook, and this runsc refuses it anyway (its root-netns check misfires).
RUNSC_FLAGS = ("--network=none", "--platform=ptrace", "--oci-seccomp", "--host-uds=create")
RUNSC_NET_FLAGS = ("--network=host", *RUNSC_FLAGS[1:])
INSTALL_HINT = {
    "crun": "apt-get install -y crun (bash scripts/setup.sh installs it)",
    "runc": "apt-get install -y runc (bash scripts/setup.sh installs it)",
    "runsc": "apt-get install -y runsc (bash scripts/setup.sh installs it)",
}


def binary(runtime: str) -> str | None:
    for cand in _CANDIDATES.get(runtime, ()):
        if os.access(cand, os.X_OK):
            return cand
    import shutil

    return shutil.which(runtime)


def require_binary(runtime: str) -> str:
    exe = binary(runtime)
    if exe is None:
        raise BackendUnavailable(
            f"the OCI runtime {runtime!r} is not installed",
            hint=INSTALL_HINT.get(runtime, f"install {runtime}"),
        )
    return os.path.realpath(exe)


# ---- directories --------------------------------------------------------------------------------------


_OCI_DIR: dict[str, str] = {}


def oci_dir() -> str:
    """``<runtime dir>/oci``, symlinks resolved (runc needs absolute, resolved bundle/rootfs paths)."""
    from .. import paths

    base = paths.runtime_dir()
    d = _OCI_DIR.get(base)
    if d is None:
        d = _OCI_DIR[base] = os.path.join(os.path.realpath(base), "oci")
    return d


def bundles_dir() -> str:
    return os.path.join(oci_dir(), "bundles")


def bundle_dir(sandbox_id: str) -> str:
    return os.path.join(bundles_dir(), sandbox_id)


def state_root(runtime: str) -> str:
    return os.path.join(oci_dir(), "state", runtime)


def base_cmd(runtime: str, exe: str, network: bool = False) -> list[str]:
    """``network``: the sandbox joins an egress namespace (runsc then uses host sockets inside it)."""
    cmd = [exe, "--root", state_root(runtime)]
    if runtime == "runsc":
        cmd += RUNSC_NET_FLAGS if network else RUNSC_FLAGS
    return cmd


def run_log_flags(runtime: str, sandbox_id: str) -> list[str]:
    """Global flags for the runtime command that starts the sandbox: runsc writes its own log (info level:
    start-up, mounts, and why the sandbox exited: the application's exit, a lost gofer, a panic) to one
    file per runsc process kind in the bundle, ``runsc-boot.log`` for the sandbox; it goes with the bundle.
    crun and runc: none (their errors reach the console)."""
    if runtime != "runsc":
        return []
    return [f"--debug-log={os.path.join(bundle_dir(sandbox_id), 'runsc-%COMMAND%.log')}"]


def exit_reason(sandbox_id: str) -> str | None:
    """The last line of runsc's sandbox log that says why it stopped (an exit status, a killed container, an
    error or a panic), without the log's own prefix; None without such a line (e.g. the sandbox process
    itself was SIGKILLed: its log just ends)."""
    try:
        with open(os.path.join(bundle_dir(sandbox_id), "runsc-boot.log"), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - (1 << 18)))  # a panic is followed by a goroutine dump of ~60 KiB
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    keys = ("exit", "kill", "panic", "fatal", "error", "signal", "disconnect")
    for line in lines:  # the sentry's Go panic (then a goroutine dump): that is the reason
        if line.startswith(("panic: ", "fatal error: ")):
            return line.strip()
    for line in reversed(lines):
        # glog: "I1203 10:45:50.922267    3796 boot.go:389] message"; W/E/F: warnings, errors, fatal
        head, sep, msg = line.partition("] ")
        if not sep or not head or head[0] not in "IWEF":
            continue
        if "Exiting with status" in msg or "Stopping watchdog" in msg or "Watchdog stopped" in msg:
            continue  # runsc's own exit, after the line that says why
        if head[0] in "EF" or any(k in msg.lower() for k in keys):
            return msg.strip()
    return None


def read_meta(sandbox_id: str) -> dict:
    try:
        import json

        with open(os.path.join(bundle_dir(sandbox_id), "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def rmtree(path: str) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` without importing shutil (~2.5 ms on the hot path).
    Never follows symlinks; works on directories without write/search permission for their owner."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    try:
        entries = list(os.scandir(path))
    except PermissionError:
        os.chmod(path, 0o700)
        entries = list(os.scandir(path))
    except OSError:
        entries = []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            rmtree(e.path)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def write_json(path: str, data: dict) -> None:
    from .._fastjson import dumps  # no `json` import on the one-shot path

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(dumps(data))
    os.replace(tmp, path)


# ---- cgroups --------------------------------------------------------------------------------------------

_HIERARCHIES: list[tuple[str, str, set[str]]] | None = None


def hierarchies() -> list[tuple[str, str, set[str]]]:
    """Mounted cgroup hierarchies: (mount point, 'cgroup' or 'cgroup2', controllers)."""
    global _HIERARCHIES
    if _HIERARCHIES is None:
        out: list[tuple[str, str, set[str]]] = []
        seen: set[str] = set()
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    pre, _, post = line.partition(" - ")
                    fields = post.split()
                    if len(fields) < 3 or fields[0] not in ("cgroup", "cgroup2"):
                        continue
                    mnt = pre.split()[4]
                    if mnt in seen or pre.split()[3] != "/":
                        continue
                    seen.add(mnt)
                    ctrls = set(fields[2].split(",")) if fields[0] == "cgroup" else set()
                    out.append((mnt, fields[0], ctrls))
        except OSError:
            pass
        _HIERARCHIES = out
    return _HIERARCHIES


def memory_hierarchy() -> tuple[str, int] | None:
    """(mount point, version) of the hierarchy that does memory accounting."""
    hs = hierarchies()
    for mnt, kind, ctrls in hs:
        if kind == "cgroup" and "memory" in ctrls:
            return mnt, 1
    for mnt, kind, _ in hs:
        if kind == "cgroup2" and os.path.exists(os.path.join(mnt, "cgroup.controllers")):
            try:
                with open(os.path.join(mnt, "cgroup.controllers")) as f:
                    if "memory" in f.read().split():
                        return mnt, 2
            except OSError:
                pass
    return None


def cgroup_dirs(sandbox_id: str) -> list[str]:
    from .bundle import cgroup_rel

    rel = cgroup_rel(sandbox_id)
    return [os.path.join(mnt, rel) for mnt, _, _ in hierarchies()]


class MemoryWatch:
    """The sandbox's parent memory cgroup: holds the memory limit (v1) and tells whether the OOM killer
    fired inside it (v1: an eventfd on memory.oom_control; v2: the hierarchical memory.events)."""

    def __init__(self, sandbox_id: str, limit: int | None, watch: bool) -> None:
        from .bundle import cgroup_rel

        self.efd = -1
        self.path = None
        self.version = 0
        self.v2_before = 0
        mh = memory_hierarchy()
        if mh is None:
            return
        mnt, self.version = mh
        self.path = os.path.join(mnt, cgroup_rel(sandbox_id))
        os.makedirs(self.path, exist_ok=True)
        if self.version == 1:
            if limit is not None:
                _write(os.path.join(self.path, "memory.limit_in_bytes"), str(limit))
                try:
                    _write(os.path.join(self.path, "memory.memsw.limit_in_bytes"), str(limit))
                except OSError:
                    pass  # no swap accounting: nothing to cap
            if watch:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                ofd = os.open(os.path.join(self.path, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _write(os.path.join(self.path, "cgroup.event_control"), f"{efd} {ofd}")
                    self.efd = efd
                except OSError:
                    os.close(efd)
                finally:
                    os.close(ofd)

    def oom_killed(self) -> bool:
        if self.version == 1 and self.efd >= 0:
            try:
                return os.eventfd_read(self.efd) > 0
            except BlockingIOError:
                return False
        if self.version == 2 and self.path:
            return _v2_oom_kills(self.path) > self.v2_before
        return False

    def close(self) -> None:
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1


def _v2_oom_kills(path: str) -> int:
    return _oom_kill_line(os.path.join(path, "memory.events"))


def _oom_kill_line(path: str) -> int:
    """The ``oom_kill N`` line of a cgroup file (v2 memory.events, v1 memory.oom_control); 0 without one."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def container_oom_kills(sandbox_id: str) -> int:
    """OOM kills recorded in the container's own memory cgroup (v1 memory.oom_control / v2 events)."""
    mh = memory_hierarchy()
    if mh is None:
        return 0
    from .bundle import cgroup_rel

    path = os.path.join(mh[0], cgroup_rel(sandbox_id), "ctr")
    return _oom_kill_line(os.path.join(path, "memory.events" if mh[1] == 2 else "memory.oom_control"))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _scan_cgroups(sandbox_id: str) -> tuple[set[int], list[str]]:
    """(pids, dirs) of the sandbox's cgroups in every hierarchy; ``dirs`` lists every parent before its
    children. A directory is listed only when it has subdirectories (kernfs: ``st_nlink`` = 2 + subdirs),
    so a leaf costs one open+read of its ``cgroup.procs`` and one stat."""
    pids: set[int] = set()
    dirs: list[str] = []
    for top in cgroup_dirs(sandbox_id):
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                fd = os.open(os.path.join(d, "cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # no such cgroup (this hierarchy, or removed meanwhile)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    pids.update(int(x) for x in _read_fd(fd).split())
                except (OSError, ValueError):
                    pass
                finally:
                    os.close(fd)
            dirs.append(d)
            try:
                if os.stat(d).st_nlink != 2:  # subdirectories (or a filesystem that does not count them)
                    with os.scandir(d) as it:
                        stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                pass
    return pids, dirs


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def cgroup_pids(sandbox_id: str) -> set[int]:
    return _scan_cgroups(sandbox_id)[0]


def _kill_and_wait(pids: set[int], deadline: float) -> bool:
    """SIGKILL ``pids`` and wait until they have exited (pidfds: woken the moment they have), at most
    until ``deadline``. False: no pidfds here (the caller polls instead)."""
    import select
    import time

    p = select.poll()
    fds = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # already gone
            except OSError:
                for q in pids:
                    try:
                        os.kill(q, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                return False
            fds.append(fd)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.register(fd, select.POLLIN)
        left = len(fds)
        while left:
            ms = int((deadline - time.monotonic()) * 1000)
            if ms <= 0:
                break
            for fd, _ in p.poll(ms):
                p.unregister(fd)
                left -= 1
        return True
    finally:
        for fd in fds:
            os.close(fd)


def kill_cgroups(sandbox_id: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in the sandbox's cgroups until none is left (or ``timeout``)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(sandbox_id)
        if not pids:
            return
        if not _kill_and_wait(pids, deadline) and time.monotonic() < deadline:
            time.sleep(0.01)
        if time.monotonic() >= deadline:
            return


def clear_cgroups(sandbox_id: str, timeout: float = 5.0) -> list[str]:
    """``kill_cgroups`` then ``remove_cgroups`` (returns the dirs left), reading the cgroups once in the
    usual case: the processes found are SIGKILLed and awaited, then every dir is removed, deepest first;
    a removed cgroup provably held no process (rmdir refuses a populated one). A dir still busy (a
    process that got in after the read) sends the sandbox through kill_cgroups + remove_cgroups."""
    import time

    pids, dirs = _scan_cgroups(sandbox_id)
    # killed processes are gone in milliseconds; ones that are not within 1 s are frozen (a runtime killed
    # mid-way through its own freeze-kill-thaw) or stuck: the slow path thaws and retries
    if pids and not _kill_and_wait(pids, time.monotonic() + min(timeout, 1.0)):
        return _clear_slowly(sandbox_id, timeout)
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY (a process in it), ENOTEMPTY (a subdir made after the read)
            return _clear_slowly(sandbox_id, timeout)
    return []


def _clear_slowly(sandbox_id: str, timeout: float) -> list[str]:
    _thaw(sandbox_id)
    kill_cgroups(sandbox_id, timeout)
    return remove_cgroups(sandbox_id)


def _thaw(sandbox_id: str) -> None:
    """Thaw every frozen cgroup of the sandbox (v1 ``freezer.state``, v2 ``cgroup.freeze``): a frozen
    process does not die of SIGKILL until thawed."""
    for top in cgroup_dirs(sandbox_id):
        for d, _, files in os.walk(top):
            for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                if name in files:
                    try:
                        _write(os.path.join(d, name), value)
                    except OSError:
                        pass


def remove_cgroups(sandbox_id: str, retries: int = 50) -> list[str]:
    """rmdir the sandbox's cgroup dirs, deepest first, in every hierarchy. Returns those left."""
    import time

    left: list[str] = []
    for top in cgroup_dirs(sandbox_id):
        if not os.path.isdir(top):
            continue
        dirs = [d for d, _, _ in os.walk(top)]
        for d in sorted(dirs, key=len, reverse=True):
            for i in range(retries):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a dying task still charged; try again shortly
                    if i == retries - 1:
                        left.append(d)
                    else:
                        time.sleep(0.01)
    return left


def remove_parent_cgroups(sandbox_id: str) -> None:
    """Fast path after a clean run: the runtime removed ``.../ctr``; drop the per-sandbox parents."""
    from .bundle import cgroup_rel

    rel = cgroup_rel(sandbox_id)
    for mnt, _, _ in hierarchies():
        try:
            os.rmdir(os.path.join(mnt, rel))
        except FileNotFoundError:
            pass
        except OSError:
            remove_cgroups(sandbox_id)
            return


# ---- the runtime process: private mount namespace with the overlay root --------------------------------

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MS_RDONLY = 1
PR_SET_PDEATHSIG = 1
# In the agent's usage text: a build of ak-agent whose ``spawn-runtime`` has every option used here.
SPAWN_MARK = b"[--tmpfs TARGET OPTIONS] [--mkdir PATH MODE UID GID]... [--ro-runtime]]"


def overlay_options(overlay: tuple[str, str, str, str]) -> tuple[str, str]:
    """(mount point, mount options) of the overlay ``(lower, upper, work, target)``."""
    lower, upper, work, target = overlay
    for p in (lower, upper, work):
        if "," in p or ":" in p:
            raise ValueError(f"overlay path contains ',' or ':': {p!r}")
    return target, f"lowerdir={lower},upperdir={upper},workdir={work}"


def spawn_helper() -> str | None:
    """The agent binary when it has ``spawn-runtime`` with every option ``launch`` uses, else None."""
    from .. import paths

    return paths.agent_with(SPAWN_MARK)


def launch(cmd: list[str], overlay: tuple[str, str, str, str] | None, *, pdeathsig: bool,
           close_fds: bool = False, layer: PrivateLayer | None = None) -> tuple[list[str], Preexec | None]:
    """How to start the runtime command ``cmd``: (argv, preexec hook or None). ``overlay``: the sandbox's
    root, mounted in a private mount namespace made just for the runtime process (the container's own is
    a copy of it); ``pdeathsig``: the runtime is SIGKILLed when this process dies; ``close_fds``: fds >= 3
    are closed before the runtime runs (for a caller that cannot close them itself, e.g. posix_spawn);
    ``layer``: the overlay's writable layer is a tmpfs mounted in that namespace too (needs the agent).
    crun (``cmd[0]`` named ``crun``) with an overlay: its binary is bind-mounted read-only onto itself in
    that namespace with ``_LIBCONTAINER_CLONED_BINARY=1`` set, which crun's guard against a container
    overwriting it through /proc/self/exe (CVE-2019-5736) accepts as its own read-only copy, so crun
    skips making one (a temporary file, a bind mount and a second exec of itself, per start).

    With the agent built, ``ak-agent spawn-runtime`` does all of it and execs the runtime, so no Python
    code runs between fork and exec and ``subprocess`` can use vfork (a ``preexec_fn`` forces a full
    fork() of the caller: page tables copied, every page then copy-on-write; ~4-5 ms of CPU per sandbox
    in a ~48 MiB multithreaded daemon). Without it, the same steps run in ``Preexec``."""
    if not overlay and not pdeathsig and not close_fds:
        return cmd, None
    helper = spawn_helper()
    if helper is None:
        if close_fds or layer is not None:
            raise ValueError("close_fds and a private layer need the agent's spawn-runtime")
        return cmd, Preexec(overlay, pdeathsig=pdeathsig)
    argv = [helper, "spawn-runtime"]
    if pdeathsig:
        argv += ["--pdeathsig", str(os.getpid())]
    if overlay:
        argv += ["--overlay", *overlay_options(overlay)]
        if layer is not None:
            argv += ["--tmpfs", layer.path, layer.options]
            for path, mode, uid, gid in layer.mkdirs:
                argv += ["--mkdir", path, f"{mode:o}", str(uid), str(gid)]
        if os.path.basename(cmd[0]) == "crun":
            argv.append("--ro-runtime")
    if close_fds:
        argv.append("--close-fds")
    return [*argv, "--", *cmd], None


class PrivateLayer:
    """A sandbox's writable layer as a tmpfs that only the runtime's private mount namespace has (a
    one-shot run: nothing outlives the container, nothing to unmount on the host, and no ctypes import
    for the mount): mounted at ``path`` with ``options``, then ``mkdirs`` (path, mode, uid, gid) made
    in it: the overlay's upper and work dirs, the working directory when the image lacks it."""

    def __init__(self, path: str, options: str) -> None:
        self.path, self.options = path, options
        self.mkdirs: list[tuple[str, int, int, int]] = []


class Preexec:
    """``launch`` without the agent binary: runs in the forked child before exec of the runtime: die with
    the parent (optional), then a private mount namespace (host mounts still propagate in, ours never out)
    with the overlay root. Same steps, messages and exit status (125) as ``ak-agent spawn-runtime``."""

    def __init__(self, overlay: tuple[str, str, str, str] | None, *, pdeathsig: bool) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.get_errno = ctypes.get_errno
        self.pdeathsig = pdeathsig
        self.parent = os.getpid()
        self.overlay = None
        if overlay:
            target, opts = overlay_options(overlay)
            self.overlay = (target.encode(), opts.encode())

    def _fail(self, what: str) -> None:
        e = self.get_errno()
        os.write(2, f"agentkernel: oci: {what}: {os.strerror(e)}\n".encode())
        os._exit(125)

    def __call__(self) -> None:
        libc = self.libc
        if self.pdeathsig:
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                self._fail("prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != self.parent:  # the parent died before the prctl: nobody to run for
                os.write(2, b"agentkernel: oci: the parent process is gone\n")
                os._exit(125)
        if self.overlay:
            if libc.unshare(CLONE_NEWNS) != 0:
                self._fail("unshare(CLONE_NEWNS)")
            if libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None) != 0:
                self._fail("making / a slave mount")
            target, opts = self.overlay
            if libc.mount(b"overlay", target, b"overlay", 0, opts) != 0:
                self._fail("mounting the overlay root")


# ---- runtime commands -----------------------------------------------------------------------------------


def run_cmd(runtime: str, *args: str, timeout: float = 60):
    """``<runtime> --root ... ARGS`` -> subprocess.CompletedProcess (text). Raises TimeoutExpired."""
    import subprocess

    exe = require_binary(runtime)
    return subprocess.run(
        [*base_cmd(runtime, exe), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def state(runtime: str, sandbox_id: str) -> dict | None:
    """The runtime's state of the container (``status``: created/running/stopped/paused), or None."""
    if not os.path.exists(os.path.join(state_root(runtime), sandbox_id)) and runtime != "runsc":
        return None
    if binary(runtime) is None:
        return None
    import subprocess

    try:
        r = run_cmd(runtime, "state", sandbox_id, timeout=30)
    except subprocess.TimeoutExpired:
        return {"status": "unknown"}
    if r.returncode != 0:
        return None
    try:
        import json

        return json.loads(r.stdout)
    except ValueError:
        return None


def list_containers(runtime: str) -> list[dict]:
    if binary(runtime) is None or not os.path.isdir(state_root(runtime)):
        return []
    import subprocess

    try:
        r = run_cmd(runtime, "list", "--format", "json", timeout=30)
    except subprocess.TimeoutExpired:
        return []
    if r.returncode != 0:
        return []
    try:
        import json

        return json.loads(r.stdout or "[]") or []
    except ValueError:
        return []


def state_entries(runtime: str, sandbox_id: str) -> list[str]:
    """Paths in the runtime's root that belong to the container (runsc keeps several files)."""
    root = state_root(runtime)
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [
        os.path.join(root, n)
        for n in names
        if n == sandbox_id or n.startswith(f"{sandbox_id}_") or n.startswith(f"{sandbox_id}.")
    ]


def host_mounts_under(*prefixes: str) -> list[str]:
    """Mount points in this process's mount namespace at or below any of ``prefixes``."""
    heads = [(p, p.rstrip("/") + "/") for p in prefixes]
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mnt = line.split()[4].replace("\\040", " ")
                if any(mnt == p or mnt.startswith(h) for p, h in heads):
                    out.append(mnt)
    except OSError:
        pass
    return out


MS_NOSUID, MS_NODEV = 2, 4


def mount_tmpfs(target: str, options: str) -> None:
    """A tmpfs at ``target`` in this (the host's) mount namespace; ``destroy`` unmounts it (umount_all)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mounting a tmpfs at {target}: {os.strerror(e)}")


def umount_all(*prefixes: str) -> None:
    mounts = host_mounts_under(*prefixes)
    if not mounts:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for m in sorted(mounts, key=len, reverse=True):
        libc.umount2(m.encode(), 2)  # MNT_DETACH


def runsc_delete(sandbox_id: str) -> None:
    """``runsc kill KILL`` + ``delete --force``: gVisor's sandbox and gofer processes, and its state files."""
    import subprocess

    for args, timeout in ((("kill", sandbox_id, "KILL"), 30), (("delete", "--force", sandbox_id), 60)):
        try:
            run_cmd("runsc", *args, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            pass


def delete_container(runtime: str, sandbox_id: str) -> None:
    """The runtime's container of the sandbox gone, as ``<runtime> delete --force`` leaves it; the bundle
    stays. crun and runc without exec'ing them (~2.7 ms of CPU per crun process, for work done here
    anyway): their container is its processes (all in the sandbox's cgroups: SIGKILLed until none is
    left), its cgroup dirs (removed), its state dir under our ``--root`` (removed) and its mounts, which
    live only in the container's own mount namespace (gone with its last process). Neither keeps
    anything else (our bundles have no hooks). runsc: its own kill + delete first (gVisor's processes)."""
    if runtime == "runsc" and binary("runsc") is not None and state_entries("runsc", sandbox_id):
        runsc_delete(sandbox_id)
    clear_cgroups(sandbox_id)
    _remove_paths(state_entries(runtime, sandbox_id))


def _remove_paths(paths: list[str]) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            rmtree(p)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def destroy(sandbox_id: str, runtime: str | None = None) -> None:
    """Remove every trace of a sandbox, from its id alone (idempotent; used by remove and the reaper):
    the container in the runtime (runsc: kill + delete), every process in its cgroups, the cgroup dirs
    in every hierarchy, mounts under its bundle, the runtime's state files, the bundle (writable layer
    included) and the agent run dir."""
    meta = read_meta(sandbox_id)
    runtimes = [runtime or meta.get("runtime")] if (runtime or meta.get("runtime")) else list(RUNTIMES)
    if "runsc" in runtimes and binary("runsc") is not None and state_entries("runsc", sandbox_id):
        runsc_delete(sandbox_id)
    # crun, runc: no runtime exec at all (see delete_container); the steps below are theirs
    clear_cgroups(sandbox_id)
    bdir = bundle_dir(sandbox_id)
    states = [p for rt in RUNTIMES for p in state_entries(rt, sandbox_id)]
    umount_all(bdir, *states)  # one read of the mount table for both
    _remove_paths(states)
    rmtree(bdir)
    from ..backends import _container

    rmtree(_container.sandbox_run_dir(sandbox_id))


def leftovers(sandbox_id: str) -> dict[str, list[str]]:
    """What of a sandbox still exists on the host (for tests, ``doctor`` and ``gc``)."""
    return {
        "mounts": host_mounts_under(bundle_dir(sandbox_id))
        + [m for rt in RUNTIMES for p in state_entries(rt, sandbox_id) for m in host_mounts_under(p)],
        "cgroups": [d for d in cgroup_dirs(sandbox_id) if os.path.exists(d)],
        "state": [p for rt in RUNTIMES for p in state_entries(rt, sandbox_id)],
        "bundle": [bundle_dir(sandbox_id)] if os.path.exists(bundle_dir(sandbox_id)) else [],
        "processes": sorted(str(p) for p in cgroup_pids(sandbox_id) | processes_naming(sandbox_id)),
    }


def processes_naming(sandbox_id: str) -> set[int]:
    """Host processes whose command line names the sandbox (a runtime, runsc's gofer/sandbox, ...)."""
    from .._proc import cmdlines

    me = os.getpid()
    needle = sandbox_id.encode()
    return {pid for pid, cmd in cmdlines() if pid != me and needle in cmd}
