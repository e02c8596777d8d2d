"""The benchmark harness: configuration, the run context, timing of new processes, interleaving,
measurements and ratios, the bench's own daemon, and the progress display.

Timing rules (docs/benchmark-method.md):
- a user-visible latency is a **new process per run**: ``perf_counter`` around ``Popen`` ..
  ``communicate``; the run counts only when it exits 0 and its stdout is exactly what a user expects
  (``hello\\n``); anything else is a failure with its reason, never a latency;
- warm-up runs are taken first and kept apart from the measured ones;
- commands compared with each other are **interleaved** (round-robin A B C, B C A, ...) so machine noise
  hits all of them alike; per-run samples are kept in the JSON, not only aggregates;
- ratios are ours / raw, both medians.

The bench never touches a user's agentkernel state: it runs with its own ``AGENTKERNEL_HOME`` and
``AGENTKERNEL_RUNTIME_DIR`` (a fresh temp dir), so its daemon socket is its own, and every subprocess
runs in an empty working directory (no stray ``agentkernel.toml``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import stats

HELLO = b"hello\n"
BENCH_LABEL = "agentkernel.bench-run"
RUN_TIMEOUT_S = 120.0

ALL_SUITES = ("headline", "phases", "baselines", "inproc", "daemon", "throughput", "concurrency", "stress", "lifecycle",
              "wasm", "orchestration", "egress", "speed", "soak", "live")
# a full run without --suite: everything but the soak (an hour by default: ask for it with --suite soak) and
# live (N live sandboxes per backend; the speed suite measures it on the default backend)
DEFAULT_SUITES = tuple(s for s in ALL_SUITES if s not in ("soak", "live"))


# ---- configuration ------------------------------------------------------------------------------------


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise SystemExit(f"agentkernel bench: {name} must be an integer, got {v!r}") from None
    if n < 1:
        raise SystemExit(f"agentkernel bench: {name} must be at least 1, got {n}")
    return n


class BenchConfig:
    """Every knob of a run. Precedence: command-line flag > environment variable > --quick > default."""

    def __init__(self, *, backends: Sequence[str] | None = None, suites: Sequence[str] | None = None,
                 iterations: int | None = None, warmup: int | None = None, quick: bool = False,
                 out_dir: str = "benchmark-results", charts: bool = True, docs_dir: str | None = None,
                 stress_count: int | None = None, stress_concurrency: int | None = None,
                 bench_sandboxes: int | None = None, bench_iterations: int | None = None,
                 bench_max_concurrent: int | None = None, runs_total: int | None = None,
                 runs_concurrency: int | None = None, concurrent_n: int | None = None,
                 scale_counts: Sequence[int] | None = None, exec_calls: int | None = None,
                 single_iterations: int | None = None, settle_s: float = 10.0, progress: bool = True) -> None:
        from ..backends import REGISTRY, canonical

        self.quick = quick
        self.backends = [canonical(b) for b in (backends or list(REGISTRY))]
        self.backends_named = bool(backends)  # --backends given: suites that default to one backend take these
        bad = [b for b in self.backends if b not in REGISTRY]
        if bad:
            raise SystemExit(f"agentkernel bench: unknown backend(s) {', '.join(bad)} (known: {', '.join(REGISTRY)})")
        self.suites = list(suites or DEFAULT_SUITES)
        bad = [s for s in self.suites if s not in ALL_SUITES]
        if bad:
            raise SystemExit(f"agentkernel bench: unknown suite(s) {', '.join(bad)} (known: {', '.join(ALL_SUITES)})")

        def pick(flag, env, quick_v, full_v):
            if flag is not None:
                return flag
            e = _env_int(env) if env else None
            if e is not None:
                return e
            return quick_v if quick else full_v

        self.iterations = pick(iterations, None, 3, 20)
        self.warmup = pick(warmup, None, 1, 3)
        # the reference's stress test (tests/stress_test.rs) and benchmark test (tests/benchmark_test.rs)
        self.stress_count = pick(stress_count, "STRESS_VM_COUNT", 4, 10)
        self.stress_concurrency = pick(stress_concurrency, "STRESS_MAX_CONCURRENT", 4, 50)
        self.bench_sandboxes = pick(bench_sandboxes, "BENCH_SANDBOXES", 2, 10)
        self.bench_iterations = pick(bench_iterations, "BENCH_ITERATIONS", 2, 10)
        self.bench_max_concurrent = pick(bench_max_concurrent, "BENCH_MAX_CONCURRENT", 50, 50)
        # scripts/stress-test.sh TOTAL CONCURRENCY (100 commands, 10 concurrent)
        self.runs_total = pick(runs_total, None, 10, 100)
        self.runs_concurrency = pick(runs_concurrency, None, 5, 10)
        self.concurrent_n = pick(concurrent_n, None, 10, 100)
        self.scale_counts = list(scale_counts or ((2, 4) if quick else (5, 10, 20)))
        self.exec_calls = pick(exec_calls, None, 5, 50)
        self.single_iterations = pick(single_iterations, None, 2, 5)
        self.out_dir = out_dir
        self.charts = charts
        self.docs_dir = docs_dir
        self.settle_s = settle_s
        self.progress = progress

    def to_dict(self) -> dict[str, Any]:
        return {
            "backends": self.backends, "suites": self.suites, "iterations": self.iterations,
            "warmup": self.warmup, "quick": self.quick, "stress_vm_count": self.stress_count,
            "stress_max_concurrent": self.stress_concurrency, "bench_sandboxes": self.bench_sandboxes,
            "bench_iterations": self.bench_iterations, "bench_max_concurrent": self.bench_max_concurrent,
            "runs_total": self.runs_total, "runs_concurrency": self.runs_concurrency,
            "concurrent_n": self.concurrent_n, "scale_counts": self.scale_counts, "exec_calls": self.exec_calls,
            "single_iterations": self.single_iterations, "settle_s": self.settle_s,
        }


# ---- progress -----------------------------------------------------------------------------------------


class Progress:
    """rich's progress bar on a TTY (stderr), plain lines otherwise. ``stage`` returns a handle with
    ``advance()``; a stage closes by itself when it reaches its total."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._rich = None
        self._lock = threading.Lock()
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

                self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True), transient=False)
                self._rich.start()
            except ImportError:
                self._rich = None

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False)
        else:
            with self._lock:
                sys.stderr.write(f"[bench] {msg}\n")
                sys.stderr.flush()

    def stage(self, title: str, total: int) -> _Stage:
        return _Stage(self, title, max(1, total))

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


class _Stage:
    def __init__(self, progress: Progress, title: str, total: int) -> None:
        self.p, self.title, self.total, self.done = progress, title, total, 0
        self._t0 = time.monotonic()
        self._last_print = time.monotonic()
        self._task = None
        if progress.enabled and progress._rich is not None:
            self._task = progress._rich.add_task(title, total=total)
        elif progress.enabled:
            progress.note(f"{title}: started ({total} steps)")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.p.enabled:
            return
        if self._task is not None and self.p._rich is not None:
            self.p._rich.update(self._task, completed=min(self.done, self.total))
            return
        now = time.monotonic()
        if self.done >= self.total:
            self.p.note(f"{self.title}: done {self.done}/{self.total} in {now - self._t0:.1f} s")
        elif now - self._last_print > 5:
            self._last_print = now
            self.p.note(f"{self.title}: {self.done}/{self.total}")

    def finish(self) -> None:
        if self.done < self.total:
            self.advance(self.total - self.done)


# ---- samples and commands -----------------------------------------------------------------------------


class Sample:
    __slots__ = ("error", "ms", "ok")

    def __init__(self, ok: bool, ms: float | None, error: str | None = None) -> None:
        self.ok, self.ms, self.error = ok, ms, error

    def __repr__(self) -> str:
        return f"Sample(ok={self.ok}, ms={self.ms}, error={self.error!r})"


class Cmd:
    """One command to time as a new process. ``before`` runs (untimed) before every sample, e.g. to wait
    until the daemon's pool is full; ``check(stdout) -> bool`` replaces the exact-output check.
    ``call() -> Sample`` instead times something in this process (interleaved like the commands)."""

    def __init__(self, name: str, argv: list[str], *, label: str, backend: str, mode: str,
                 image: str | None = None, expect: bytes = HELLO, check: Callable[[bytes], bool] | None = None,
                 before: Callable[[], None] | None = None, env: dict[str, str] | None = None,
                 argv_fn: Callable[[], list[str]] | None = None, call: Callable[[], Sample] | None = None) -> None:
        self.name, self.argv, self.label, self.backend, self.mode = name, list(argv), label, backend, mode
        self.image, self.expect, self.check, self.before, self.env = image, expect, check, before, env
        self.argv_fn = argv_fn  # a fresh argv per run (e.g. a unique container id), else ``argv``
        self.call = call

    def next_argv(self) -> list[str]:
        return self.argv_fn() if self.argv_fn is not None else self.argv


# ---- the context --------------------------------------------------------------------------------------


class BenchContext:
    """Everything a suite needs: config, isolated agentkernel dirs, the environment for children, the
    doctor's verdicts, the results document, the leak-check scope."""

    def __init__(self, cfg: BenchConfig) -> None:
        from . import machine

        self.cfg = cfg
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()
        self.t0 = time.time()
        # short: agent sockets live under it and AF_UNIX paths are limited to 107 bytes
        self.tmp = tempfile.mkdtemp(prefix="akb-")
        self.home = os.path.join(self.tmp, "home")
        self.runtime_dir = os.path.join(self.tmp, "run")
        self.workdir = os.path.join(self.tmp, "work")
        for d in (self.home, self.runtime_dir, self.workdir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._saved_env = {k: os.environ.get(k) for k in ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR",
                                                          "AGENTKERNEL_LABELS",
                                                          "AGENTKERNEL_NO_DAEMON", "AGENTKERNEL_DAEMON_SOCKET",
                                                          "AGENTKERNEL_STORE", "AGENTKERNEL_AUDIT_LOG")}
        # this process too: in-process suites (phases, scale) and the daemon client use the same dirs
        os.environ["AGENTKERNEL_HOME"] = self.home
        os.environ["AGENTKERNEL_RUNTIME_DIR"] = self.runtime_dir
        for k in ("AGENTKERNEL_NO_DAEMON", "AGENTKERNEL_DAEMON_SOCKET", "AGENTKERNEL_STORE", "AGENTKERNEL_AUDIT_LOG"):
            os.environ.pop(k, None)
        # every resource we and our children create carries this label: the leak check tells ours from anyone's
        self.label = f"{BENCH_LABEL}={self.run_id}"
        labels = [x for x in (os.environ.get("AGENTKERNEL_LABELS") or "").split(",")
                  if x and not x.startswith(BENCH_LABEL)]
        os.environ["AGENTKERNEL_LABELS"] = ",".join([*labels, self.label])
        self.env = dict(os.environ)
        self.cli = _cli_argv()
        self.progress = Progress(cfg.progress)
        self.spawned: set[int] = {os.getpid()}
        self.spawn_starts: dict[int, int] = {}  # pid -> start time: a reused pid is not ours
        self._lock = threading.Lock()
        self._doctor: dict[str, dict] | None = None
        self._specs: dict[str, Any] = {}
        self.doc: dict[str, Any] = {
            "schema": "agentkernel-bench",
            "schema_version": 0,  # set by schema.finalize
            "run_id": self.run_id,
            "date": machine.now_iso(),
            "duration_s": None,
            "machine": machine.machine_info(),
            "versions": machine.versions(),
            "git": machine.git_info(),
            "config": {**cfg.to_dict(), "cli": self.cli, "env": {k: os.environ.get(k) for k in (
                "STRESS_VM_COUNT", "STRESS_MAX_CONCURRENT", "BENCH_SANDBOXES", "BENCH_ITERATIONS",
                "BENCH_MAX_CONCURRENT") if os.environ.get(k) is not None}},
            "backends": {},
            "measurements": [],
            "ratios": [],
            "results": {},
            "leak_checks": [],
            "errors": [],
        }

    # -- lifecycle --
    def close(self) -> None:
        self.progress.close()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- backends --
    def doctor(self) -> dict[str, dict]:
        if self._doctor is None:
            from ..commands.doctor import probe_all

            self._doctor = {r["backend"]: r for r in probe_all()}
            for name in self.cfg.backends:
                row = self._doctor.get(name) or {"available": False, "reason": "unknown backend"}
                entry = {"available": bool(row.get("available")), "reason": row.get("reason"),
                         "isolation": row.get("isolation") or _isolation_of(name), "image": None}
                if entry["available"]:
                    try:
                        entry["image"] = self.spec_for(name).image
                    except Exception as exc:  # no image: the backend cannot be measured here
                        entry["available"], entry["reason"] = False, f"no image: {exc}"
                self.doc["backends"][name] = entry
        return self._doctor

    def available(self, backend: str) -> tuple[bool, str | None]:
        self.doctor()
        e = self.doc["backends"].get(backend) or {}
        return bool(e.get("available")), e.get("reason")

    def selected(self) -> list[str]:
        self.doctor()
        return list(self.cfg.backends)

    def features(self, backend: str) -> frozenset[str]:
        try:
            from ..backends import get_backend_class

            return get_backend_class(backend).capabilities.features
        except Exception:
            return frozenset()

    def spec_for(self, backend: str):
        """The spec ``agentkernel run --backend B -- echo hello`` resolves to (defaults, no config file)."""
        s = self._specs.get(backend)
        if s is None:
            from .. import config
            from ..imagesel import choose_image

            s = config.resolve_spec({"backend": backend}, config={})
            s = s.replace(image=choose_image(backend, ["echo", "hello"]))
            self._specs[backend] = s
        return s

    def image(self, backend: str) -> str | None:
        return (self.doc["backends"].get(backend) or {}).get("image")

    # -- running things --
    def track(self, pid: int) -> None:
        from ..owner import process_start_time

        start = process_start_time(pid)
        with self._lock:
            self.spawned.add(pid)
            if start is not None:
                self.spawn_starts[pid] = start

    def time_command(self, argv: list[str], *, expect: bytes = HELLO, check: Callable[[bytes], bool] | None = None,
                     env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S) -> Sample:
        """One new process, timed from spawn to exit; ok only with exit 0 and the expected stdout."""
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env or self.env, cwd=self.workdir)
        except OSError as exc:
            return Sample(False, None, f"cannot start {argv[0]}: {exc}")
        self.track(p.pid)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return Sample(False, (time.perf_counter() - t0) * 1e3, f"timed out after {timeout:g} s")
        ms = (time.perf_counter() - t0) * 1e3
        if p.returncode != 0:
            return Sample(False, ms, f"exit {p.returncode}: {_tail(err or out)}")
        good = check(out) if check is not None else out == expect
        if not good:
            return Sample(False, ms, f"unexpected output {out[:120]!r} (stderr {_tail(err)})")
        return Sample(True, ms)

    def run_quiet(self, argv: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A helper command (set-up / tear-down), not timed."""
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.env, cwd=self.workdir)
        self.track(p.pid)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return subprocess.CompletedProcess(argv, 124, out, err + b"\n(timed out)")
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def ak(self, *args: str) -> list[str]:
        return [*self.cli, *args]

    def interleave(self, cmds: Sequence[Cmd], iterations: int, warmup: int, title: str
                   ) -> dict[str, tuple[list[Sample], list[Sample]]]:
        """Round-robin: in round r the order is rotated by r, so no command always follows the same one.
        Returns name -> (measured samples, warm-up samples)."""
        out: dict[str, tuple[list[Sample], list[Sample]]] = {c.name: ([], []) for c in cmds}
        st = self.progress.stage(title, (iterations + warmup) * len(cmds))
        n = len(cmds)
        for r in range(warmup + iterations):
            for i in range(n):
                c = cmds[(i + r) % n]
                if c.before is not None:
                    c.before()
                s = c.call() if c.call is not None else self.time_command(c.next_argv(), expect=c.expect,
                                                                          check=c.check, env=c.env)
                out[c.name][1 if r < warmup else 0].append(s)
                st.advance()
        st.finish()
        return out

    # -- results --
    def add_measurement(self, *, suite: str, backend: str, name: str, label: str, mode: str,
                        samples: Sequence[Sample] = (), warmup: Sequence[Sample] = (), kind: str = "latency",
                        command: list[str] | None = None, image: str | None = None,
                        extra: dict[str, Any] | None = None, samples_ms: Sequence[float] | None = None,
                        available: bool = True, reason: str | None = None) -> dict[str, Any]:
        """Record one measurement. Either ``samples`` (Sample objects: failures counted, not timed) or
        ``samples_ms`` (plain successful millisecond values)."""
        if samples_ms is not None:
            ok_ms = [float(x) for x in samples_ms]
            attempts, errors = len(ok_ms), []
        else:
            ok_ms = [s.ms for s in samples if s.ok and s.ms is not None]
            attempts = len(samples)
            errors = _unique([s.error for s in samples if not s.ok and s.error])[:5]
        m = {
            "id": f"{suite}/{backend}/{name}",
            "suite": suite,
            "backend": backend,
            "name": name,
            "label": label,
            "mode": mode,
            "kind": kind,
            "image": image,
            "command": command,
            "available": available,
            "reason": reason,
            "unit": "ms",
            "samples_ms": [round(x, 6) for x in ok_ms],
            "attempts": attempts,
            "failures": attempts - len(ok_ms),
            "success_rate": stats.success_rate(len(ok_ms), attempts),
            "errors": errors,
            "stats": stats.summarize(ok_ms),
            "first_ms": round(warmup[0].ms, 6) if warmup and warmup[0].ms is not None else None,
            "warmup_ms": [round(s.ms, 6) for s in warmup if s.ms is not None],
            "extra": extra or {},
        }
        with self._lock:
            self.doc["measurements"] = [x for x in self.doc["measurements"] if x["id"] != m["id"]] + [m]
        return m

    def add_unavailable(self, *, suite: str, backend: str, name: str, label: str, mode: str,
                        reason: str | None) -> dict[str, Any]:
        return self.add_measurement(suite=suite, backend=backend, name=name, label=label, mode=mode,
                                    available=False, reason=reason or "unavailable")

    def add_cmd_results(self, suite: str, cmds: Sequence[Cmd], res: dict[str, tuple[list[Sample], list[Sample]]],
                        extra: dict[str, dict] | None = None) -> dict[str, dict]:
        out = {}
        for c in cmds:
            measured, warm = res[c.name]
            out[c.name] = self.add_measurement(suite=suite, backend=c.backend, name=c.name, label=c.label,
                                               mode=c.mode, samples=measured, warmup=warm, command=c.argv,
                                               image=c.image, extra=(extra or {}).get(c.name))
        return out

    def measurement(self, mid: str) -> dict[str, Any] | None:
        for m in self.doc["measurements"]:
            if m["id"] == mid:
                return m
        return None

    def add_ratio(self, *, suite: str, backend: str, ours: str, raw: str, label: str) -> dict[str, Any] | None:
        a, b = self.measurement(ours), self.measurement(raw)
        if a is None or b is None:
            return None
        pa, pb = a["stats"]["p50_ms"], b["stats"]["p50_ms"]
        r = stats.ratio(pa, pb)
        row = {"id": f"{ours}~{raw}", "suite": suite, "backend": backend, "ours": ours, "raw": raw, "label": label,
               "ours_p50_ms": pa, "raw_p50_ms": pb, "ratio": r,
               "speedup": round(1 / r, 4) if r else None,
               "available": bool(a["available"] and b["available"] and r is not None),
               "reason": None if r is not None else (a.get("reason") or b.get("reason") or "no successful samples")}
        with self._lock:
            self.doc["ratios"] = [x for x in self.doc["ratios"] if x["id"] != row["id"]] + [row]
        return row

    def set_result(self, suite: str, key: str, value: Any) -> None:
        with self._lock:
            self.doc["results"].setdefault(suite, {})[key] = value

    def error(self, suite: str, backend: str | None, message: str) -> None:
        with self._lock:
            self.doc["errors"].append({"suite": suite, "backend": backend, "message": message})
        self.progress.note(f"error in {suite}{'/' + backend if backend else ''}: {message}")


def _isolation_of(backend: str) -> str | None:
    try:
        from ..backends import get_backend_class

        return get_backend_class(backend).capabilities.isolation
    except Exception:
        return None


def _tail(b: bytes, n: int = 300) -> str:
    s = (b or b"").decode("utf-8", "replace").strip()
    return s[-n:] if s else "(no output)"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _cli_argv() -> list[str]:
    """The installed console script next to this interpreter (what a user runs); when that launcher runs
    another checkout (a worktree sharing the virtualenv), its form (``python -S``, the same sys.path) for
    this one, so that two checkouts are timed alike; else ``python -m``."""
    cand = os.path.join(os.path.dirname(sys.executable), "agentkernel")
    if os.path.isfile(cand) and os.access(cand, os.X_OK):
        if _runs_this_checkout(cand):
            return [cand]
        from .sustained import launcher_argv

        return launcher_argv()
    found = shutil.which("agentkernel")
    if found and _runs_this_checkout(found):
        return [found]
    return [sys.executable, "-m", "agentkernel"]


def _runs_this_checkout(launcher: str) -> bool:
    """A launcher written by scripts/setup.sh pins one checkout on sys.path; another worktree's bench
    must not time that checkout's code (a shared virtualenv)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        with open(launcher, "rb") as f:
            head = f.read(4096).decode(errors="replace")
    except OSError:
        return False
    if "sys.path" not in head:
        return True
    return f'"{here}"' in head or f"'{here}'" in head


# ---- the bench's own daemon ---------------------------------------------------------------------------


class BenchDaemon:
    """``agentkernel daemon start --warm BACKEND`` in the bench's runtime dir (never the user's)."""

    def __init__(self, ctx: BenchContext, backends: Sequence[str], pool_min: int = 2, pool_max: int = 4) -> None:
        self.ctx, self.backends, self.pool_min, self.pool_max = ctx, list(backends), pool_min, pool_max
        self.started = False
        self.exited: bool | None = None
        self.stop_s: float | None = None
        self.start_ms: float | None = None
        self.ready_ms: float | None = None
        self.pid: int | None = None

    def start(self) -> None:
        args = ["daemon", "start", "--pool-min", str(self.pool_min), "--pool-max", str(self.pool_max)]
        for b in self.backends:
            args += ["--warm", b]
        t0 = time.perf_counter()
        r = self.ctx.run_quiet(self.ctx.ak(*args), timeout=120)
        self.start_ms = (time.perf_counter() - t0) * 1e3
        if r.returncode != 0:
            raise RuntimeError(f"daemon start failed: {_tail(r.stderr or r.stdout)}")
        self.started = True
        st = self.status()
        if st is None:
            raise RuntimeError("the daemon started but does not answer status requests")
        self.pid = st.get("pid")
        if self.pid:
            self.ctx.track(int(self.pid))
        if not self.wait_ready(timeout=90):
            self.ctx.progress.note(f"daemon for {', '.join(self.backends)}: pool not full after 90 s; measuring anyway")
        self.ready_ms = (time.perf_counter() - t0) * 1e3

    def status(self) -> dict | None:
        """The daemon's status, or None when it does not answer (or speaks another protocol version)."""
        from ..commands import daemon_client

        try:
            st = daemon_client.request("status")
        except Exception:
            return None
        if not isinstance(st, dict) or st.get("incompatible") or "pools" not in st:
            return None
        return st

    def pools(self, backend: str | None = None) -> list[dict]:
        st = self.status() or {}
        return [p for p in st.get("pools", []) if backend is None or p.get("backend") == backend]

    def wait_ready(self, backend: str | None = None, timeout: float = 60) -> bool:
        """Until every pool (of ``backend``) holds its minimum of ready members and nothing is starting,
        in use or being destroyed: the daemon is warm and idle. Not timed; False on timeout, or at once
        when the daemon stops answering."""
        deadline = time.monotonic() + timeout
        silent = 0
        while time.monotonic() < deadline:
            st = self.status()
            if st is None:
                silent += 1
                if silent >= 5:
                    return False
            else:
                silent = 0
                pools = [p for p in st.get("pools", []) if backend is None or p.get("backend") == backend]
                if pools and all(pool_idle(p) for p in pools):
                    return True
            time.sleep(0.02)
        return False

    def metrics(self, backend: str) -> dict[str, int]:
        """Summed pool counters (hits, misses, cold_starts) for a backend."""
        tot = {"hits": 0, "misses": 0, "cold_starts": 0}
        for p in self.pools(backend):
            m = p.get("metrics") or {}
            for k in tot:
                tot[k] += int(m.get(k) or 0)
        return tot

    def stop(self, settle: bool = False) -> None:
        """``daemon stop``. ``settle``: first wait until the last run's member is destroyed and the pool is
        idle (the measuring suites do, so a stop never cuts a clean-up short; the stress, lifecycle and
        throughput suites stop right after their last run, as a user would)."""
        if not self.started:
            return
        if settle:
            self.wait_ready(timeout=30)
        t0 = time.monotonic()
        self.ctx.run_quiet(self.ctx.ak("daemon", "stop"), timeout=120)
        self.started = False
        # the pool members are destroyed by the daemon's shutdown; wait for its process to be gone (a
        # daemon holding hundreds of members on a loaded machine takes minutes: the leak check must not
        # start while it is still removing them)
        if self.pid:
            deadline = time.monotonic() + min(900, 30 + 2 * self.pool_max * len(self.backends))
            while time.monotonic() < deadline and os.path.exists(f"/proc/{self.pid}"):
                time.sleep(0.05)
            self.exited = not os.path.exists(f"/proc/{self.pid}")
        self.stop_s = round(time.monotonic() - t0, 3)

    def __enter__(self) -> BenchDaemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def pool_idle(p: dict[str, Any]) -> bool:
    """A pool (daemon status shape) is full and idle: its minimum of members ready, nothing starting or
    in use, and no member still being destroyed in the background."""
    cfg = p.get("config") or {}
    want = cfg.get("min", cfg.get("size", 1)) or 0
    if p.get("ready", 0) < want or p.get("starting", 0) or p.get("in_use", 0):
        return False
    m = p.get("metrics") or {}
    destroying = ("started" in m and "destroyed" in m and "min" in cfg
                  and not str(m.get("last_error") or "").startswith("destroy")
                  and m["started"] - m["destroyed"] > p.get("ready", 0) + p.get("in_use", 0))
    return not destroying


def write_json(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
