"""Terminal I/O for the CLI's run paths, in one place: writing all of a buffer to an fd, deciding
whether our stdin is worth forwarding, the caller's ``Stdio``, signal forwarding, and stdin as an async
iterator for the asyncio paths.

Imported on the one-shot and warm hot paths: ``os`` and ``_signal`` only (``signal`` imports enum,
``select``/``asyncio`` only inside the functions that need them).
"""

from __future__ import annotations

import _signal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from typing import Any

# what a terminal user sends that the command, not agentkernel, should get
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def note(msg: str) -> None:
    """One line for the user on stderr, prefixed ``agentkernel:``."""
    sys.stderr.write(f"agentkernel: {msg}\n")
    sys.stderr.flush()


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write everything, also to a non-blocking fd (waits for it to drain)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            p = select.poll()
            p.register(fd, select.POLLOUT)
            p.poll()
            continue
        view = view[n:]


def stdin_forwardable(fd: int = 0) -> bool:
    """Forward our stdin unless it is closed or /dev/null (attaching a stdin costs a little)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if (st.st_mode & 0o170000) == 0o020000:  # a character device: /dev/null?
        try:
            dn = os.stat(os.devnull)
            if (st.st_rdev, st.st_ino) == (dn.st_rdev, dn.st_ino):
                return False
        except OSError:
            pass
    return True


class Stdio:
    """The caller's standard streams for a one-shot: file descriptors to read stdin from and write
    stdout/stderr to (byte-exact, separate), and whether stdin is forwarded at all (False: the command
    sees an empty stdin). ``caller_stdio()`` builds the CLI's. Part of the backend contract
    (``backends.base`` re-exports it)."""

    __slots__ = ("forward_stdin", "stderr", "stdin", "stdout")

    def __init__(self, stdin: int = 0, stdout: int = 1, stderr: int = 2, *, forward_stdin: bool = True) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.forward_stdin = forward_stdin


def caller_stdio() -> Stdio:
    """The CLI process's own fds 0/1/2, stdin forwarded when it carries anything."""
    return Stdio(0, 1, 2, forward_stdin=stdin_forwardable(0))


class SignalForwarder:
    """While installed (main thread only), the ``FORWARDED_SIGNALS`` are recorded in ``pending`` instead
    of raising, and ``on_signal`` (if given) is called with each. ``wakeup_fd`` (with ``wakeup=True``)
    becomes readable on every signal, for select/poll loops; ``drain`` empties it."""

    def __init__(self, on_signal: Callable[[int], Any] | None = None, *, wakeup: bool = False,
                 signals: tuple[int, ...] = FORWARDED_SIGNALS) -> None:
        self.pending: list[int] = []
        self.rfd = self.wfd = -1
        self._on = on_signal
        self._wakeup = wakeup
        self._signals = signals
        self._old: dict[int, Any] = {}
        self._old_wakeup: int | None = None

    def install(self) -> SignalForwarder:
        if self._wakeup:
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
            try:
                self._old_wakeup = _signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
            except ValueError:  # not the main thread: signals stay with whoever handles them there
                self.restore()
                return self
        for s in self._signals:
            try:
                self._old[s] = _signal.signal(s, self._handle)
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)
        if self._on is not None:
            self._on(signum)

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def restore(self) -> None:
        for s, h in self._old.items():
            _signal.signal(s, h)
        self._old.clear()
        if self._old_wakeup is not None:
            _signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1

    def __enter__(self) -> SignalForwarder:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


async def stdin_chunks(fd: int = 0) -> AsyncIterator[bytes]:
    """Our stdin as an async iterator (pipes and ttys via the event loop, regular files read directly)."""
    import asyncio
    import stat

    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            yield chunk
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
        q.put_nowait(data)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        while True:
            chunk = await q.get()
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)
