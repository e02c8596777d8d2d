"""Speed under sustained load (issue 18's measures), each next to the interpreter floor measured in the
same run so ratios survive a noisy machine:

- ``back_to_back``: N ``agentkernel run -- echo hello`` processes one after another (a script's or an
  agent loop's pattern) through the running daemon: runs/s and the pool's hit rate over exactly those runs;
- ``paced``: the same with a pause between runs (every run a warm hit): median ms;
- ``cold``: ``run --no-daemon -B BACKEND`` (new process, no daemon): median ms;
- ``live``: a daemon holding COUNT live pooled sandboxes: daemon RSS and fds, PSS per idle member;
- ``soak``: DURATION seconds of mixed load at C concurrent (runs over one multiplexed daemon connection,
  exec and file copy in one named sandbox): success rate, p50/p95/p99, a time series (one sample a
  second, at most ~600) of throughput, latency, pool hit rate, daemon RSS/fds and machine load, each one's
  trend (first vs last tenth), daemon and client RSS/fds before/after (the suite adds the leak check).

Standard library + the package; every function takes the CLI argv prefix and returns plain dicts.
"""

from __future__ import annotations

import asyncio
import collections
import os
import statistics
import subprocess
import time
from typing import Any

HELLO = b"hello\n"
FLOOR = ["-S", "-I", "-c", "pass"]


def launcher_argv() -> list[str]:
    """The CLI exactly as the installed launcher starts it (``python -S``, two sys.path entries), but for
    the agentkernel package that is running this code (a worktree's launcher may point elsewhere)."""
    import sys
    import sysconfig

    import agentkernel

    repo = os.path.dirname(os.path.dirname(os.path.abspath(agentkernel.__file__)))
    site = sysconfig.get_paths()["purelib"]
    return [sys.executable, "-S", "-c", f"import sys; sys.path[0] = {repo!r}; sys.path.append({site!r}); "
            "from agentkernel.cli import entry; entry()"]


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "median_ms": _pct(xs, 50), "p95_ms": _pct(xs, 95), "p99_ms": _pct(xs, 99),
            "mean_ms": round(statistics.fmean(xs), 3) if xs else None, "min_ms": min(xs) if xs else None}


def _time(argv: list[str], env: dict | None = None, expect: bytes | None = HELLO) -> tuple[bool, float]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120)
    ms = (time.perf_counter() - t0) * 1e3
    return r.returncode == 0 and (expect is None or r.stdout == expect), ms


def floor(python: str, n: int) -> dict[str, Any]:
    return summary([_time([python, *FLOOR], expect=b"")[1] for _ in range(n)])


def _pool_counts(status: dict | None, backend: str | None = None) -> tuple[int, int]:
    hits = misses = 0
    for p in (status or {}).get("pools", []):
        if backend is None or p.get("backend") == backend:
            m = p.get("metrics") or {}
            hits += m.get("hits") or 0
            misses += m.get("misses") or 0
    return hits, misses


def daemon_status() -> dict | None:
    from ..commands import daemon_client

    try:
        st = daemon_client.request("status")
    except Exception:
        return None
    return st if isinstance(st, dict) and "pools" in st else None


def back_to_back(cli: list[str], n: int, *, python: str, env: dict | None = None) -> dict[str, Any]:
    """``n`` back-to-back warm runs; the interpreter floor interleaved every 10 runs (same load)."""
    argv = [*cli, "run", "--", "echo", "hello"]
    h0, m0 = _pool_counts(daemon_status())
    lat, fl, fails = [], [], 0
    t0 = time.perf_counter()
    for _ in range(n):
        ok, ms = _time(argv, env)
        lat.append(ms)
        fails += not ok
    wall = time.perf_counter() - t0
    for _ in range(max(3, n // 10)):
        fl.append(_time([python, *FLOOR], expect=b"")[1])
    st = daemon_status()
    h1, m1 = _pool_counts(st)
    hits, misses = h1 - h0, m1 - m0
    return {"runs": n, "failures": fails, "seconds": round(wall, 3), "runs_per_s": round(n / wall, 2),
            "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None, "hits": hits, "misses": misses,
            "latency": summary(lat), "floor": summary(fl), "pools": pool_view(st)}


def pool_view(st: dict | None) -> list[dict[str, Any]]:
    """What the pools said about themselves (demand, start time, capacity, keeping up or why not)."""
    keys = ("demand_per_s", "refill_per_s", "start_ms_avg", "capacity_per_s", "recent_hit_rate", "target_ready",
            "start_concurrency", "keeping_up", "cannot_keep_up", "hit_rate")
    return [{"backend": p.get("backend"), **{k: (p.get("metrics") or {}).get(k) for k in keys}}
            for p in (st or {}).get("pools", []) if "metrics" in p]


def paced(cli: list[str], n: int, *, python: str, pause_s: float = 0.5, env: dict | None = None) -> dict[str, Any]:
    """Warm runs with a pause between them (the pool refilled), each followed by one floor sample."""
    argv = [*cli, "run", "--", "echo", "hello"]
    lat, fl, fails = [], [], 0
    for _ in range(n):
        time.sleep(pause_s)
        ok, ms = _time(argv, env)
        lat.append(ms)
        fails += not ok
        fl.append(_time([python, *FLOOR], expect=b"")[1])
    out = {"runs": n, "failures": fails, "latency": summary(lat), "floor": summary(fl)}
    if out["latency"]["median_ms"] and out["floor"]["median_ms"]:
        out["x_floor"] = round(out["latency"]["median_ms"] / out["floor"]["median_ms"], 2)
    return out


def cold(cli: list[str], backend: str, n: int, *, python: str, env: dict | None = None) -> dict[str, Any]:
    argv = [*cli, "run", "--no-daemon", "-B", backend, "--", "echo", "hello"]
    lat, fl, fails = [], [], 0
    for _ in range(n):
        ok, ms = _time(argv, env)
        lat.append(ms)
        fails += not ok
        fl.append(_time([python, *FLOOR], expect=b"")[1])
    return {"backend": backend, "runs": n, "failures": fails, "latency": summary(lat), "floor": summary(fl)}


# ---- the daemon process -------------------------------------------------------------------------------


def proc_usage(pid: int) -> dict[str, Any]:
    """RSS, PSS (KiB), open fds and threads of one process."""
    out: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "Threads"):
                    out[k.lower()] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        out["pss_kib"] = _pss(pid)
    except OSError as exc:
        out["error"] = str(exc)
    return out


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose raw command line (NUL-separated argv) contains ``marker``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def member_chain(agent: int, stop: set[int]) -> list[int]:
    """The processes one pooled container costs: its agent and the agent's ancestors up to (not including)
    pid 1, a pid in ``stop`` (the daemon, this process) or a process shared by other members (podman's
    conmon and docker's shim are per container and counted; crun exits after start)."""
    chain, pid = [agent], _ppid(agent)
    while pid and pid > 1 and pid not in stop and pid not in chain:
        chain.append(pid)
        pid = _ppid(pid)
    return chain


def cgroup_memory_bytes(pid: int) -> int | None:
    """The memory charged to ``pid``'s cgroup (v1 ``memory.usage_in_bytes`` or v2 ``memory.current``):
    unlike PSS it includes the page cache and kernel memory the container caused."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = [ln.strip().split(":", 2) for ln in f if ln.strip()]
    except OSError:
        return None
    for _hid, ctrls, path in lines:
        if "memory" in ctrls.split(","):
            return _read_int(f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
    for hid, ctrls, path in lines:
        if hid == "0" and ctrls == "":
            return _read_int(f"/sys/fs/cgroup{path}/memory.current")
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _mib(kib_or_none: float | None, div: float = 1024) -> float | None:
    return None if kib_or_none is None else round(kib_or_none / div, 3)


def mounts_from(pid: int, root: str) -> bool:
    """Does ``pid`` see a bind mount of something under ``root`` (a member's run dir: its agent socket)?"""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(len(p) > 3 and p[3].startswith(root) for p in (ln.split() for ln in f))
    except OSError:
        return False


def live(count: int, wait_s: float = 300.0, *, backend: str | None = None,
         runtime_dir: str | None = None) -> dict[str, Any]:
    """The running daemon (its pools already asked to hold ``count`` members): wait until they are ready,
    then its RSS/fds and, per pooled member, the PSS of the member's processes (its agent ``ak-agent
    serve`` and the engine's per-container processes above it) and the memory charged to its cgroup.
    ``runtime_dir``: count only the agents whose run dir is under it (the daemon's own members, not other
    sandboxes on a shared machine)."""
    deadline = time.monotonic() + wait_s
    t0 = time.monotonic()
    st = daemon_status()
    while time.monotonic() < deadline:
        st = daemon_status()
        if st and sum(p.get("ready", 0) for p in st["pools"]) >= count:
            break
        time.sleep(1.0)
    fill_s = round(time.monotonic() - t0, 1)
    pools = [p for p in (st or {}).get("pools", []) if backend is None or p.get("backend") == backend]
    ready = sum(p.get("ready", 0) for p in pools)
    pid = (st or {}).get("pid")
    stop = {os.getpid(), *([pid] if pid else [])}
    agents = processes_with("ak-agent\x00serve")
    if runtime_dir:
        root = os.path.realpath(runtime_dir).rstrip("/") + "/"
        agents = [a for a in agents if mounts_from(a, root)]
    agent_pss, chain_pss, cg, extra = [], [], [], collections.Counter()
    for a in agents:
        chain = member_chain(a, stop)
        pss = [_pss(x) for x in chain]
        if pss[0] is None:
            continue
        agent_pss.append(pss[0])
        chain_pss.append(sum(x or 0 for x in pss))
        for x in chain[1:]:
            extra[_comm(x)] += 1
        m = cgroup_memory_bytes(a)
        if m is not None:
            cg.append(m)

    def per(xs: list[int], div: float) -> float | None:
        return round(sum(xs) / div / len(xs), 3) if xs else None

    return {"asked": count, "ready": ready, "fill_s": fill_s, "daemon": proc_usage(pid) if pid else None,
            "agents": len(agents), "agent_pss_kib_total": sum(agent_pss),
            "pss_mib_per_member": per(chain_pss, 1024), "agent_pss_mib_per_member": per(agent_pss, 1024),
            "cgroup_mib_per_member": per(cg, 1024 * 1024), "cgroups_read": len(cg),
            "engine_processes": dict(extra),
            "note": "PSS per member = its agent plus the engine's per-container processes above it (e.g. "
                    "conmon); cgroup memory = what the kernel charges the container (page cache, kernel "
                    "memory) and is not in PSS"}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# ---- soak ---------------------------------------------------------------------------------------------


def soak_bucket_s(duration_s: float) -> float:
    """Series resolution: one sample a second, at most ~600 samples (an hour: one per 6 s)."""
    return max(1.0, round(duration_s / 600, 1))


def soak(spec, duration_s: float, concurrency: int = 10, *, exec_share: float = 0.2, cp_share: float = 0.1,
         bucket_s: float | None = None) -> dict[str, Any]:
    """Mixed sustained load for ``duration_s``: each of ``concurrency`` workers loops over run (one shared
    multiplexed daemon connection), exec and cp (write + read back) in one named sandbox of ``spec``."""
    b = bucket_s or soak_bucket_s(duration_s)
    return asyncio.run(_soak(spec, duration_s, concurrency, exec_share, cp_share, b))


def _load1() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def trend(series: list[dict[str, Any]], key: str, share: float = 0.1) -> dict[str, Any] | None:
    """Is ``key`` flat over the series: the median of its first and last ``share`` of samples, the growth
    between them (absolute and per hour) and the range."""
    xs = [(x["t"], x[key]) for x in series if x.get(key) is not None]
    if len(xs) < 4:
        return None
    k = max(1, int(len(xs) * share))
    head = statistics.median(v for _, v in xs[:k])
    tail = statistics.median(v for _, v in xs[-k:])
    span_h = max(1e-9, (xs[-1][0] - xs[0][0]) / 3600)
    return {"first": head, "last": tail, "growth": tail - head, "growth_per_h": round((tail - head) / span_h, 1),
            "min": min(v for _, v in xs), "max": max(v for _, v in xs), "samples": len(xs)}


async def _soak(spec, duration_s, concurrency, exec_share, cp_share, bucket_s) -> dict[str, Any]:
    from ..backends.base import ExecRequest
    from ..daemon.mux_client import MuxClient
    from ..manager import SandboxManager

    st0 = daemon_status()
    pid = (st0 or {}).get("pid")
    before = proc_usage(pid) if pid else None
    client_before = proc_usage(os.getpid())
    load_before = _load1()
    mgr = SandboxManager()
    name = f"aksoak{os.getpid()}"
    await mgr.create(spec.replace(name=name), start=True)
    series: list[dict[str, Any]] = []
    lat: dict[str, list[float]] = {"run": [], "exec": [], "cp": []}
    errors: list[str] = []
    counts = {"run": 0, "exec": 0, "cp": 0}
    t_start = time.monotonic()
    stop_at = t_start + duration_s
    bucket: dict[str, Any] = {"ops": 0, "errors": 0, "lat": []}
    try:
        async with await MuxClient.connect() as mux:
            async def worker(i: int) -> None:
                k = 0
                while time.monotonic() < stop_at:
                    k += 1
                    x = (k * 7919 + i * 104729) % 1000 / 1000  # a fixed mix, spread over workers
                    kind = "exec" if x < exec_share else "cp" if x < exec_share + cp_share else "run"
                    a = time.perf_counter()
                    try:
                        if kind == "run":
                            r = await mux.run(["echo", "hello"], spec, timeout=60)
                            ok = r["exit_code"] == 0 and r["stdout"] == HELLO
                        elif kind == "exec":
                            r = await mgr.exec(name, ExecRequest(["echo", "hello"], timeout=60))
                            ok = r.exit_code == 0 and r.stdout == HELLO
                        else:
                            data = os.urandom(4096)
                            await mgr.write_file(name, f"/tmp/soak{i}", data)
                            got = b"".join([c async for c in mgr.read_file(name, f"/tmp/soak{i}")])
                            ok = got == data
                    except Exception as exc:
                        ok = False
                        if len(errors) < 20:
                            errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
                    ms = (time.perf_counter() - a) * 1e3
                    counts[kind] += 1
                    bucket["ops"] += 1
                    if ok:
                        lat[kind].append(ms)
                        bucket["lat"].append(ms)
                    else:
                        bucket["errors"] += 1

            async def sampler() -> None:
                nonlocal bucket
                h_prev, m_prev = _pool_counts(st0)
                while time.monotonic() < stop_at + bucket_s:
                    await asyncio.sleep(bucket_s)
                    b, bucket = bucket, {"ops": 0, "errors": 0, "lat": []}
                    st = await asyncio.to_thread(daemon_status)
                    du = proc_usage(pid) if pid else {}
                    h, m = _pool_counts(st)
                    dh, dm = h - h_prev, m - m_prev
                    h_prev, m_prev = h, m
                    series.append({"t": round(time.monotonic() - t_start, 2), "ops_per_s": b["ops"] / bucket_s,
                                   "errors": b["errors"], "p50_ms": _pct(b["lat"], 50), "p99_ms": _pct(b["lat"], 99),
                                   "hit_rate": round(dh / (dh + dm), 3) if dh + dm else None,
                                   "daemon_rss_kib": du.get("vmrss"), "daemon_fds": du.get("fds"),
                                   "client_fds": len(os.listdir("/proc/self/fd")), "load1": _load1()})

            samp = asyncio.create_task(sampler())
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            await samp
    finally:
        try:
            await mgr.remove(name)
        finally:
            await mgr.aclose()
    pools_end = pool_view(daemon_status())
    await asyncio.sleep(1.0)
    after = proc_usage(pid) if pid else None
    client_after = proc_usage(os.getpid())
    total = sum(counts.values())
    ok_n = sum(len(v) for v in lat.values())
    all_lat = [x for v in lat.values() for x in v]
    return {"duration_s": duration_s, "concurrency": concurrency, "ops": total, "ok": ok_n,
            "success_rate": round(ok_n / total, 5) if total else None, "by_kind": counts,
            "latency": summary(all_lat), "latency_by_kind": {k: summary(v) for k, v in lat.items()},
            "ops_per_s": round(total / duration_s, 2), "series": series, "errors": errors,
            "bucket_s": bucket_s, "daemon_before": before, "daemon_after": after,
            "client_before": client_before, "client_after": client_after,
            "trends": {k: trend(series, k) for k in ("daemon_rss_kib", "daemon_fds", "client_fds", "p50_ms", "p99_ms",
                                                      "ops_per_s", "hit_rate", "load1")},
            "load1_before": load_before, "load1_after": _load1(), "pools_end": pools_end}
