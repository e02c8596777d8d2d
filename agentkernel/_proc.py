"""A child process without ``subprocess``: fork+exec (or posix_spawn), a pidfd to wait on (timeouts
without polling), exit codes as a shell reports them (128+N for signal N). Imports nothing beyond ``os``
and ``_signal``."""

from __future__ import annotations

import _signal as signal  # not `signal`: it imports enum (~3-5 ms on the one-shot path)
import os


def cmdlines():
    """``(pid, command line bytes, NUL-separated)`` of every process whose ``/proc/PID/cmdline`` this
    process can read (processes that exit meanwhile are skipped)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                yield int(entry), f.read()
        except OSError:
            continue


def which(name: str) -> str | None:
    """``shutil.which`` for a plain command name, without importing shutil (~7 ms with its imports)."""
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for d in os.get_exec_path():
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class WaitTimeout(Exception):
    pass


class Proc:
    """A child process started with fork+exec or posix_spawn directly (the one-shot paths: an OCI runtime,
    the podman client; a pooled oci sandbox's runtime): ``subprocess`` costs ~3-5 ms of imports on the
    CLI's hot path, and its timed ``wait`` polls with sleeps of up to 50 ms. Waits use a pidfd; the API
    mirrors ``subprocess.Popen`` (wait/poll/send_signal/kill/returncode), except that ``wait(timeout)``
    raises ``WaitTimeout``."""

    def __init__(
        self, argv: list[str], *, stdin: int | None, stdout: int | None, stderr: int | None, preexec=None,
        cwd: str | None = None, spawn: bool = False,
    ) -> None:
        """``spawn``: ``argv[0]`` closes every inherited fd >= 3 itself (``ak-agent spawn-runtime
        --close-fds``), so the child is started with ``posix_spawn`` (a vfork: nothing of this process
        is copied) instead of fork + exec; no ``preexec``, no ``cwd`` then."""
        self.returncode: int | None = None
        if spawn:
            self._spawn(argv, stdin, stdout, stderr)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) if stdin == -1 else -1
        pid = os.fork()
        if pid == 0:  # child: only fd juggling, the preexec hook and exec
            try:
                for target, fd in ((0, devnull if stdin == -1 else stdin), (1, stdout), (2, stderr)):
                    if fd is not None and fd >= 0:
                        if fd == target:  # dup2 of an fd onto itself would keep its O_CLOEXEC
                            os.set_inheritable(fd, True)
                        else:
                            os.dup2(fd, target)  # dup2 clears O_CLOEXEC on the target
                # like close_fds=True: nothing we or our caller hold reaches the runtime or the sandbox
                os.closerange(3, w)
                os.closerange(w + 1, 1 << 20)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; a child must not
                    signal.signal(sig, signal.SIG_DFL)
                if preexec is not None:
                    preexec()
                if cwd is not None:
                    os.chdir(cwd)
                os.execv(argv[0], argv)
            except BaseException as exc:
                err = getattr(exc, "errno", None) or 2
                try:
                    os.write(w, str(err).encode())
                finally:
                    os._exit(127)
        os.close(w)
        if devnull >= 0:
            os.close(devnull)
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = -1
        data = os.read(r, 64)  # EOF at exec; an errno if exec failed
        os.close(r)
        if data:
            self.wait()
            self.close()
            errno_ = int(data or b"2")
            raise OSError(errno_, f"cannot run {argv[0]}: {os.strerror(errno_)}")

    def _spawn(self, argv: list[str], stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) if stdin == -1 else -1
        acts = []
        for target, fd in ((0, devnull if stdin == -1 else stdin), (1, stdout), (2, stderr)):
            if fd is not None and fd >= 0:
                if fd == target:  # e.g. our /dev/null got fd 0 (it was closed): dup2 would keep O_CLOEXEC
                    os.set_inheritable(fd, True)
                else:
                    acts.append((os.POSIX_SPAWN_DUP2, fd, target))  # dup2 clears O_CLOEXEC on the target
        try:  # SIGPIPE, SIGXFSZ: Python ignores them; a child must not
            self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=acts,
                                      setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError as exc:
            err = exc.errno or 2
            raise OSError(err, f"cannot run {argv[0]}: {os.strerror(err)}") from None
        finally:
            if devnull >= 0:
                os.close(devnull)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = -1

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self._set(status)
        return self.returncode

    def _set(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.returncode = code if code >= 0 else 128 - code

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            if self.pidfd >= 0:
                import select

                p = select.poll()
                p.register(self.pidfd, select.POLLIN)
                if not p.poll(max(0, int(timeout * 1000))):
                    raise WaitTimeout()
            else:
                import time

                deadline = time.monotonic() + timeout
                while self.poll() is None:
                    if time.monotonic() >= deadline:
                        raise WaitTimeout()
                    time.sleep(0.005)
                return self.returncode  # type: ignore[return-value]
        _, status = os.waitpid(self.pid, 0)
        self._set(status)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
