"""The report generator's rows for the speed and soak suites (filled by the next quiet run), and the soak
chart, from synthetic results."""

from __future__ import annotations

import pytest

from agentkernel.bench import charts, report
from agentkernel.bench.harness import BenchConfig, BenchContext


def make_doc() -> dict:
    ctx = BenchContext(BenchConfig(backends=["oci"], suites=["speed"], quick=True, progress=False))
    try:
        ctx._doctor = {}
        ctx.doc["backends"] = {"oci": {"available": True, "reason": "crun", "isolation": "container",
                                       "image": "agentkernel/busybox"}}
        from agentkernel.bench import schema

        return schema.finalize(ctx.doc) if hasattr(schema, "finalize") else ctx.doc
    finally:
        ctx.close()


def _doc() -> dict:
    doc = make_doc()
    lat = {"n": 10, "median_ms": 9.0, "p95_ms": 11.0, "p99_ms": 12.0, "mean_ms": 9.5, "min_ms": 8.0}
    floor = {"n": 10, "median_ms": 6.0, "p95_ms": 7.0, "p99_ms": 7.5, "mean_ms": 6.1, "min_ms": 5.5}
    doc["results"]["speed"] = {"default": {
        "backend": "oci",
        "back_to_back": {"runs": 200, "failures": 0, "runs_per_s": 45.0, "hit_rate": 0.95, "latency": lat,
                         "floor": floor, "pools": [{"backend": "oci", "cannot_keep_up": None}]},
        "paced": {"runs": 30, "failures": 0, "latency": lat, "floor": floor, "x_floor": 1.5},
        "serve_run_c10": {"requests": 300, "rps": 50.0, "success_rate": 1.0, "latency": {"p99_ms": 80.0}},
        "serve_exec_c10": {"requests": 3000, "rps": 900.0, "success_rate": 1.0, "latency": {"p99_ms": 20.0},
                           "direct": {"requests": 3000, "rps": 1200.0, "success_rate": 1.0,
                                      "latency": {"p50_ms": 6.0, "p99_ms": 15.0}}, "ratio_vs_direct": 0.75},
        "wasm_pipelined": {"runs_per_s": 3500, "window": 64}, "wasm_in_process": {"runs_per_s": 3600},
        "wasm_per_connection": {"runs_per_s": 1200},
        "oci_cold": {"runs": 30, "failures": 0, "latency": {**lat, "median_ms": 35.0}, "floor": floor},
        "live": {"asked": 200, "ready": 200, "daemon": {"vmrss": 51200, "fds": 30}, "pss_mib_per_member": 0.05},
    }}
    series = [{"t": float(i), "ops_per_s": 100.0, "errors": 0, "p50_ms": 5.0, "p99_ms": 20.0, "hit_rate": 0.97,
               "daemon_rss_kib": 50000} for i in range(1, 6)]
    doc["results"]["soak"] = {"oci": {
        "duration_s": 5, "concurrency": 10, "ops": 500, "ok": 500, "success_rate": 1.0, "latency": lat,
        "series": series, "errors": [], "daemon_before": {"vmrss": 50000, "fds": 12},
        "daemon_after": {"vmrss": 50100, "fds": 12}, "leak_check": {"clean": True, "leak_count": 0}}}
    return doc


def test_speed_and_soak_sections():
    md = report.render(_doc())
    assert "## Speed under sustained load (issue 18)" in md and "**oci**" in md
    assert "45.0 runs/s, hit rate 0.95" in md
    assert md.count("**pass**") >= 4 and "**miss**" in md  # exec 900/s and oci cold 35 ms miss their goals
    assert "## Soak: mixed run/exec/cp under sustained load" in md and "0.97-0.97" in md
    assert "Hit rate (per sample)" in md
    assert "48.8 -> 48.9 MiB, 12 -> 12 fds" in md
    # the serve rows' direct baseline (same work without HTTP) and the ratio; none when the run lacks one
    assert "1200.0 req/s, p50 6.0 ms, p99 15.0 ms, success 100%; HTTP/direct 0.75x" in md
    assert md.count("the same without HTTP (`direct`)") == 1


def test_soak_chart(tmp_path):
    pytest.importorskip("matplotlib")
    out = charts.soak(_doc(), str(tmp_path / "soak.png"))
    assert out and (tmp_path / "soak.png").stat().st_size > 1000


def test_soak_trends_and_pool_note():
    doc = _doc()
    r = doc["results"]["soak"]["oci"]
    from agentkernel.bench import sustained

    r["series"] = [{**x, "daemon_fds": 9, "load1": 1.0 + i} for i, x in enumerate(r["series"] * 4)]
    for i, x in enumerate(r["series"]):
        x["t"] = float(i + 1)
    r["trends"] = {k: sustained.trend(r["series"], k) for k in ("daemon_rss_kib", "daemon_fds", "load1")}
    r["pools_end"] = [{"backend": "oci", "cannot_keep_up": "demand 30.0/s exceeds what 4 concurrent starts ..."}]
    md = report.render(doc)
    assert "| daemon RSS | 48.8 -> 48.8 MiB | 48.8-48.8 MiB |" in md
    assert "| daemon fds | 9 -> 9 | 9-9 |" in md
    assert "machine load (1 min)" in md
    assert "The oci pool at the end: cannot keep up: demand 30.0/s" in md


def test_trend_growth():
    from agentkernel.bench.sustained import trend

    series = [{"t": float(t), "v": 100 + t} for t in range(0, 3601, 36)]  # +1 per second
    t = trend(series, "v")
    assert t["first"] < 400 and t["last"] > 3300 and t["growth_per_h"] > 2900
    assert trend(series[:3], "v") is None  # too few samples to say
    assert trend([{"t": 1.0, "v": None}] * 10, "v") is None


def test_live_section_per_backend():
    doc = _doc()
    doc["results"]["live"] = {
        "oci": {"available": True, "asked": 200, "ready": 200, "agents": 200, "daemon": {"vmrss": 51200, "fds": 30,
                "threads": 4}, "pss_mib_per_member": 0.3, "agent_pss_mib_per_member": 0.3,
                "cgroup_mib_per_member": 1.1, "engine_processes": {}, "leak_check": {"leak_count": 0}},
        "podman": {"available": True, "asked": 200, "ready": 200, "agents": 200, "daemon": {"vmrss": 61440},
                   "pss_mib_per_member": 2.4, "agent_pss_mib_per_member": 0.3, "cgroup_mib_per_member": 1.5,
                   "engine_processes": {"conmon": 200}, "leak_check": {"leak_count": 0}},
        "docker": {"available": False, "reason": "no engine"},
    }
    md = report.render(doc)
    assert "## Daemon with live pooled sandboxes" in md
    assert "| oci | 200/200 ready (200 agents measured) | 50.0 MiB, 30 fds, 4 threads | 0.3 MiB (none above" in md
    assert "2.4 MiB (conmon x200 above the agent)" in md
    podman = next(line for line in md.splitlines() if line.startswith("| podman |"))
    assert podman.endswith("**miss** |")
    assert "| docker | unavailable: no engine |" in md


def test_member_chain_and_mounts_from(tmp_path):
    """A real process tree: a child of a child of this process; the chain stops at the stop set."""
    import os
    import subprocess
    import sys
    import time

    from agentkernel.bench import sustained

    inner = "import subprocess,sys; p=subprocess.Popen(['sleep','30']); print(p.pid, flush=True); p.wait()"
    outer = subprocess.Popen([sys.executable, "-c", inner], stdout=subprocess.PIPE, text=True)
    leaf = None
    try:
        leaf = int(outer.stdout.readline())
        assert sustained.member_chain(leaf, {os.getpid()}) == [leaf, outer.pid]
        assert sustained.member_chain(leaf, {outer.pid}) == [leaf]
        # seen once, under load, right after the start: not listed by the first scan; later scans must find it
        deadline = time.monotonic() + 5
        while leaf not in sustained.processes_with("sleep\x0030") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leaf in sustained.processes_with("sleep\x0030")
        assert sustained.mounts_from(leaf, "/") and not sustained.mounts_from(leaf, str(tmp_path) + "/")
        assert sustained.cgroup_memory_bytes(leaf) is None or sustained.cgroup_memory_bytes(leaf) > 0
    finally:
        if leaf:
            os.kill(leaf, 9)
        outer.kill()
        outer.wait()


def test_leak_cells_split_this_runs_leaks_from_the_unattributed_rest():
    doc = _doc()
    doc["leak_checks"] = [{"label": "soak oci", "clean": False, "leak_count": 3, "attributed_count": 0, "leaks": [
        {"category": "cgroups", "key": "pool-1", "info": {}, "attributed": False, "kind": "unattributed"},
        {"category": "cgroups", "key": "pool-2", "info": {}, "attributed": False, "kind": "unattributed"},
        {"category": "runsc", "key": "pid:1", "info": {}, "attributed": False, "kind": "unattributed"}]}]
    md = report.render(doc)
    assert "0 leaked by this run; unattributed: cgroups 2, runsc 1" in md
    doc["leak_checks"][0]["leaks"][0]["attributed"] = True
    assert "**1 leaked by this run**; unattributed: cgroups 1, runsc 1" in report.render(doc)


def test_soak_runs_on_the_named_backends(monkeypatch):
    """The soak takes the default backend, or each backend --backends names; one it cannot run is reported."""
    from agentkernel.bench.suites import sustained as suite

    assert not BenchConfig().backends_named and BenchConfig(backends=["wasm"]).backends_named
    ctx = BenchContext(BenchConfig(backends=["wasm", "firecracker"], suites=["soak"], quick=True, progress=False))
    soaked: list[str] = []
    try:
        ctx._doctor = {}
        ctx.doc["backends"] = {"wasm": {"available": True, "reason": ""},
                               "firecracker": {"available": False, "reason": "no hardware KVM"}}
        monkeypatch.setattr(suite, "_soak_one", lambda _ctx, backend: soaked.append(backend))
        suite.run_soak(ctx)
        assert soaked == ["wasm"]
        assert ctx.doc["results"]["soak"]["firecracker"] == {"available": False, "reason": "no hardware KVM"}
        md = report.render(ctx.doc)
        assert "**firecracker**: unavailable: no hardware KVM" in md
    finally:
        ctx.close()
