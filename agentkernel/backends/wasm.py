"""Wasm backend: WASI modules, shell commands and Python in wasmtime sandboxes, in-process.

What runs:
- ``options["module"]`` set: that WASI module (``.wasm`` or ``.wat``); argv is the guest's argv (argv[0]
  is the program name). ``options["func"]``: call that exported function instead of ``_start`` with
  argv[1:] converted to its parameter types; results are printed one per line.
- ``python3``/``python`` ...: CPython 3.12 for WASI (``options["python"]="micropython"`` for MicroPython).
- anything else: the WASI shell ``aksh`` (``sh -c``, ``bash -c`` and the text built-ins; unknown -> 127).

The guest sees only what is preopened: a fresh scratch directory as ``/`` (one-shot runs of the shell
and Python; none for ``module`` runs), the sandbox's own directory as ``/`` (named sandboxes), plus
``options["preopen"]`` = "HOST:GUEST[:ro],..." and the caller's directory at /workspace with
``mount_cwd``. See docs/backends/wasm.md for limits, capabilities and the pool.

``import wasmtime`` happens on first use (``agentkernel.wasm.runtime.require_wasmtime``), so importing this
module is cheap and a missing extra is a ``MissingExtra`` error with the pip command.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import AsyncIterator

from ..errors import ConfigError, InvalidState, NotFound, PolicyNotEnforceable, ValidationError
from ..spec import SandboxSpec, mount_source_of
from .base import (
    CONTROLS,
    LABEL_ID,
    LABEL_MANAGED,
    LABEL_NAME,
    LABEL_OWNER_BOOT,
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    Availability,
    Backend,
    Capabilities,
    ExecRequest,
    ExecResult,
    InstancePool,
    OneShot,
    Outcome,
    SandboxInfo,
    SandboxRef,
    owner_labels,
    required_controls,
)

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any, ClassVar


MIB = 1024 * 1024
MAX_STDIN = 256 * MIB

WASM_CONTROLS = {
    "network_none",        # WASI preview1 has no socket creation; no sockets are preopened
    "read_only_root",      # "/" preopened read-only (writable /tmp and workdir beside it)
    "memory",              # Store limit on linear memory (memory.grow fails past it)
    "cpu",                 # an instance is single-threaded: at most one core (vcpus >= 1 only, see check)
    "pids",                # an instance cannot create processes or threads
    "seccomp_default",     # the guest makes no system calls at all; only the WASI imports we link
    "seccomp_restrictive",
    "cap_drop_all",        # the guest is not a process: it holds no Linux capabilities
    "no_new_privileges",   # ... and cannot exec anything to gain privileges
    "non_root",            # ... and has no uid; files it creates are owned by the host process
    "mount_cwd",           # the caller's directory preopened at /workspace
    "env",                 # WASI environ
    # writable storage: every writable scratch directory (the root, or /tmp and the workdir beside a read-only
    # root; a named sandbox's too) is a btrfs subvolume capped at disk_mb on the storage volume (diskquota),
    # where that volume is usable by this process (check); never /dev/shm or the host's disk uncapped
    "disk_rootfs",
    "disk_tmpfs",
}


_CAP_STATUS: dict[tuple, tuple[bool, str]] = {}


def storage_cap_status() -> tuple[bool, str]:
    """(can this process cap wasm scratch, why): root (quota-group limits need CAP_SYS_ADMIN) and the storage
    volume is btrfs with quota groups. Cached per process."""
    from .. import diskquota

    key = (diskquota.volume(), os.geteuid())
    hit = _CAP_STATUS.get(key)
    if hit is None:
        if os.geteuid() != 0:
            hit = (False, "capping wasm scratch needs root (btrfs quota-group limits need CAP_SYS_ADMIN)")
        else:
            hit = diskquota.quota_status(diskquota.volume())
        _CAP_STATUS[key] = hit
    return hit


def _parse_preopens(value: str) -> tuple[tuple[str, str, bool], ...]:
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ConfigError(f"wasm option preopen: {item!r} is not HOST:GUEST[:ro]")
        host, guest = parts[0], parts[1]
        if not host or not os.path.isdir(host):
            raise ValidationError(f"wasm option preopen: host directory {host!r} does not exist")
        if not guest.startswith("/") or any(p == ".." for p in guest.split("/")):
            raise ValidationError(f"wasm option preopen: guest path {guest!r} must be absolute without '..'")
        out.append((os.path.realpath(host), guest.rstrip("/") or "/", len(parts) == 3 and parts[2] == "ro"))
    return tuple(out)


class _Plan:
    __slots__ = ("argv", "env", "fs", "fuel", "func", "func_args", "kind", "loaded", "memory_bytes")

    def key(self) -> tuple:
        return (self.loaded.digest, self.loaded.engine_key, self.memory_bytes, self.fs.key())


class _Workers:
    """Daemon threads that run guests off the event loop (daemon: a stuck host call never blocks exit)."""

    def __init__(self, n: int) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._loop, name=f"ak-wasm-run-{i}", daemon=True).start()

    def _loop(self) -> None:
        from ..wasm.pool import set_future

        while True:
            fn, loop, fut = self.q.get()
            try:
                res = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(set_future, fut, None, exc)
            else:
                loop.call_soon_threadsafe(set_future, fut, res, None)

    def submit(self, fn: Any) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.q.put((fn, loop, fut))
        return fut


_WORKERS: _Workers | None = None
_WORKERS_LOCK = threading.Lock()


def _workers() -> _Workers:
    global _WORKERS
    if _WORKERS is None:
        with _WORKERS_LOCK:
            if _WORKERS is None:
                n = os.environ.get("AGENTKERNEL_WASM_WORKERS") or max(2, min(8, os.cpu_count() or 2))
                _WORKERS = _Workers(int(n))
    return _WORKERS


INLINE_BUDGET_S = 0.002  # a command whose recent runs took at most this runs on the event loop itself
INLINE_SLICE_S = 0.02  # ...under this time slice (past it: started over on a worker thread)
PLAN_TTL_S = 1.0  # a one-shot run's plan is reused this long (run(): same spec object, argv, env, cwd)
PLAN_CACHE_MAX = 256


class _Budget:
    """Recent run times per (module, argv, ...) key: which runs fit the event loop's budget (bounded LRU)."""

    MAX_KEYS = 1024

    def __init__(self) -> None:
        self.times: dict[tuple, float] = {}

    def fits(self, key: tuple) -> bool:
        t = self.times.get(key)
        return t is not None and t <= INLINE_BUDGET_S

    def observe(self, key: tuple, seconds: float) -> None:
        old = self.times.pop(key, None)
        self.times[key] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if len(self.times) > self.MAX_KEYS:
            self.times.pop(next(iter(self.times)))

    def forget(self, key: tuple) -> None:
        self.times.pop(key, None)


_BUDGET = _Budget()


def _only_task() -> bool:
    import asyncio

    try:
        return len(asyncio.all_tasks()) <= 1
    except RuntimeError:
        return False


async def _collect_stdin(stdin: Any) -> bytes:
    if stdin is None:
        return b""
    if isinstance(stdin, bytes | bytearray | memoryview):
        return bytes(stdin)
    chunks = []
    total = 0
    async for chunk in stdin:
        total += len(chunk)
        if total > MAX_STDIN:
            raise ValidationError(f"stdin for a wasm run is limited to {MAX_STDIN // MIB} MiB (it is read fully "
                                  "before the guest starts)")
        chunks.append(bytes(chunk))
    return b"".join(chunks)


def _is_number(s: str) -> bool:
    try:
        float(s) if not s.lower().startswith(("0x", "-0x")) else int(s, 0)
    except ValueError:
        return False
    return True


def _inside(path: str, base: str) -> bool:
    """A handle from the store or the journal only ever deletes under our own directories."""
    p, b = os.path.realpath(path), os.path.realpath(base)
    return os.path.dirname(p) == b and os.path.basename(p) not in ("", ".", "..")


def _capped_base() -> str | None:
    """The capped scratch base (on the storage volume) when it exists and this process may use it."""
    from .. import diskquota

    base = os.path.join(diskquota.volume(), f"wasm-{os.geteuid()}")
    if not os.path.isdir(base):
        return None
    from ..wasm.runtime import capped_scratch_base

    return capped_scratch_base()


def _make_place(d: str, place: str, sandbox_id: str, cap_mb: int | None) -> None:
    """A named sandbox's writable place (root, tmp, work): a plain directory, or with ``cap_mb`` a capped
    subvolume ``<volume>/wasm-<uid>/named-<id>-<place>`` that ``d/<place>`` links to (d lives in the data
    dir, which is not on the volume; the guest sees only the inside of the place, never the link)."""
    path = os.path.join(d, place)
    if cap_mb is None:
        os.mkdir(path, 0o755 if place == "root" else 0o700)
        return
    from ..wasm.runtime import _capped_dir, capped_scratch_base

    target = os.path.join(capped_scratch_base(), f"named-{sandbox_id}-{place}")
    _capped_dir(target, cap_mb)
    os.symlink(target, path)


def _remove_named(d: str, sandbox_id: str) -> None:
    from ..wasm.runtime import _remove_tree

    for place in ("root", "tmp", "work"):
        link = os.path.join(d, place)
        if os.path.islink(link):
            target = os.readlink(link)
            base = _capped_base()
            if base and _inside(target, base) and os.path.basename(target) == f"named-{sandbox_id}-{place}":
                _remove_tree(target)
    shutil.rmtree(d, ignore_errors=True)


def _sandboxes_dir() -> str:
    from .. import paths

    d = os.path.join(paths.data_dir(), "wasm", "sandboxes")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


class WasmBackend(Backend, OneShot, InstancePool):
    name = "wasm"
    capabilities = Capabilities(WASM_CONTROLS, {"exec", "files", "oneshot", "pool", "module", "func", "fuel"},
                                isolation="wasm sandbox (wasmtime, in-process)")
    options_allowed: ClassVar[tuple[str, ...]] = ("module", "func", "mode", "preopen", "fuel", "python")
    in_process = True

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self._pools: dict[tuple, Any] = {}
        self._plans: dict[tuple, tuple] = {}  # _cached_plan
        self._hyperlight: Any = None
        # Run guests on the event loop's thread (True), on worker threads (False), or decide per run
        # (None): inline when the calling task is the loop's only task (the CLI's one-shot), else threads
        # so a long guest never blocks a daemon's loop.
        self.inline: bool | None = None

    # -- host checks --------------------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> Availability:
        try:
            import wasmtime  # noqa: F401

            from ..wasm.cache import wasmtime_version

            wt = wasmtime_version().split("-")[0]
        except Exception as exc:
            return Availability(False, f"the Python package 'wasmtime' is not usable: {exc}",
                                fix="pip install 'agentkernel-sandbox[wasm]'")
        from ..wasm import hyperlight
        from ..wasm.shell import aksh_path

        details: dict[str, Any] = {"wasmtime": wt}
        hl_ok, hl_reason, _ = hyperlight.probe_hardware_virt()
        details["hyperlight"] = {"available": hl_ok, "reason": hl_reason}
        for label, fn in (("cpython", "cpython_path"), ("micropython", "micropython_path")):
            try:
                from ..wasm import python as _py

                details[label] = getattr(_py, fn)()
            except Exception as exc:
                details[label] = f"missing: {exc}"
        try:
            details["aksh"] = aksh_path()
        except Exception as exc:
            details["aksh"] = None
            return Availability(False, f"wasmtime {wt} works but {exc}", fix="make -C wasm (or bash scripts/setup.sh)",
                                details=details)
        return Availability(True, f"wasmtime {wt} (in-process); shell aksh built; hyperlight mode: "
                                  f"{'available' if hl_ok else 'unavailable'}", details=details)

    def _opts(self, spec: SandboxSpec) -> dict[str, str]:
        opts = dict(self.options)
        opts.update(spec.options or {})
        bad = sorted(set(opts) - set(self.options_allowed))
        if bad:
            raise ConfigError(f"backend 'wasm' has no option {bad[0]!r} (options: {', '.join(self.options_allowed)})")
        return opts

    def check(self, spec: SandboxSpec) -> None:
        opts = self._opts(spec)
        missing = [c for c in required_controls(spec) if c not in self.capabilities.controls]
        vcpus = spec.resources.vcpus
        why = {c: CONTROLS[c] for c in missing}
        if vcpus is not None and vcpus < 1:
            missing.insert(0, "cpu")
            why["cpu"] = (f"a CPU quota of {vcpus:g} cores: a wasm instance is single-threaded, so whole-core "
                          "quotas (vcpus >= 1) hold but a fraction of a core cannot be enforced")
        if missing:
            msg = "backend 'wasm' cannot enforce: " + "; ".join(f"{c} ({why[c]})" for c in missing)
            hints = []
            if "cpu" in missing:
                hints.append("set vcpus >= 1 (e.g. --vcpus 1)")
            if "network_full" in missing or "network_allowlist" in missing:
                hints.append("WASI preview1 has no sockets: use network = false")
            raise PolicyNotEnforceable(msg, hint="; ".join(hints) or "choose another backend or relax the spec")
        if spec.resources.disk_mb is not None:
            ok, why = storage_cap_status()
            if not ok:
                from ..diskquota import FIX

                raise PolicyNotEnforceable(
                    f"backend 'wasm' cannot cap its scratch storage at {spec.resources.disk_mb} MiB: {why}", hint=FIX)
        mode = opts.get("mode", "wasmtime")
        if mode not in ("wasmtime", "hyperlight"):
            raise ConfigError(f"wasm option mode must be 'wasmtime' or 'hyperlight', got {mode!r}")
        if mode == "hyperlight":
            from ..wasm.hyperlight import require_available

            require_available()
        if "fuel" in opts:
            try:
                if int(opts["fuel"]) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"wasm option fuel must be a positive integer, got {opts['fuel']!r}") from None
        if opts.get("python", "cpython") not in ("cpython", "micropython"):
            raise ConfigError(f"wasm option python must be 'cpython' or 'micropython', got {opts['python']!r}")
        if "func" in opts and "module" not in opts:
            raise ConfigError("wasm option func needs option module (the module whose export to call)")
        if "preopen" in opts:
            _parse_preopens(opts["preopen"])

    # -- planning ---------------------------------------------------------------------------------------
    def _plan(self, spec: SandboxSpec, req: ExecRequest, root: str | None) -> _Plan:
        from ..wasm import python as py
        from ..wasm import runtime as rt
        from ..wasm.shell import aksh_path, classify, shell_argv

        opts = self._opts(spec)
        plan = _Plan()
        fuel = int(opts["fuel"]) if "fuel" in opts else None
        plan.fuel = fuel
        plan.memory_bytes = spec.resources.memory_mb * MIB if spec.resources.memory_mb is not None else None
        preopens = _parse_preopens(opts["preopen"]) if opts.get("preopen") else ()
        if spec.policy.mount_cwd:
            preopens = (*preopens, (mount_source_of(spec), "/workspace", False))
        env = dict(spec.env)
        env.update(req.env)
        cwd = req.cwd or spec.workdir
        plan.func = None
        plan.func_args = None
        if opts.get("module"):
            plan.kind = "module"
            plan.loaded = rt.load_module(opts["module"], fuel=fuel is not None)
            plan.argv = list(req.argv)
            if opts.get("func"):
                plan.func = opts["func"]
                # argv[0] is a program name unless it is already an argument (a number: function
                # names are identifiers), so both ["add", "2", "40"] and ["2", "40"] call add(2, 40)
                plan.func_args = list(req.argv if _is_number(req.argv[0]) else req.argv[1:])
                rt.resolve_func(plan.loaded, plan.func)
            fs_root = root
        else:
            kind = classify(req.argv)
            if kind == "python" and opts.get("python") == "micropython":
                kind = "micropython"
            plan.kind = kind
            if kind == "python":
                path = py.cpython_path()
                plan.loaded = rt.load_module(path, fuel=fuel is not None, name="python3")
                py.check_cpython_digest(plan.loaded.digest, path)
                plan.argv = py.absolute_script(["python3", *req.argv[1:]], cwd)
                env.setdefault("PWD", cwd)
                preopens = (*preopens, (py.HOOK_DIR, py.CPYTHON_SITE_PACKAGES, True))
            elif kind == "micropython":
                plan.loaded = rt.load_module(py.micropython_path(), fuel=fuel is not None, name="micropython")
                plan.argv = py.micropython_argv(req.argv)
            else:
                plan.loaded = rt.load_module(aksh_path(), fuel=fuel is not None, name="aksh")
                plan.argv = shell_argv(req.argv)
                env.setdefault("PWD", cwd)
            fs_root = root or "scratch"
        plan.env = env
        plan.fs = rt.FsPlan(fs_root, preopens, workdir=cwd if fs_root else None,
                            read_only_root=spec.policy.read_only_root,
                            cap_mb=spec.resources.disk_mb if fs_root == "scratch" else None)
        return plan

    # -- running ----------------------------------------------------------------------------------------
    @staticmethod
    def _work(plan: _Plan, pool: Any, stdin: bytes, limit: int, on_output: Any = None, cancel: Any = None):
        """The run itself (on whatever thread calls the returned function): instance -> command -> give back."""
        from ..wasm import runtime as rt

        def work(timeout: float | None) -> rt.RawResult:
            t0 = time.perf_counter()
            p = pool.acquire() if pool is not None else rt.prepare(plan.loaded, plan.memory_bytes, plan.fs)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            try:
                r = rt.run_prepared(p, plan.argv, plan.env, stdin, timeout=timeout, fuel=plan.fuel,
                                    output_limit=limit, on_output=on_output, func=plan.func,
                                    func_args=plan.func_args, cancel=cancel)
            finally:
                if pool is not None:
                    pool.release(p)
                else:
                    p.discard()
            r.timings["acquire_us" if pool is not None else "prepare_us"] = (t1 - t0) * 1e6
            r.timings["run_us"] = (time.perf_counter() - t1) * 1e6
            r.timings["run_cpu_us"] = (time.thread_time() - c1) * 1e6  # its cost, whatever the GIL did
            return r

        return work

    @staticmethod
    def _budget_key(plan: _Plan, req: ExecRequest, stdin: bytes) -> tuple | None:
        """The key of the run's recent times when it could run on the loop itself: no streaming, and it
        touches nothing but its own scratch (so a run that outgrew its slice can start over). Else None."""
        if req.on_output is not None or plan.fs.root not in ("scratch", None) or plan.fs.preopens:
            return None
        return (plan.key(), tuple(plan.argv), plan.env.get("PWD"), len(stdin))

    @staticmethod
    def _try_inline(work: Any, req: ExecRequest, budget_key: tuple) -> ExecResult | None:
        """When the command's recent runs fit the loop's budget, run it right here (no thread hop) under a
        short time slice. None: it does not fit, or it outgrew the slice (nothing of it is kept: it is to be
        started over on a worker thread with its full time limit)."""
        if not _BUDGET.fits(budget_key):
            return None
        slice_s = INLINE_SLICE_S if req.timeout is None else min(req.timeout, INLINE_SLICE_S)
        raw = work(slice_s)
        if raw.timed_out and (req.timeout is None or req.timeout > INLINE_SLICE_S):
            _BUDGET.forget(budget_key)
            return None
        _BUDGET.observe(budget_key, raw.timings.get("run_cpu_us", 0.0) / 1e6)
        raw.timings["inline"] = 1.0
        return ExecResult(raw.exit_code, timed_out=raw.timed_out, oom_killed=raw.oom_killed,
                          stdout=raw.stdout, stderr=raw.stderr, truncated=raw.truncated, timings=raw.timings)

    async def _execute(self, plan: _Plan, req: ExecRequest, pool: Any = None) -> ExecResult:
        import asyncio

        from ..wasm import runtime as rt

        stdin = await _collect_stdin(req.stdin)
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        on_output = None
        out_q: asyncio.Queue | None = None
        if req.on_output is not None:
            out_q = asyncio.Queue()

            def on_output(fd: int, data: bytes) -> None:
                loop.call_soon_threadsafe(out_q.put_nowait, (fd, data))

        run_work = self._work(plan, pool, stdin, req.output_limit, on_output, cancel)

        def work(timeout: float | None = req.timeout) -> rt.RawResult:
            return run_work(timeout)

        # (a background owner - the daemon, the API - is never "the only task": asking asyncio is O(tasks))
        inline = self.inline if self.inline is not None else (not self.background and _only_task())
        budget_key = None
        if not inline and self.inline is None:
            budget_key = self._budget_key(plan, req, stdin)
            if budget_key is not None:
                res = self._try_inline(work, req, budget_key)
                if res is not None:
                    return res
        if inline:
            # nothing else shares this event loop (the CLI's one-shot): skip the thread hop
            if req.on_output is not None:
                cb = req.on_output

                def on_output(fd: int, data: bytes) -> None:
                    res = cb(fd, data)
                    if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
                        pending.append(asyncio.ensure_future(res))

                pending: list[Any] = []
                raw = self._work(plan, pool, stdin, req.output_limit, on_output, cancel)(req.timeout)
                for f in pending:
                    await f
            else:
                raw = work()
            return ExecResult(raw.exit_code, timed_out=raw.timed_out, oom_killed=raw.oom_killed,
                              stdout=raw.stdout, stderr=raw.stderr, truncated=raw.truncated, timings=raw.timings)

        fut = _workers().submit(work)
        if budget_key is not None:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                  or _BUDGET.observe(budget_key, f.result().timings.get("run_cpu_us", 1e6) / 1e6))
        if out_q is not None:
            fut.add_done_callback(lambda _f: out_q.put_nowait(None))

        async def consume() -> rt.RawResult:
            if out_q is not None:  # chunks arrive in order, then None once the run is over
                while (item := await out_q.get()) is not None:
                    res = req.on_output(*item)
                    if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
                        await res
            return await asyncio.shield(fut)

        try:
            if req.timeout is not None:
                raw = await asyncio.wait_for(consume(), req.timeout + 5)
            else:
                raw = await consume()
        except TimeoutError:
            # the guest is blocked in a host call the epoch cannot interrupt: report the timeout now
            cancel.set()
            return ExecResult(124, timed_out=True, stderr=b"agentkernel: wasm guest did not stop at its time limit\n")
        except asyncio.CancelledError:
            cancel.set()
            raise
        return ExecResult(raw.exit_code, timed_out=raw.timed_out, oom_killed=raw.oom_killed, stdout=raw.stdout,
                          stderr=raw.stderr, truncated=raw.truncated, timings=raw.timings)

    async def _run_hyperlight(self, req: ExecRequest) -> ExecResult:
        from ..wasm import hyperlight

        hyperlight.require_available()
        stdin = await _collect_stdin(req.stdin)
        code = hyperlight.code_of(req.argv, stdin)
        if self._hyperlight is None:
            self._hyperlight = hyperlight.HyperlightRunner()
        runner = self._hyperlight

        def work() -> ExecResult:
            rc, out, err = runner.run(code)
            return ExecResult(rc, stdout=out, stderr=err)

        res = await _workers().submit(work)
        if req.on_output is not None:
            for fd, data in ((1, res.stdout), (2, res.stderr)):
                if data:
                    r = req.on_output(fd, data)
                    if hasattr(r, "__await__"):
                        await r
            res.stdout = res.stderr = b""
        return res

    async def run(self, spec: SandboxSpec, req: ExecRequest, *, sandbox_id: str,
                  owner: dict[str, Any]) -> ExecResult:
        """One-shot, in-process: a fresh (or pooled, never-used) instance, destroyed after the run."""
        t0 = time.perf_counter()
        if self._opts(spec).get("mode") == "hyperlight":
            return await self._run_hyperlight(req)
        plan, pool = self._cached_plan(spec, req)
        res = await self._execute(plan, req, pool)
        res.timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return res

    def run_now(self, spec: SandboxSpec, req: ExecRequest) -> ExecResult | None:
        """``run`` done synchronously on the calling (event loop's) thread, when it can be: stdin is bytes
        or None, no streaming, nothing but its own scratch, and the command's recent runs fit the loop's
        budget (``INLINE_BUDGET_S``). None: call ``run`` (also when the run outgrew its time slice)."""
        if self.inline is not None or (req.stdin is not None and not isinstance(req.stdin, bytes)):
            return None
        t0 = time.perf_counter()
        if self._opts(spec).get("mode") == "hyperlight":
            return None
        plan, pool = self._cached_plan(spec, req)
        stdin = req.stdin or b""
        budget_key = self._budget_key(plan, req, stdin)
        if budget_key is None:
            return None
        res = self._try_inline(self._work(plan, pool, stdin, req.output_limit), req, budget_key)
        if res is not None:
            res.timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return res

    def _cached_plan(self, spec: SandboxSpec, req: ExecRequest) -> tuple[_Plan, Any]:
        """``_plan`` for a one-shot run and the instance pool serving it, remembered for ``PLAN_TTL_S`` per
        (spec object, argv, env, cwd): a client sending the same command many times (the daemon's
        multiplexed connections keep one spec object per spec id) plans it once. Modules are looked up on
        disk again after the TTL (a rebuilt module is picked up)."""
        key = (id(spec), tuple(req.argv), req.cwd, tuple(req.env.items()) if req.env else ())
        now = time.monotonic()
        hit = self._plans.get(key)
        if hit is not None and hit[0] is spec and hit[3] > now:
            return hit[1], hit[2]
        plan = self._plan(spec, req, None)
        pool = self._pools.get(plan.key()) if self._pools else None
        if len(self._plans) >= PLAN_CACHE_MAX:
            self._plans.clear()
        self._plans[key] = (spec, plan, pool, now + PLAN_TTL_S)
        return plan, pool

    def run_sync(self, spec: SandboxSpec, req: ExecRequest) -> ExecResult:
        """The one-shot without asyncio (for a CLI fast path that must not import it): same checks, plan
        and result as ``run``; ``req.stdin`` must be bytes or None; ``on_output`` is called synchronously."""
        from ..wasm import runtime as rt

        t0 = time.perf_counter()
        if self._opts(spec).get("mode") == "hyperlight":
            raise ValidationError("mode=hyperlight has no synchronous path: use run()")
        if req.stdin is not None and not isinstance(req.stdin, bytes | bytearray | memoryview):
            raise ValidationError("run_sync needs stdin as bytes")
        plan = self._plan(spec, req, None)
        p = rt.prepare(plan.loaded, plan.memory_bytes, plan.fs)
        t1 = time.perf_counter()
        try:
            raw = rt.run_prepared(p, plan.argv, plan.env, bytes(req.stdin or b""), timeout=req.timeout,
                                  fuel=plan.fuel, output_limit=req.output_limit, on_output=req.on_output,
                                  func=plan.func, func_args=plan.func_args)
        finally:
            p.discard()
        raw.timings["prepare_us"] = (t1 - t0) * 1e6
        raw.timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return ExecResult(raw.exit_code, timed_out=raw.timed_out, oom_killed=raw.oom_killed, stdout=raw.stdout,
                          stderr=raw.stderr, truncated=raw.truncated, timings=raw.timings)

    def run_oneshot(self, spec: SandboxSpec, argv: list[str], stdio: Any, timeout: float | None, *,
                    sandbox_id: str, owner: dict[str, Any]) -> Outcome:
        """The CLI's daemon-less one-shot (no asyncio): output streamed to ``stdio`` as the guest writes
        it, stdin read fully first when it is a pipe or file (a terminal gives empty stdin: a wasm guest
        cannot be interactive). Traps and limits are also explained on the guest's stderr."""
        import stat

        from ..termio import write_all

        stdin = b""
        if stdio.forward_stdin:
            try:
                st = os.fstat(stdio.stdin)
                if not (stat.S_ISCHR(st.st_mode) and os.isatty(stdio.stdin)):
                    chunks = []
                    total = 0
                    while True:
                        b = os.read(stdio.stdin, 1 << 16)
                        if not b:
                            break
                        total += len(b)
                        if total > MAX_STDIN:
                            raise ValidationError(f"stdin for a wasm run is limited to {MAX_STDIN // MIB} MiB")
                        chunks.append(b)
                    stdin = b"".join(chunks)
            except OSError:
                stdin = b""
        fds = {1: stdio.stdout, 2: stdio.stderr}
        closed: set[int] = set()

        def out(fd: int, data: bytes) -> None:
            if fd in closed:
                return
            try:
                write_all(fds[fd], data)
            except OSError:  # a closed pipe: drop the rest, like a killed reader
                closed.add(fd)

        r = self.run_sync(spec, ExecRequest(list(argv), stdin=stdin, timeout=timeout, on_output=out))
        return Outcome(r.exit_code, signal=r.signal, timed_out=r.timed_out, oom=r.oom_killed)

    # -- pools ------------------------------------------------------------------------------------------
    async def start_pool(self, spec: SandboxSpec, size: int = 8, command: str = "sh") -> Any:
        """Start (or return) the pool serving one-shot runs of ``spec`` for ``command``'s module
        ('sh' for the shell and its built-ins, 'python3', 'micropython', or anything when the spec names a
        module). ``run()`` then takes its instances from the pool."""
        from ..wasm.pool import InstancePool

        plan = self._plan(spec, ExecRequest([command]), None)
        key = plan.key()
        pool = self._pools.get(key)
        if pool is None:
            pool = InstancePool(plan.loaded, size, memory_bytes=plan.memory_bytes, fs=plan.fs,
                                fuel=plan.fuel is not None, key=f"{spec.pool_key()}:{plan.kind}")
            self._pools[key] = pool
            self._plans.clear()  # plans remembered without this pool
            await pool.start()
        return pool

    def pools(self) -> list[Any]:
        return list(self._pools.values())

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        self._plans.clear()
        for p in pools:
            p.close()

    # -- named sandboxes ----------------------------------------------------------------------------------
    def _dir(self, ref: SandboxRef) -> str:
        d = ref.handle.get("dir")
        if not d:
            raise NotFound(f"wasm sandbox {ref.id} has no directory in its handle")
        return d

    @staticmethod
    def _meta(d: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(d, "meta.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _write_meta(d: str, meta: dict[str, Any]) -> None:
        tmp = os.path.join(d, f"meta.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(d, "meta.json"))

    async def create(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        from ..spec import validate_name

        validate_name(sandbox_id, "sandbox id")
        d = os.path.join(_sandboxes_dir(), sandbox_id)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            from ..errors import AlreadyExists

            raise AlreadyExists(f"wasm sandbox {sandbox_id} already exists") from None
        places = ["root", *(("tmp", "work") if spec.policy.read_only_root else ())]
        try:
            for place in places:
                _make_place(d, place, sandbox_id, spec.resources.disk_mb)
            os.makedirs(os.path.join(d, "root", spec.workdir.lstrip("/")), exist_ok=True)
        except BaseException:
            _remove_named(d, sandbox_id)
            raise
        meta = {"id": sandbox_id, "name": spec.name, "state": "created", "created": time.time(),
                "labels": owner_labels(sandbox_id, owner, spec.name), "spec": spec.to_dict()}
        self._write_meta(d, meta)
        return SandboxRef(self.name, sandbox_id, {"dir": d}, spec)

    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        return {"dir": os.path.join(_sandboxes_dir(), sandbox_id)}

    async def start(self, ref: SandboxRef) -> None:
        d = self._dir(ref)
        meta = self._meta(d)
        if meta is None:
            raise NotFound(f"wasm sandbox {ref.id} does not exist")
        meta["state"] = "running"
        self._write_meta(d, meta)

    async def stop(self, ref: SandboxRef) -> None:
        d = self._dir(ref)
        meta = self._meta(d)
        if meta is None:
            return
        meta["state"] = "stopped"
        self._write_meta(d, meta)

    async def remove(self, ref: SandboxRef) -> None:
        from ..wasm.runtime import scratch_base

        scratch = ref.handle.get("scratch")
        if scratch:
            capped = _capped_base()
            if _inside(scratch, scratch_base()) or (capped and _inside(scratch, capped)):
                from ..wasm.runtime import _remove_tree

                for d in (scratch, scratch + ".tmp", scratch + ".work"):
                    _remove_tree(d)
            return
        d = ref.handle.get("dir")
        if d and os.path.isdir(d) and _inside(d, _sandboxes_dir()):
            _remove_named(d, ref.id)

    async def status(self, ref: SandboxRef) -> str:
        d = ref.handle.get("dir")
        meta = self._meta(d) if d else None
        return meta.get("state", "created") if meta else "missing"

    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        d = self._dir(ref)
        st = await self.status(ref)
        if st != "running":
            raise InvalidState(f"wasm sandbox {ref.id} is {st}, not running")
        spec = ref.spec
        if self._opts(spec).get("mode") == "hyperlight":
            return await self._run_hyperlight(req)
        t0 = time.perf_counter()
        plan = self._plan(spec, req, os.path.join(d, "root"))
        res = await self._execute(plan, req, None)
        res.timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return res

    def _host_path(self, ref: SandboxRef, path: str) -> tuple[str, str]:
        from ..wasm.fs import guest_to_host

        d = self._dir(ref)
        spec = ref.spec
        opts = self._opts(spec)
        if not path.startswith("/"):
            path = spec.workdir.rstrip("/") + "/" + path
        preopens = _parse_preopens(opts["preopen"]) if opts.get("preopen") else ()
        if spec.policy.mount_cwd:
            preopens = (*preopens, (mount_source_of(spec), "/workspace", False))
        if spec.policy.read_only_root:
            preopens = (*preopens, (os.path.join(d, "tmp"), "/tmp", False))
            if spec.workdir != "/":
                preopens = (*preopens, (os.path.join(d, "work"), spec.workdir, False))
        return guest_to_host(os.path.join(d, "root"), preopens, path)

    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        from ..wasm import fs

        if await self.status(ref) == "missing":
            raise NotFound(f"wasm sandbox {ref.id} does not exist")
        blob = await _collect_stdin(data) if not isinstance(data, bytes | bytearray) else bytes(data)
        host_dir, rel = self._host_path(ref, path)
        return fs.write_file(host_dir, rel, blob, mode)

    async def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        from ..wasm import fs

        if await self.status(ref) == "missing":
            raise NotFound(f"wasm sandbox {ref.id} does not exist")
        host_dir, rel = self._host_path(ref, path)
        fd = fs.open_read(host_dir, rel)
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                yield chunk
        finally:
            os.close(fd)

    async def list(self) -> list[SandboxInfo]:
        from ..owner import boot_id

        infos: list[SandboxInfo] = []
        base = _sandboxes_dir()
        for sid in sorted(os.listdir(base)):
            d = os.path.join(base, sid)
            meta = self._meta(d)
            if meta is None:
                continue
            labels = dict(meta.get("labels") or {})
            infos.append(SandboxInfo(self.name, sid, labels.get(LABEL_NAME), meta.get("state", "created"),
                                     {"dir": d}, labels))
        # scratch directories of one-shot runs and pools, named ak-<pid>-...: reapable when the pid is dead
        import socket

        from ..wasm.runtime import scratch_base

        bases = [scratch_base()]
        if _capped_base():
            bases.append(_capped_base())
        for sb, name in ((b, n) for b in bases for n in os.listdir(b)):
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != "ak" or not parts[1].isdigit() or name.endswith((".tmp", ".work")):
                continue
            labels = {LABEL_MANAGED: "true", LABEL_ID: f"scratch-{name}", LABEL_OWNER_PID: parts[1],
                      LABEL_OWNER_HOST: socket.gethostname(), LABEL_OWNER_BOOT: boot_id()}
            infos.append(SandboxInfo(self.name, f"scratch-{name}", None, "created",
                                     {"scratch": os.path.join(sb, name)}, labels))
        return infos
