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
        "serve_exec_c10": {"requests": 3000, "rps": 900.0, "success_rate": 1.0, "latency": {"p99_ms": 20.0}},
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
    assert "48.8 -> 48.9 MiB, 12 -> 12 fds" in md


def test_soak_chart(tmp_path):
    pytest.importorskip("matplotlib")
    out = charts.soak(_doc(), str(tmp_path / "soak.png"))
    assert out and (tmp_path / "soak.png").stat().st_size > 1000
