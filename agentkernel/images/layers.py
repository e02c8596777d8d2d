"""Unpack image layers (tar streams) into a root directory without ever writing outside it.

Refused (the whole pull fails, nothing is kept): member names that are absolute or contain ``..``;
entries whose parent directory is a symlink (so a layer cannot write through ``etc -> /etc``, whatever
the symlink's target); hard links whose target is absolute, climbs with ``..``, or passes a symlink;
unknown entry types. Symlinks themselves are data and may point anywhere (images are full of absolute
ones, e.g. ``/bin/sh -> /bin/busybox``): nothing here ever follows one (files are opened ``O_NOFOLLOW |
O_EXCL`` after removing what was there; owners set with ``lchown``).

Policy: device nodes are not created (counted and skipped: a sandbox gets its /dev from the runtime);
setuid/setgid bits and file capabilities are stripped unless ``keep_setuid``. Whiteouts (``.wh.NAME``,
``.wh..wh..opq``) remove lower-layer content. The uncompressed stream's sha256 is checked against the
image config's ``diff_ids``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile

from .pullerrors import PullError

WH = ".wh."
OPAQUE = ".wh..wh..opq"


class _Hashing:
    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


def _unsafe(msg: str) -> PullError:
    return PullError("unsafe-layer", f"refusing layer: {msg}")


def _clean(name: str, what: str = "entry") -> list[str]:
    if name.startswith("/"):
        raise _unsafe(f"{what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(f"{what} {name!r} climbs out with '..'")
    return parts


class Extractor:
    def __init__(self, root: str, *, keep_setuid: bool = False) -> None:
        self.root = root
        self.keep_setuid = keep_setuid
        self.devices_skipped = 0

    # ---- paths ----------------------------------------------------------------------------------------
    def _parent(self, parts: list[str], name: str, *, create: bool = True) -> str:
        """The parent directory of ``parts`` inside the root, refusing symlinked or non-directory parents."""
        p = self.root
        for comp in parts[:-1]:
            p = os.path.join(p, comp)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if not create:
                    raise _unsafe(f"{name!r}: parent {comp!r} does not exist") from None
                os.mkdir(p, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise _unsafe(f"{name!r} would be written through the symlink {os.path.relpath(p, self.root)!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise _unsafe(f"{name!r}: parent {os.path.relpath(p, self.root)!r} is not a directory")
        return p

    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def _mode(self, m: tarfile.TarInfo) -> int:
        mode = m.mode & 0o7777
        if not self.keep_setuid:
            mode &= ~0o6000
        return mode

    # ---- one layer ----------------------------------------------------------------------------------
    def layer(self, path: str, diff_id: str | None) -> None:
        with open(path, "rb") as raw:
            magic = raw.read(4)
            raw.seek(0)
            if magic[:2] == b"\x1f\x8b":
                stream = gzip.GzipFile(fileobj=raw)
            elif magic == b"\x28\xb5\x2f\xfd":
                raise PullError("unsupported", "zstd-compressed layers are not supported by the oci backend's "
                                "puller yet", hint="pull the image with podman and use it from there")
            else:
                stream = raw
            hashed = _Hashing(stream)
            try:
                self.stream(hashed)
                while hashed.read(1 << 20):
                    pass
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, ValueError) as exc:
                raise _unsafe(f"not a valid tar stream: {exc}") from None
        if diff_id and f"sha256:{hashed.h.hexdigest()}" != diff_id:
            raise PullError("digest-mismatch", f"layer content does not match the image config's diff_id {diff_id}")

    def stream(self, fileobj) -> None:
        created: set[str] = set()  # paths this layer wrote (opaque whiteouts keep them)
        dirs: list[tuple[str, tarfile.TarInfo]] = []
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for m in tar:
                parts = _clean(m.name)
                if not parts:
                    continue
                base = parts[-1]
                if base.startswith(WH):
                    parent = self._parent(parts, m.name)
                    if base == OPAQUE:
                        for child in os.listdir(parent):
                            cp = os.path.join(parent, child)
                            if cp not in created:
                                self._remove(cp)
                    else:
                        victim = base[len(WH):]
                        if victim in ("", ".", ".."):
                            raise _unsafe(f"whiteout {m.name!r} names nothing")
                        self._remove(os.path.join(parent, victim))
                    continue
                target = os.path.join(self._parent(parts, m.name), base)
                created.add(target)
                self._entry(tar, m, target, dirs)
        for target, m in reversed(dirs):  # after the children: their creation touched the mtime
            os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo, target: str, dirs: list) -> None:
        if m.isdir():
            try:
                st = os.lstat(target)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(target)
                    os.mkdir(target, 0o700)
            except FileNotFoundError:
                os.mkdir(target, 0o700)
            os.lchown(target, m.uid, m.gid)
            os.chmod(target, self._mode(m))
            dirs.append((target, m))
            return
        if m.ischr() or m.isblk():
            self.devices_skipped += 1
            return
        self._remove(target)
        if m.isreg():
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                src = tar.extractfile(m)
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, self._mode(m))
                if self.keep_setuid:
                    cap = (m.pax_headers or {}).get("SCHILY.xattr.security.capability")
                    if cap:
                        try:
                            os.setxattr(fd, "security.capability", cap.encode("latin-1"))
                        except OSError:
                            pass
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, target)
            os.lchown(target, m.uid, m.gid)
            os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)
        elif m.islnk():
            lparts = _clean(m.linkname, "hard link target")
            if not lparts:
                raise _unsafe(f"hard link {m.name!r} points at the root")
            src = os.path.join(self._parent(lparts, m.linkname, create=False), lparts[-1])
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                raise _unsafe(f"hard link {m.name!r} -> {m.linkname!r}: target does not exist") from None
            if stat.S_ISDIR(st.st_mode):
                raise _unsafe(f"hard link {m.name!r} -> {m.linkname!r}: target is a directory")
            os.link(src, target, follow_symlinks=False)
        elif m.isfifo():
            os.mkfifo(target, self._mode(m))
            os.lchown(target, m.uid, m.gid)
        else:
            raise _unsafe(f"{m.name!r} has an unsupported entry type {m.type!r}")


def enospc(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
