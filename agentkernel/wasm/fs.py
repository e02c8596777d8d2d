"""Host-side file access confined to a sandbox directory (``write_file`` / ``read_file`` / ``cp``).

The guest's own accesses are confined by wasmtime (cap-std: no ``..`` or symlink escapes out of a
preopen). Here the host process itself opens files inside the sandbox directory, so we walk the path one
component at a time with ``openat``-style ``dir_fd`` calls and ``O_NOFOLLOW``: a ``..`` component is
refused up front, and a symlink is followed only when its target (resolved against the sandbox root, as
the guest would see it) stays inside the root. Nothing is ever resolved against the host's ``/``.
"""

from __future__ import annotations

import errno
import os
import posixpath

from ..errors import NotFound, ValidationError

_MAX_LINKS = 16


def _split(path: str) -> list[str]:
    if "\0" in path:
        raise ValidationError("path contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValidationError(f"path {path!r} contains '..': paths must stay inside the sandbox")
    return parts


def _resolve(root_fd: int, parts: list[str], cwd: list[str], follow_last: bool, depth: int = 0) -> tuple[int, str]:
    """(fd of the parent directory, final name). Symlinks inside are resolved against the sandbox root."""
    if depth > _MAX_LINKS:
        raise ValidationError("too many levels of symbolic links")
    if not parts:
        raise ValidationError("path names the sandbox root, not a file")
    dfd = os.dup(root_fd)
    walked = list(cwd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    return dfd, name
                raise
            import stat as _stat

            if _stat.S_ISLNK(st.st_mode) and (not last or follow_last):
                target = os.readlink(name, dir_fd=dfd)
                base = [] if target.startswith("/") else walked
                joined = posixpath.normpath("/" + "/".join([*base, target]))
                new_parts = [p for p in joined.split("/") if p]
                rest = parts[i + 1:]
                # normpath already folded '..' within the root: a target cannot climb above it
                os.close(dfd)
                dfd = -1
                return _resolve(root_fd, new_parts + rest, [], follow_last, depth + 1)
            if last:
                return dfd, name
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
            walked.append(name)
        raise AssertionError("unreachable")
    except BaseException:
        if dfd >= 0:
            os.close(dfd)
        raise


def _open_root(root: str) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"sandbox directory {root} is missing") from None


def write_file(root: str, path: str, data: bytes, mode: int = 0o644, *, append: bool = False) -> int:
    parts = _split(path)
    rfd = _open_root(root)
    try:
        # create parents one level at a time, each resolved inside the root like the final name
        for i in range(1, len(parts)):
            pfd, pname = _resolve(rfd, parts[:i], [], follow_last=True)
            try:
                os.mkdir(pname, 0o755, dir_fd=pfd)
            except FileExistsError:
                pass
            finally:
                os.close(pfd)
        dfd, name = _resolve(rfd, parts, [], follow_last=True)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
            try:
                fd = os.open(name, flags, mode, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ValidationError(f"{path!r} is a symbolic link that leaves the sandbox") from None
                if exc.errno == errno.EISDIR:
                    raise ValidationError(f"{path!r} is a directory") from None
                raise
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return len(data)
        finally:
            os.close(dfd)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"cannot create {path!r} in the sandbox: a parent is missing or not a directory") from None
    finally:
        os.close(rfd)


def open_read(root: str, path: str) -> int:
    """An fd open for reading on ``path`` inside ``root`` (caller closes)."""
    parts = _split(path)
    rfd = _open_root(root)
    try:
        try:
            dfd, name = _resolve(rfd, parts, [], follow_last=True)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no such file in the sandbox: {path}") from None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"no such file in the sandbox: {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValidationError(f"{path!r} is a symbolic link that leaves the sandbox") from None
            raise
        finally:
            os.close(dfd)
        import stat as _stat

        if _stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValidationError(f"{path!r} is a directory")
        return fd
    finally:
        os.close(rfd)


def guest_to_host(fs_root: str, preopens: tuple[tuple[str, str, bool], ...], path: str) -> tuple[str, str]:
    """(host directory, path inside it) for a guest path: the longest matching preopen, else the root."""
    norm = "/" + "/".join(_split(path))
    best = None
    for host, guest, _ro in preopens:
        g = guest.rstrip("/") or "/"
        if (norm == g or norm.startswith(g + "/")) and (best is None or len(g) > len(best[1])):
            best = (host, g)
    if best is None:
        return fs_root, norm
    return best[0], norm[len(best[1]):] or "/"


def makedirs(root: str, path: str) -> None:
    """``mkdir -p`` of a guest path inside ``root``; symlinks on the way are followed as the guest would
    see them (resolved against the root), never out of it."""
    parts = _split(path)
    if not parts:
        return
    rfd = _open_root(root)
    try:
        _mk(rfd, [], parts, 0)
    finally:
        os.close(rfd)


def _open_dir(rfd: int, parts: list[str]) -> int:
    fd = os.dup(rfd)
    try:
        for name in parts:
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mk(rfd: int, done: list[str], todo: list[str], depth: int) -> None:
    import stat as _stat

    if depth > _MAX_LINKS:
        raise ValidationError("too many levels of symbolic links")
    for idx, name in enumerate(todo):
        dfd = _open_dir(rfd, done)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(name, 0o755, dir_fd=dfd)
                done.append(name)
                continue
            if _stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dfd)
            elif _stat.S_ISDIR(st.st_mode):
                done.append(name)
                continue
            else:
                raise ValidationError(f"/{'/'.join([*done, name])} exists and is not a directory")
        finally:
            os.close(dfd)
        base = [] if target.startswith("/") else done
        joined = posixpath.normpath("/" + "/".join([*base, target]))
        _mk(rfd, [], [p for p in joined.split("/") if p] + todo[idx + 1:], depth + 1)
        return
