"""The CLI's resolved-spec cache: a repeat ``agentkernel run`` through the daemon loads the spec the last
identical run resolved instead of importing and running the resolution (config, spec, image selection,
the auto backend: ~3 ms of a ~12 ms warm run).

Correctness by construction, not by a list of what the resolution might read:

- the *key* is everything the command line and the process bring: the parsed flags, the command's
  program name (the image is chosen for it), the working directory, the effective uid, the *whole*
  environment (pass_env, AGENTKERNEL_*, DOCKER_HOST, XDG_*, PATH: whatever the resolution reads) and the
  stamps of the resolution's own source files (an upgrade re-resolves);
- the *checks* are recorded while the resolution runs, by the code that reads host state, next to the
  read (``note``), and re-made and compared on every hit: a file's whole content (a config file, the
  engines' storage configs and image indexes, the oci image cache's refs; not their mtimes: an in-place
  edit within one timestamp tick keeps mtime and size), kept as its stamp (device, inode, size, mtime,
  ctime: one stat, no read while it holds) and its content's digest (compared when the stamp changed)
  when the file last changed more than ``_SETTLED_NS`` before it was stored (``_settled``: a later edit
  cannot fall within that tick), a stamp where the reader itself decides by one
  (the oci cache's index stamps; the auto backend's fingerprint: binaries, storage configs), whether a
  file or directory exists (each candidate of a PATH lookup: one that has no directory entry at all by
  its directory's device, inode, mtime and ctime, which creating or renaming an entry changes, and only
  when that directory last changed more than ``_SETTLED_NS`` before: a change within the same timestamp
  tick cannot hide), a directory's listing, or a cheap call whose result the resolution used
  (``os.path.ismount``, ``os.path.realpath``); a check recorded twice (two readers of one file, a
  directory twice on PATH) is stored and re-made once;
- anything the cache cannot re-check (the clock: a registry's unreachable mark expires; a pull; an
  engine asked through a subprocess) marks the resolution ``volatile``: it is not stored.

The file: ``<runtime dir>/resolved-<euid>/<the key's digest>``, the directory 0700 and the file 0600,
both owned by the caller (anything else is ignored: a cache never crosses users), written to a temporary
name and renamed (two concurrent CLIs never leave a torn file), with a CRC of its body (a corrupted or
truncated file is a miss). Stdlib-only and built-in modules: this is the warm path.
"""

from __future__ import annotations

import binascii
import marshal
import os

FORMAT = 1
_MAGIC = b"AKRS"
# the modules whose code decides what a resolution yields: a change to any re-resolves
_SOURCES = ("resolvedspec.py", "config.py", "spec.py", "_model.py", "cli_flags.py", "imagesel.py",
            "images/pull.py", "images/settings.py", "backends/auto.py", "backends/__init__.py", "oci/rootfs.py")
_PKG = os.path.dirname(os.path.abspath(__file__))

_rec: list | None = None  # the checks of the resolution being recorded (None: not recording)


def note(check: tuple) -> None:
    """Record one input of the resolution being recorded: ``("file", path, bytes | None)`` (its content),
    ``("stamp", path, stamp(path))`` (where the reader itself compares stamps), ``("isfile" | "isdir" |
    "exists" | "isexec", path, bool)``, ``("dirstamp", path, dir_stamp(path))`` (``candidate``),
    ``("fstamp", path, file_stamp(path), digest)`` (``store`` makes these of settled files' content checks),
    ``("listdir", path, names | None)``, ``("call", module, function, args, result)`` or ``("volatile",)``
    (not cacheable)."""
    if _rec is not None:
        _rec.append(check)


def volatile() -> None:
    note(("volatile",))


def recording() -> bool:
    """Whether a resolution is being recorded (a reader may then note what a cheaper re-check needs)."""
    return _rec is not None


def is_exec(path: str) -> bool:
    """What ``which`` asks of each candidate: a regular file we may execute."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


def stamp(path: str) -> list[int] | None:
    """A file's (mtime_ns, size, inode), as the oci cache compares them, or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


_SETTLED_NS = 2_000_000_000  # a file or directory changed this long ago cannot change again within its stamp's tick


def dir_stamp(path: str) -> list[int] | None:
    """A directory's (device, inode, mtime_ns, ctime_ns), or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def file_stamp(path: str) -> list[int] | None:
    """A file's (device, inode, size, mtime_ns, ctime_ns), or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _digest(data: bytes | None) -> bytes | None:
    import _sha256

    return None if data is None else _sha256.sha256(data).digest()


def _settled(check: tuple, now_ns: int) -> tuple:
    """A ``("file", path, content)`` check as ``("fstamp", path, file_stamp(path), sha256(content))`` when
    the file is there, still holds that content and last changed (mtime and ctime: ``touch`` cannot set the
    latter) more than ``_SETTLED_NS`` before: any later write, truncation, chmod or replacement changes its
    stamp, so one stat re-checks it; only a changed stamp reads the file and compares its digest (a rewrite
    with the same bytes still holds, as the content check did). Otherwise the check as it was. The stat
    comes before the read: a change between the two shows as a changed stamp on the next hit."""
    if check[0] != "file" or check[2] is None:
        return check
    st = file_stamp(check[1])
    if (st is None or st[2] != len(check[2])  # a size that is not the content's: /proc, /sys (no stamps there)
            or now_ns - max(st[3], st[4]) <= _SETTLED_NS or read_file(check[1]) != check[2]):
        return check
    return ("fstamp", check[1], st, _digest(check[2]))


def candidate(d: str, path: str, found: bool) -> tuple:
    """The check for a PATH lookup's candidate ``path`` in directory ``d`` that ``is_exec`` answered
    ``found`` for: where no entry of that name exists, ``d``'s stamp (the one stat every missing candidate
    in ``d`` shares, instead of one each) unless ``d`` changed too recently to tell; else ``isexec``. The
    stamp is taken before the entry is looked for: an entry made in between changes the stamp."""
    if not found:
        import time

        now = time.time_ns()
        st = dir_stamp(d)
        if (st is None or now - max(st[2], st[3]) > _SETTLED_NS) and not os.path.lexists(path):
            return ("dirstamp", d, st)
    return ("isexec", path, found)


def start() -> None:
    global _rec
    _rec = []


def stop() -> list:
    global _rec
    rec, _rec = _rec or [], None
    return rec


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def listing(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def _holds(check) -> bool:
    kind = check[0]
    if kind == "file":
        return read_file(check[1]) == check[2]
    if kind == "isfile":
        return os.path.isfile(check[1]) == check[2]
    if kind == "listdir":
        return listing(check[1]) == check[2]
    if kind == "stamp":
        return stamp(check[1]) == check[2]
    if kind == "isdir":
        return os.path.isdir(check[1]) == check[2]
    if kind == "exists":
        return os.path.exists(check[1]) == check[2]
    if kind == "isexec":
        return is_exec(check[1]) == check[2]
    if kind == "fstamp":
        return file_stamp(check[1]) == check[2] or _digest(read_file(check[1])) == check[3]
    if kind == "dirstamp":
        return dir_stamp(check[1]) == check[2]
    if kind == "call":  # __import__: importlib (and what it imports) stays off the warm path
        mod = __import__(check[1], fromlist=[check[2]])
        return getattr(mod, check[2])(*check[3]) == check[4]
    return False


def key(args, command: list[str]) -> str:
    """Everything the process brings to a resolution (see the module's docstring), as a SHA-256 digest
    (``_sha256`` is built in, unlike ``hashlib``): the environment's values never reach the file."""
    import _sha256

    stamps = []
    for rel in _SOURCES:
        try:
            st = os.stat(os.path.join(_PKG, rel))
            stamps.append((rel, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((rel, None))
    flags = sorted((k, v) for k, v in vars(args).items() if k != "command")
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    # the environment as os.environ keeps it (its encoded bytes, updated by every os.environ change):
    # sorting those is ~40 us less than decoding every name and value first
    text = repr((FORMAT, _PKG, stamps, os.geteuid(), cwd, command[0] if command else None, flags,
                 sorted(os.environ._data.items())))
    return _sha256.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _dir(create: bool) -> str | None:
    """The caller's own cache directory (0700, owned by the effective uid), or None."""
    from . import paths

    euid = os.geteuid()
    d = os.path.join(paths.runtime_dir(), f"resolved-{euid}")
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(d, 0o700)
            st = os.lstat(d)
        except OSError:
            return None
    except OSError:
        return None
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != euid or st.st_mode & 0o077:
        return None
    return d


def _path(d: str, k: str) -> str:
    return os.path.join(d, k[:32])


def load(k: str):
    """The value stored under key ``k`` if every recorded check still holds, else None."""
    d = _dir(False)
    if d is None:
        return None
    try:
        fd = os.open(_path(d, k), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) < 8 or data[:4] != _MAGIC or int.from_bytes(data[4:8], "little") != binascii.crc32(data[8:]):
        return None
    try:
        stored_key, checks, value = marshal.loads(data[8:])
    except (ValueError, EOFError, TypeError):
        return None
    if stored_key != k:
        return None
    try:
        for check in checks:
            if not _holds(check):
                return None
    except Exception:  # a check that cannot be re-made is a miss, never an error of the run
        return None
    return value


def store(k: str, checks: list, value) -> bool:
    """Store ``value`` under ``k`` with the checks recorded while it was resolved (never when one of
    them is volatile). Errors are ignored: the cache is an optimisation."""
    if any(c[0] == "volatile" for c in checks):
        return False
    d = _dir(True)
    if d is None:
        return False
    import time

    now = time.time_ns()
    try:
        seen: set[bytes] = set()
        unique = []
        for c in checks:  # the first of equal checks (lists are unhashable; marshal version 0 has no
            b = marshal.dumps(c, 0)  # references, so equal data gives equal bytes)
            if b not in seen:
                seen.add(b)
                unique.append(_settled(c, now))
        body = marshal.dumps((k, unique, value))
    except ValueError:
        return False
    path = _path(d, k)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:
            os.unlink(tmp)  # a leftover of a crashed process that had our pid: O_EXCL below sets the mode
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, _MAGIC + binascii.crc32(body).to_bytes(4, "little") + body)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def drop(k: str) -> None:
    """Forget what is stored under ``k`` (errors ignored)."""
    d = _dir(False)
    if d is not None:
        try:
            os.unlink(_path(d, k))
        except OSError:
            pass
