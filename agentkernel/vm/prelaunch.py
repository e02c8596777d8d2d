"""The CLI's daemon-less ``run -B qemu``: start the VM before the CLI has resolved its spec.

A one-shot restore is QEMU's start (~40 ms: dynamic linking, machine set-up, the device state) plus the
guest's first command, and before it the CLI's own start (imports, the spec's resolution, the guest plan:
~35-45 ms). Those two are independent work for two CPUs, so an identical earlier run's VM is started
first, from what that run *launched*, and the CLI resolves the spec while QEMU starts:

- ``begin(key)`` (``commands/run.py``, first thing of a one-shot run; ``key`` is ``resolvedspec.key``:
  the flags, the command's program name, the working directory, the uid, the whole environment and the
  resolution's sources) looks up the launch recorded under that key. On a hit it claims a new sandbox id
  in the ownership journal, arms the death watch (``deathwatch``: a SIGKILLed CLI's VM is removed at
  once), makes the run dir with its own overlay of the template's frozen disk, starts QEMU restoring the
  template, writes the QMP commands that load the device state and the agent's HELLO (the sockets
  listen already: both wait in QEMU's backlog), and returns. Nothing else is sent to the guest.
- the qemu backend's ``run_oneshot`` (same process, same sandbox id) then builds QEMU's command line from
  the spec it was given, as for any run, and ``take``s the early VM only if that command line, with the
  run dir, id and inherited socket numbers made generic, is *the same*, and the state file too: the VM
  is then exactly the one it would have started. Anything else (another image, policy, memory, a rebuilt
  template, a new QEMU) and the early VM is killed and a new one started the ordinary way. RESEED and the
  command go only to a VM that passed this check.
- ``remember(record)``: after a restore, the backend records what it launched for the next identical run.
- ``discard()``: a run that never reached the backend (another backend, a refused policy, an error) kills
  the early VM, deletes its run dir, releases its claim and drops the record (``commands/run.py``, in
  ``finally``): a key that now runs something else does not start a VM for nothing again.

Only the guess is cached, never a decision: a stale record costs one wasted QEMU start. The record is a
``resolvedspec`` file (caller-owned, 0600, CRC-checked; ``store``/``load``) under a key derived from the
run's. Imports only the standard library's built-in modules and the journal's: this runs before the CLI's
other imports.
"""

from __future__ import annotations

import os
import time

FORMAT = 1
_SIGKILL = 9  # Linux; the signal module imports enum
BACKEND = "qemu"
_RUN, _ID, _AGENT_FD, _QMP_FD = "\0run\0", "\0id\0", "\0agent-fd\0", "\0qmp-fd\0"

_KEY: str | None = None  # this process's run key (begin): where remember() stores
_PENDING: Early | None = None  # the VM begin() started, until taken or discarded


def spawn_script(state: str | None) -> str:
    """The shell that starts QEMU in the background (not our child: no zombie, no event-loop ownership) and
    prints its pid; ``state``: a restore's device state, on QEMU's fd 3."""
    # shlex.quote's result, without importing shlex (re, enum: ~7 ms before QEMU starts)
    redirect = " 3<'{}'".format(state.replace("'", "'\"'\"'")) if state else ""
    return f'"$@" </dev/null >>"$0" 2>&1{redirect} & echo $!'


def spawn(argv: list[str], run_dir: str, state: str | None, pass_fds: tuple[int, ...]) -> tuple[int, int]:
    """Start ``argv`` (QEMU's) through ``spawn_script`` in a new session, its output appended to
    ``qemu.log`` of ``run_dir``; ``pass_fds`` stay open in it. Returns (the shell's pid, the read end of
    the pipe it prints QEMU's pid to): ``shell_result`` reads it. ``os.posix_spawn``: no ``subprocess``
    import (signal, enum, threading) on the one-shot's path."""
    r, w = os.pipe()
    try:
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", spawn_script(state), os.path.join(run_dir, "qemu.log"),
                                         *argv], os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        for fd in pass_fds:
            os.set_inheritable(fd, False)
    return pid, r


def shell_result(pid: int, r: int) -> int:
    """The pid of QEMU that the shell ``spawn`` started printed (0 if it printed none); reaps the shell."""
    out = b""
    try:
        while chunk := os.read(r, 64):
            out += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    try:
        return int(out.strip() or 0)
    except ValueError:
        return 0


def listeners(run_dir: str) -> tuple[list, tuple[int, int]]:
    """The agent and QMP sockets of ``run_dir``, bound and listening *before* QEMU starts (QEMU inherits
    them: ``-chardev socket,fd=N,server=on``). A connect then never races QEMU's bind-then-listen and
    needs no polling for the path: it waits in the backlog until QEMU accepts. Returns the sockets (close
    them once QEMU has been started) and their duplicates at fd >= 10 (never fd 3, the state stream)."""
    import _socket
    import fcntl

    socks, fds = [], []
    try:
        for name in ("agent.sock", "qmp.sock"):
            sk = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            socks.append(sk)
            sk.bind(os.path.join(run_dir, name))
            sk.listen(16)
            fds.append(fcntl.fcntl(sk.fileno(), fcntl.F_DUPFD_CLOEXEC, 10))
    except BaseException:
        for sk in socks:
            sk.close()
        for fd in fds:
            os.close(fd)
        raise
    return socks, (fds[0], fds[1])


def qmp_incoming_commands(shared_ram: bool) -> bytes:
    """What a restore writes to QMP: capabilities, ``x-ignore-shared`` (the RAM stays in the template's
    file) and ``migrate-incoming fd:3``, one JSON object a line (QMP reads them after its greeting)."""
    caps = '{"execute": "qmp_capabilities"}\n'
    if shared_ram:
        caps += ('{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
                 '[{"capability": "x-ignore-shared", "state": true}]}}\n')
    return (caps + '{"execute": "migrate-incoming", "arguments": {"uri": "fd:3"}}\n').encode()


def generic(argv: list[str], run_dir: str, fds: tuple[int, int] | None) -> list[str]:
    """QEMU's command line with what differs between two runs of the same launch made generic: the run
    dir, the sandbox id and the inherited socket numbers."""
    sid = os.path.basename(run_dir)
    fdmap = {} if fds is None else {f"fd={fds[0]},": f"fd={_AGENT_FD},", f"fd={fds[1]},": f"fd={_QMP_FD},"}
    out = []
    for a in argv:
        a = a.replace(run_dir, _RUN).replace(sid, _ID)
        for k, v in fdmap.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _concrete(argv: list[str], run_dir: str, fds: tuple[int, int]) -> list[str]:
    sid = os.path.basename(run_dir)
    return [a.replace(_RUN, run_dir).replace(_ID, sid).replace(_AGENT_FD, str(fds[0])).replace(_QMP_FD, str(fds[1]))
            for a in argv]


def vm_pid(run_dir: str, pid: int | None = None) -> int | None:
    """The live QEMU of this run dir: its pidfile, or else ``pid`` (the one its starting shell printed: QEMU
    writes its pidfile only once it is under way), each checked against the process's command line (a
    recycled pid never gets killed)."""
    from .pidfile import live, live_pid

    marker = os.path.realpath(run_dir).encode()

    def is_vm(cmd: bytes) -> bool:
        return marker in cmd

    found = live_pid(os.path.join(run_dir, "qemu.pid"), is_vm)
    return found if found is not None or not pid else live(pid, is_vm)


def kill_vm_sync(run_dir: str, pid: int | None = None) -> None:
    """SIGKILL the run dir's QEMU (``vm_pid``) and wait until it is gone (``backends.qemu.kill_vm`` without
    asyncio)."""
    pid = vm_pid(run_dir, pid)
    if pid is None:
        return
    try:
        os.kill(pid, _SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while vm_pid(run_dir, pid) == pid:
        if time.monotonic() > deadline:
            from ..errors import SandboxError

            raise SandboxError(f"QEMU pid {pid} did not exit")
        time.sleep(0.002)


def _record_key(key: str) -> str:
    import _sha256

    return _sha256.sha256(f"qemu-prelaunch:{FORMAT}:{key}".encode()).hexdigest()


class Early:
    """A VM ``begin`` started: its sandbox id and run dir, the shell that started it, the QMP and agent
    connections with their requests written, the record it was started from."""

    __slots__ = ("agent", "argv", "fds", "qmp", "qpid", "run_dir", "shell", "sid", "state")

    def __init__(self, sid: str, run_dir: str, argv: list[str], state: str) -> None:
        self.sid, self.run_dir, self.argv, self.state = sid, run_dir, argv, state
        self.shell: tuple[int, int] | None = None
        self.qpid: int | None = None
        self.fds: tuple[int, int] | None = None
        self.qmp = self.agent = None

    def qemu_pid(self) -> int | None:
        """QEMU's pid as its starting shell printed it (the shell is reaped the first time)."""
        if self.shell is not None:
            shell, self.shell = self.shell, None
            self.qpid = shell_result(*shell) or None
        return self.qpid

    def close(self) -> None:
        """Drop the connections and reap the starting shell (the VM itself: ``kill``)."""
        for s in (self.qmp, self.agent):
            if s is not None:
                s.close()
        self.qmp = self.agent = None
        self.qemu_pid()

    def kill(self) -> None:
        """``close``, then kill the VM, also one that has not written its pidfile yet, and wait until it is
        gone."""
        self.close()
        kill_vm_sync(self.run_dir, self.qpid)


def begin(key: str) -> None:
    """This CLI's one-shot run is ``key`` (``resolvedspec.key``): start the VM an identical earlier run
    launched (see the module's docstring); a miss or any failure leaves it to the ordinary path."""
    global _KEY, _PENDING
    _KEY = key
    from .. import resolvedspec

    rec = resolvedspec.load(_record_key(key))
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        return
    try:
        _PENDING = _launch(rec)
    except Exception:  # a guess that cannot start is a miss; whatever it made is removed
        discard()


def _copy(src: str, dest: str) -> None:
    """A new file ``dest`` (0600) with ``src``'s bytes (a ~200 KB pristine overlay): no ``shutil`` import
    (fnmatch, re, enum, bz2, lzma: ~5 ms) before QEMU starts."""
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fo = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            left = os.fstat(fi).st_size
            while left > 0:
                n = os.copy_file_range(fi, fo, left)
                if n <= 0:
                    raise OSError(f"short copy of {src}")
                left -= n
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def _launch(rec: dict) -> Early | None:
    from .. import deathwatch, owner, paths

    state, overlay = rec["state"], rec["overlay"]
    if not (os.path.exists(state) and os.path.exists(overlay)):
        return None
    base = os.path.join(paths.data_dir(), "qemu", "sandboxes")
    sid = owner.new_id("run")
    run_dir = os.path.join(base, sid)
    if len(os.path.join(run_dir, "agent.sock")) > 100 or not os.path.isdir(base):
        return None
    # claimed before it exists, watched from now on: the same as the ordinary path (oneshot._Claim)
    owner.claim(BACKEND, sid, {"dir": run_dir}, owner.current_owner(), sole=True)
    deathwatch.arm(BACKEND, sid)
    global _PENDING
    early = _PENDING = Early(sid, run_dir, rec["argv"], state)
    os.mkdir(run_dir, 0o700)
    _copy(overlay, os.path.join(run_dir, "disk.qcow2"))
    socks, fds = listeners(run_dir)
    try:
        early.fds = fds
        early.shell = spawn(_concrete(rec["argv"], run_dir, fds), run_dir, state, fds)
    finally:
        for sk in socks:
            sk.close()
        for fd in fds:
            os.close(fd)
    import _socket

    from ..agent.wire import encode_hello

    early.qmp = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    early.qmp.connect(os.path.join(run_dir, "qmp.sock"))
    early.qmp.sendall(qmp_incoming_commands(bool(rec.get("shared_ram"))))
    early.agent = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    early.agent.connect(os.path.join(run_dir, "agent.sock"))
    early.agent.sendall(encode_hello())
    return early


def take(backend: str, sandbox_id: str) -> Early | None:
    """The VM ``begin`` started for ``sandbox_id`` on ``backend``, now the caller's (``run_oneshot``)."""
    global _PENDING
    early = _PENDING
    if early is None or backend != BACKEND or early.sid != sandbox_id:
        return None
    _PENDING = None
    return early


def pending_id(backend: str) -> str | None:
    """The sandbox id ``begin`` claimed for ``backend``'s early VM, if one is pending: the one-shot runs it
    under that id (``oneshot.run_outcome``)."""
    return _PENDING.sid if _PENDING is not None and backend == BACKEND else None


def matches(early: Early, argv: list[str], state: str) -> bool:
    """Whether ``early`` is exactly the VM ``argv`` (built for its run dir and sockets) would start."""
    return early.fds is not None and state == early.state and generic(argv, early.run_dir, early.fds) == early.argv


def remember(argv: list[str], run_dir: str, fds: tuple[int, int], *, state: str, overlay: str,
             shared_ram: bool) -> None:
    """Record this run's launch (a template restore: QEMU's command line for ``run_dir`` with sockets ``fds``,
    the state file, the frozen disk's pristine overlay) for the next run with the same key."""
    if _KEY is None:
        return
    from .. import resolvedspec

    rec = {"format": FORMAT, "argv": generic(argv, run_dir, fds), "state": state, "overlay": overlay,
           "shared_ram": shared_ram}
    resolvedspec.store(_record_key(_KEY), [], rec)


def discard() -> None:
    """Remove a VM ``begin`` started that no run took: kill it, delete its run dir, release its claim, and
    forget the record it came from (this key now runs something else: a config that names another backend,
    say), so that the next run does not start it again."""
    global _PENDING
    early, _PENDING = _PENDING, None
    if early is None:
        return
    import shutil

    from .. import deathwatch, owner, resolvedspec

    if _KEY is not None:
        resolvedspec.drop(_record_key(_KEY))

    try:
        early.kill()
    finally:
        shutil.rmtree(early.run_dir, ignore_errors=True)
        owner.release(BACKEND, early.sid, (owner.current_owner(),))
        deathwatch.disarm(BACKEND, early.sid)
