"""Prometheus text exposition (format 0.0.4) without a client library: a few counters, one histogram
family, and gauges read from the daemon's pools and the store at scrape time.

Runs are counted per tenant. An admin (or the local user when no token is configured) sees the whole
server; any other caller sees only its own tenant's runs and sandboxes (no pools, no request counts:
they would show what other tenants do)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _labels(d: dict[str, Any]) -> str:
    if not d:
        return ""
    parts = []
    for k, v in sorted(d.items()):
        s = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{s}"')
    return "{" + ",".join(parts) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[tuple, Histogram] = {}
        self.runs: dict[tuple, int] = defaultdict(int)
        self.disconnects = 0
        self.auth_failures = 0

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1

    def run(self, kind: str, backend: str, pooled: bool | None, seconds: float, exit_code: int | None,
            error: bool = False, tenant: str = "") -> None:
        key = (tenant, kind, backend, "" if pooled is None else ("true" if pooled else "false"))
        with self._lock:
            h = self.latency.get(key)
            if h is None:
                h = self.latency[key] = Histogram()
            h.observe(seconds)
            outcome = "error" if error else ("ok" if exit_code == 0 else "nonzero")
            self.runs[(tenant, kind, backend, outcome)] += 1

    def render(self, pools: list[dict[str, Any]], sandboxes: list[dict[str, Any]], active: int,
               tenant: str | None = None) -> str:
        """The whole server (``tenant`` None), or one tenant's runs and sandboxes only."""
        out: list[str] = []
        whole = tenant is None

        def family(name: str, kind: str, helptext: str) -> None:
            out.append(f"# HELP {name} {helptext}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            if whole:
                family("agentkernel_http_requests_total", "counter", "HTTP requests by route template and status")
                for (m, r, st), n in sorted(self.requests.items()):
                    lbl = _labels({'method': m, 'route': r, 'status': st})
                    out.append(f"agentkernel_http_requests_total{lbl} {n}")
            latency: dict[tuple, Histogram] = {}
            for (t, kind, backend, pooled), h in self.latency.items():
                if whole or t == tenant:
                    agg = latency.setdefault((kind, backend, pooled), Histogram())
                    agg.counts = [a + b for a, b in zip(agg.counts, h.counts, strict=True)]
                    agg.sum += h.sum
                    agg.n += h.n
            runs: dict[tuple, int] = defaultdict(int)
            for (t, kind, backend, outcome), n in self.runs.items():
                if whole or t == tenant:
                    runs[(kind, backend, outcome)] += n
            family("agentkernel_run_duration_seconds", "histogram",
                   "end-to-end duration of runs and execs served by the API (pooled: from a warm pool)")
            for (kind, backend, pooled), h in sorted(latency.items()):
                base = {"kind": kind, "backend": backend}
                if pooled:
                    base["pooled"] = pooled
                cum = 0
                for le, c in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                    cum += c
                    out.append(f"agentkernel_run_duration_seconds_bucket{_labels({**base, 'le': _num(le)})} {cum}")
                out.append(f"agentkernel_run_duration_seconds_sum{_labels(base)} {_num(round(h.sum, 6))}")
                out.append(f"agentkernel_run_duration_seconds_count{_labels(base)} {h.n}")
            family("agentkernel_runs_total", "counter", "runs and execs by outcome (ok, nonzero exit, error)")
            for (kind, backend, outcome), n in sorted(runs.items()):
                lbl = _labels({"kind": kind, "backend": backend, "outcome": outcome})
                out.append(f"agentkernel_runs_total{lbl} {n}")
            if whole:
                family("agentkernel_stream_disconnects_total", "counter",
                       "streams whose client went away before the command ended (the command was killed)")
                out.append(f"agentkernel_stream_disconnects_total {self.disconnects}")
                family("agentkernel_auth_failures_total", "counter", "requests refused with 401")
                out.append(f"agentkernel_auth_failures_total {self.auth_failures}")

        family("agentkernel_runs_active", "gauge", "runs in progress")
        out.append(f"agentkernel_runs_active {active}")
        if not whole:
            pools = []
        gauges = (("ready", "warm members ready"), ("starting", "members starting"), ("in_use", "members in use"))
        for field, helptext in gauges:
            family(f"agentkernel_pool_{field}", "gauge", f"pool: {helptext}")
            for p in pools:
                if field in p:
                    out.append(f"agentkernel_pool_{field}{_labels(_pool_labels(p))} {p[field]}")
        for field, helptext in (("hits", "acquires served warm"), ("misses", "acquires that found no warm member"),
                                ("cold_starts", "members started on demand"), ("started", "members started"),
                                ("destroyed", "members destroyed"), ("start_failures", "failed starts")):
            family(f"agentkernel_pool_{field}_total", "counter", f"pool: {helptext}")
            for p in pools:
                v = (p.get("metrics") or {}).get(field)
                if v is not None:
                    out.append(f"agentkernel_pool_{field}_total{_labels(_pool_labels(p))} {v}")
        family("agentkernel_sandboxes", "gauge", "named sandboxes by backend and state")
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for s in sandboxes:
            counts[(s.get("backend") or "", s.get("state") or "")] += 1
        for (b, st), n in sorted(counts.items()):
            out.append(f"agentkernel_sandboxes{_labels({'backend': b, 'state': st})} {n}")
        return "\n".join(out) + "\n"


def _pool_labels(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p.get(k) or "" for k in ("backend", "image", "profile", "key")}
