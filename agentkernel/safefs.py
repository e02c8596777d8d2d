"""Host-side access to places a sandbox (or another local user) can write, without trusting them.

A sandbox can write its run dir (bind-mounted at ``/.ak/run``): it can replace any file there with a
symlink (to ``/dev/zero``, to a root-only file, to the host's engine socket), a FIFO (``open`` blocks
forever) or a huge file. Another local user can plant names in a directory both can write. So:

- ``read_regular``: read a small file through the directory's fd, never following a link, never
  blocking on a FIFO, only a regular file, only up to a size bound;
- ``socket_path``: a path to connect a unix socket through that names the socket inode found without
  following links (an ``O_PATH|O_NOFOLLOW`` fd, connected via ``/proc/self/fd/N``), so a link the
  sandbox planted cannot make the host connect elsewhere;
- ``exclusive_temp``: a new file next to a target, created ``O_EXCL|O_NOFOLLOW`` under a random name,
  to write and then rename over the target.

Standard library only; imported on the CLI's hot path.
"""

from __future__ import annotations

import os
import stat

# every status/meta file the host reads from a sandbox-writable place is tiny
SMALL_FILE_MAX = 64 * 1024


class UnsafeFile(OSError):
    """The file is not a plain regular file of bounded size (link, FIFO, device, directory, too big)."""


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_regular(dir_path: str, name: str, limit: int = SMALL_FILE_MAX) -> bytes:
    """The content of ``dir_path/name``, which must be a regular file of at most ``limit`` bytes.
    Neither ``dir_path``'s last component nor ``name`` is followed if it is a symlink; a FIFO or device is
    never read (``O_NONBLOCK``: opening a FIFO cannot hang). Raises FileNotFoundError when absent,
    UnsafeFile when it is anything else than promised."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    dfd = _open_dir(dir_path)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (40, 6):  # ELOOP: a symlink; ENXIO: a socket or FIFO oddity
                raise UnsafeFile(exc.errno, f"{name} in {dir_path} is not a regular file") from None
            raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{name} in {dir_path} is not a regular file")
        if st.st_size > limit:
            raise UnsafeFile(f"{name} in {dir_path} is larger than {limit} bytes")
        chunks = []
        left = limit + 1
        while left > 0:
            b = os.read(fd, left)
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > limit:
            raise UnsafeFile(f"{name} in {dir_path} grew beyond {limit} bytes while read")
        return data
    finally:
        os.close(fd)


def read_regular_or_none(dir_path: str, name: str, limit: int = SMALL_FILE_MAX) -> bytes | None:
    """``read_regular``, with absent or unsafe both answered as None."""
    try:
        return read_regular(dir_path, name, limit)
    except OSError:
        return None


class socket_path:
    """``with socket_path(path) as p: sock.connect(p)``: ``p`` reaches exactly the socket inode at
    ``path`` as found without following a final symlink (the directory part is the host's own). Raises
    UnsafeFile when ``path`` is a link or anything but a socket, FileNotFoundError when absent."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> str:
        try:
            self.fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == 40:
                raise UnsafeFile(exc.errno, f"{self.path} is a symlink, not the agent's socket") from None
            raise
        mode = os.fstat(self.fd).st_mode
        if not stat.S_ISSOCK(mode):
            os.close(self.fd)
            self.fd = -1
            raise UnsafeFile(f"{self.path} is not a unix socket (mode {stat.filemode(mode)})")
        return f"/proc/self/fd/{self.fd}"

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def exclusive_temp(target: str) -> tuple[int, str]:
    """(fd, path) of a new, empty file in ``target``'s directory with an unpredictable name, created
    ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a planted file or symlink makes it fail, never write through), mode
    0600. Write it, then ``os.replace(path, target)``."""
    d = os.path.dirname(os.path.abspath(target)) or "."
    base = os.path.basename(target)
    for _ in range(100):
        path = os.path.join(d, f".{base}.agentkernel-{os.urandom(8).hex()}.part")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError(f"could not create a temporary file next to {target}")
