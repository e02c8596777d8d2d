"""Compiled-module cache: compile a Wasm module once, then load the native artifact in ~0.5 ms.

Layout (under ``paths.cache_dir()/wasm``, created 0700 and only trusted when owned by us and not
group/world-writable, because a serialized artifact is native code that wasmtime maps and runs)::

    <wasmtime version>/<engine config key>/<sha256 of the module>.cwasm
    index/<sha1 of the module's absolute path>          "size mtime_ns inode sha256" (skip re-hashing)

The key is the sha256 of the module bytes plus the wasmtime version plus the engine configuration
(fuel metering changes the generated code). A stale or corrupt artifact fails ``deserialize`` and is
replaced by a fresh compile. Writes go through a temporary file and ``os.replace`` (atomic), so
concurrent processes never see half an artifact.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from .. import paths

_LOCK = threading.Lock()
_VERSION: str | None = None


def wasmtime_version() -> str:
    """The installed wasmtime package version (part of every cache key). Read from the package's
    dist-info directory name (~0.1 ms; importlib.metadata.version costs ~30 ms on a cold start), plus the
    native library's size so a rebuilt library with the same version never reuses old artifacts."""
    global _VERSION
    if _VERSION is None:
        import wasmtime

        pkg = os.path.dirname(wasmtime.__file__)
        site = os.path.dirname(pkg)
        ver = "unknown"
        try:
            for name in os.listdir(site):
                if name.startswith("wasmtime-") and name.endswith(".dist-info"):
                    ver = name[len("wasmtime-"):-len(".dist-info")]
                    break
        except OSError:
            pass
        try:
            lib_size = os.stat(os.path.join(pkg, "linux-x86_64", "_libwasmtime.so")).st_size
        except OSError:
            lib_size = 0
        _VERSION = f"{ver}-{lib_size}" if lib_size else ver
    return _VERSION


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModuleCache:
    """Serialized artifacts on disk plus a path -> sha256 index. ``root=None`` disables the disk part."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root
        self._hash_memo: dict[tuple[str, int, int, int], str] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def default(cls) -> ModuleCache:
        if os.environ.get("AGENTKERNEL_WASM_CACHE") == "off":
            return cls(None)
        try:
            root = os.environ.get("AGENTKERNEL_WASM_CACHE") or os.path.join(paths.cache_dir(), "wasm")
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError:
            return cls(None)
        return cls(root if _trusted_dir(root) else None)

    # -- hashing with a stat-keyed index (a 26 MB CPython module takes ~17 ms to hash) --
    def file_sha256(self, path: str) -> tuple[str, bytes | None]:
        """(sha256, bytes or None). The bytes are returned when the file had to be read anyway."""
        path = os.path.abspath(path)
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        h = self._hash_memo.get(key)
        if h:
            return h, None
        idx = self._index_path(path)
        if idx:
            try:
                with open(idx) as f:
                    size, mtime, ino, digest = f.read().split()
                if (int(size), int(mtime), int(ino)) == key[1:] and len(digest) == 64:
                    self._hash_memo[key] = digest
                    return digest, None
            except (OSError, ValueError):
                pass
        with open(path, "rb") as f:
            data = f.read()
        digest = sha256_bytes(data)
        self._hash_memo[key] = digest
        if idx:
            _atomic_write(idx, f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {digest}\n".encode())
        return digest, data

    def _index_path(self, path: str) -> str | None:
        if not self.root:
            return None
        d = os.path.join(self.root, "index")
        os.makedirs(d, mode=0o700, exist_ok=True)
        return os.path.join(d, hashlib.sha1(path.encode()).hexdigest())

    def artifact_path(self, digest: str, engine_key: str) -> str | None:
        if not self.root:
            return None
        return os.path.join(self.root, wasmtime_version(), engine_key, digest + ".cwasm")

    # -- load or compile --
    def load(self, engine: Any, engine_key: str, digest: str, get_bytes: Any) -> tuple[Any, str]:
        """A wasmtime Module for ``digest``; (module, 'memory'|'disk'|'compiled').

        ``get_bytes()`` returns the module bytes (only called on a miss)."""
        import wasmtime

        art = self.artifact_path(digest, engine_key)
        if art and os.path.exists(art):
            try:
                mod = wasmtime.Module.deserialize_file(engine, art)
                self.hits += 1
                return mod, "disk"
            except Exception:
                try:
                    os.unlink(art)
                except OSError:
                    pass
        self.misses += 1
        mod = wasmtime.Module(engine, get_bytes())
        if art:
            try:
                os.makedirs(os.path.dirname(art), mode=0o700, exist_ok=True)
                _atomic_write(art, bytes(mod.serialize()))
            except OSError:
                pass
        return mod, "compiled"


def _trusted_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not (st.st_mode & 0o022)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_DEFAULT: ModuleCache | None = None


def default_cache() -> ModuleCache:
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            _DEFAULT = ModuleCache.default()
        return _DEFAULT
