"""The live VM process behind a run dir's pidfile, checked against /proc so that a recycled pid is never
taken for the VM (and never killed)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def live_pid(pidfile: str, is_vm: Callable[[bytes], bool]) -> int | None:
    """The pid in ``pidfile`` when that process is alive (not a zombie) and ``is_vm(its command line)``."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return live(pid, is_vm)


def live(pid: int, is_vm: Callable[[bytes], bool]) -> int | None:
    """``pid`` when that process is alive (not a zombie) and ``is_vm(its command line)``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    if state in (b"Z", b"X") or not is_vm(cmd):
        return None
    return pid
