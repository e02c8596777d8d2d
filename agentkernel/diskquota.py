"""Per-sandbox disk caps on the agentkernel storage volume (btrfs with quota groups).

This host's kernel (and many others) has no XFS or ext4 project quotas (``CONFIG_XFS_QUOTA`` and
``CONFIG_QFMT_V2`` unset), so the engines' ``overlay`` + ``size=`` path is unavailable. btrfs quota groups
are: ``scripts/setup.sh`` makes a loop-file btrfs volume with quotas enabled (``/var/lib/agentkernel/
storage``) and puts podman's graphroot and dockerd's data-root on it with their ``btrfs`` storage drivers.
Every container's writable layer is then a btrfs subvolume (a snapshot of its image), and a quota-group
limit on it caps what the sandbox can write: past the cap every write fails with EDQUOT, for the sandbox
only.

- docker: ``HostConfig.StorageOpt.size`` (dockerd's btrfs driver sets the limit itself).
- podman (and gVisor under podman): podman's btrfs driver has no ``size`` option, so the podman backend
  passes ``--hooks-dir`` with one OCI prestart hook (this file run as a script, ``hook``) that sets the
  limit on the container's root subvolume before its first process runs; a failing hook fails the start.

The limit is on the subvolume's *exclusive* bytes (what the sandbox wrote, not the image it shares).

Standard library only, no package imports: the hook runs as ``python -I -S diskquota.py hook``.
"""

from __future__ import annotations

import os

BTRFS_SUPER_MAGIC = 0x9123683E
_MAGIC = 0x94
VOLUME = "/var/lib/agentkernel/storage"  # setup.sh's mount point (overridable: AGENTKERNEL_STORAGE_VOLUME)
HOOK_ANNOTATION = "io.agentkernel.disk-mb"


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
BTRFS_IOC_FS_INFO = _ioc(_IOC_READ, 31, 1024)
BTRFS_IOC_QGROUP_LIMIT = _ioc(_IOC_READ, 43, 48)  # declared _IOR in the kernel's uapi, though it writes
BTRFS_IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, 14, 4096)
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 15, 4096)
BTRFS_IOC_QUOTA_RESCAN = _ioc(_IOC_WRITE, 44, 64)
BTRFS_IOC_QUOTA_CTL = _ioc(_IOC_READ | _IOC_WRITE, 40, 16)
_QUOTA_CTL_ENABLE = 1
# Deleting a subvolume whose tree is this deep or deeper makes the kernel mark quota accounting
# inconsistent instead of accounting the drop (default 3), and an inconsistent accounting enforces no
# limits until a rescan: the highest level (8) makes every drop accounted.
DROP_SUBTREE_THRESHOLD = 8
RESCAN_WAIT_S = 30.0
_LIMIT_MAX_EXCL = 1 << 1


FIX = ("run bash scripts/setup.sh as root (it mounts the quota-enabled storage volume and puts the engines' "
       "storage on it), or opt out explicitly with --disk unlimited")


class QuotaError(Exception):
    pass


def volume() -> str:
    """The quota volume: ``$AGENTKERNEL_STORAGE_VOLUME``, else ``$AGENTKERNEL_STORAGE_DIR/storage`` (the
    directory setup.sh was given), else setup's default."""
    if os.environ.get("AGENTKERNEL_STORAGE_VOLUME"):
        return os.environ["AGENTKERNEL_STORAGE_VOLUME"]
    if os.environ.get("AGENTKERNEL_STORAGE_DIR"):
        return os.path.join(os.environ["AGENTKERNEL_STORAGE_DIR"], "storage")
    return VOLUME


def fs_uuid(path: str) -> str | None:
    """The btrfs filesystem id of ``path``, or None when it is not on btrfs."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(1024)
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    raw = bytes(buf[16:32]).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def quota_status(path: str, enable: bool = False) -> tuple[bool, str]:
    """(can cap, why) for engine storage at ``path``: on btrfs with quota groups enabled (``enable``: switch
    them on when they are off, as root; dockerd's btrfs driver switches them off whenever it stops)."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    uuid = fs_uuid(probe or "/")
    if uuid is None:
        return False, f"{path} is not on a btrfs volume with quotas (per-sandbox disk caps need one)"
    q = f"/sys/fs/btrfs/{uuid}/qgroups"
    if not os.path.isdir(q) and enable and os.geteuid() == 0:
        _enable(probe or "/")
    if not os.path.isdir(q):
        return False, f"quotas are not enabled on the btrfs volume holding {path}"
    if os.geteuid() == 0:
        _raise_threshold(q)
    if _read(f"{q}/inconsistent") == "1" and not _rescan(probe, q):
        return False, (f"quota accounting on the btrfs volume holding {path} is inconsistent (limits are not "
                       f"enforced until a rescan finishes: btrfs quota rescan -w {probe})")
    return True, f"{path} is on btrfs with quota groups"


def _enable(path: str) -> None:
    import fcntl
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, BTRFS_IOC_QUOTA_CTL, bytearray(struct.pack("<QQ", _QUOTA_CTL_ENABLE, 0)))
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _raise_threshold(q: str) -> None:
    try:
        if int(_read(f"{q}/drop_subtree_threshold") or DROP_SUBTREE_THRESHOLD) < DROP_SUBTREE_THRESHOLD:
            with open(f"{q}/drop_subtree_threshold", "w") as f:
                f.write(str(DROP_SUBTREE_THRESHOLD))
    except (OSError, ValueError):
        pass


def _rescan(path: str, q: str) -> bool:
    """Start a quota rescan (or join the running one) and wait until the accounting is consistent."""
    import fcntl
    import time

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, BTRFS_IOC_QUOTA_RESCAN, bytearray(64))
    except OSError as exc:
        import errno

        if exc.errno != errno.EINPROGRESS:
            return False
    finally:
        os.close(fd)
    deadline = time.monotonic() + RESCAN_WAIT_S
    while time.monotonic() < deadline:
        if _read(f"{q}/inconsistent") != "1":
            return True
        time.sleep(0.05)
    return False


def limit(path: str, mb: int) -> None:
    """Cap the exclusive bytes of the subvolume at ``path`` (its root directory) to ``mb`` MiB."""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        args = bytearray(struct.pack("<QQQQQQ", 0, _LIMIT_MAX_EXCL, 0, int(mb) << 20, 0, 0))
        fcntl.ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, args)
    except OSError as exc:
        raise QuotaError(f"cannot set a {mb} MiB quota on {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def sandboxes_dir() -> str:
    """Where per-sandbox capped directories live (one btrfs subvolume each): <volume>/sandboxes."""
    return os.path.join(volume(), "sandboxes")


def _vol_args(name: str) -> bytearray:
    raw = name.encode()
    if not raw or len(raw) > 255 or b"/" in raw or raw in (b".", b".."):
        raise QuotaError(f"invalid subvolume name {name!r}")
    buf = bytearray(4096)
    buf[8:8 + len(raw)] = raw
    return buf


def make_capped_dir(path: str, mb: int, owner: tuple[int, int] | None = None, mode: int = 0o755) -> str:
    """A new btrfs subvolume at ``path`` (its parent must exist on the volume) whose exclusive bytes are
    capped at ``mb`` MiB; owned by ``owner`` (uid, gid). Raises QuotaError when that cannot be done."""
    import fcntl

    parent, name = os.path.split(path.rstrip("/"))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise QuotaError(f"cannot open {parent}: {exc.strerror}") from None
    try:
        try:
            fcntl.ioctl(pfd, BTRFS_IOC_SUBVOL_CREATE, _vol_args(name))
        except OSError as exc:
            raise QuotaError(f"cannot create a capped directory {path}: {exc.strerror}") from None
        try:
            limit(path, mb)
            os.chmod(name, mode, dir_fd=pfd, follow_symlinks=False)
            if owner is not None:
                os.chown(name, owner[0], owner[1], dir_fd=pfd, follow_symlinks=False)
        except BaseException:
            _destroy(pfd, name)
            raise
    finally:
        os.close(pfd)
    return path


def _destroy(pfd: int, name: str) -> bool:
    import fcntl

    try:
        fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY, _vol_args(name))
        return True
    except OSError:
        return False


def remove_capped_dir(path: str) -> bool:
    """Delete the subvolume at ``path`` (with everything in it). False when it did not exist."""
    parent, name = os.path.split(path.rstrip("/"))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return False
        if st.st_ino == 256 and _destroy(pfd, name):  # 256: the root inode of every btrfs subvolume
            return True
        import shutil

        shutil.rmtree(path, ignore_errors=True)  # a plain directory (not ours, or a failed create)
        return True
    finally:
        os.close(pfd)


def hooks_dir(state_dir: str, python: str) -> str:
    """A directory holding the one OCI hook definition podman needs (``--hooks-dir``): the prestart hook
    above, run by ``python`` for containers carrying the HOOK_ANNOTATION. Rewritten only when it changes."""
    d = os.path.join(state_dir, "oci-hooks")
    path = os.path.join(d, "agentkernel-disk.json")
    # written by hand: json costs milliseconds to import on the podman one-shot path
    def q(v: str) -> str:
        return '"' + "".join(c if c not in '"\\' and ord(c) >= 32 else f"\\u{ord(c):04x}" for c in v) + '"'

    when = q("^" + HOOK_ANNOTATION.replace(".", "\\.") + "$")
    body = ('{"version": "1.0.0", "hook": {"path": ' + q(python) + ', "args": ["python", "-I", "-S", '
            + q(os.path.abspath(__file__)) + ', "hook"], "timeout": 10}, "when": {"annotations": {' + when
            + ': "^[0-9]+$"}}, "stages": ["prestart"]}\n')
    try:
        with open(path) as f:
            if f.read() == body:
                return d
    except OSError:
        pass
    os.makedirs(d, mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, path)
    return d


def _hook() -> int:
    """OCI prestart hook: the container's state on stdin; cap its root subvolume at the annotation's MiB."""
    import json
    import sys

    try:
        state = json.load(sys.stdin)
        mb = int(state.get("annotations", {})[HOOK_ANNOTATION])
        with open(os.path.join(state["bundle"], "config.json")) as f:
            root = json.load(f)["root"]["path"]
        if not os.path.isabs(root):
            root = os.path.join(state["bundle"], root)
        limit(root, mb)
    except (OSError, ValueError, KeyError, QuotaError) as exc:
        sys.stderr.write(f"agentkernel disk-quota hook: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["hook"]:
        sys.exit(_hook())
    sys.stderr.write("usage: diskquota.py hook  (an OCI prestart hook; reads the container state on stdin)\n")
    sys.exit(2)
