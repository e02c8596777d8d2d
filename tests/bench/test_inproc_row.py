"""The ``inproc`` suite's row (in-process ``Sandbox.run`` vs the CLI one-shot, per backend): its goal-row verdict
and section in the report, from synthetic results; and a tiny real run on ``oci`` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agentkernel.bench import report
from agentkernel.bench.harness import BenchConfig, BenchContext, Sample
from agentkernel.bench.suites import inproc


def _doc(inproc_ms: list[float], cli_ms: list[float]) -> dict:
    ctx = BenchContext(BenchConfig(backends=["podman", "oci"], suites=["inproc"], quick=True, progress=False))
    try:
        ctx._doctor = {}
        ctx.doc["backends"] = {b: {"available": True, "reason": "", "isolation": "container",
                                   "image": "agentkernel/busybox"} for b in ("podman", "oci")}
        for suffix, where in (("", "podman"), ("_runsc", "oci -o runtime=runsc")):
            backend = where.split()[0]
            ctx.add_measurement(suite="inproc", backend=backend, name=f"run_inproc{suffix}", label="in", mode="inproc",
                                samples=[Sample(True, x) for x in inproc_ms],
                                extra={"paired_ratio_median": inproc.paired_ratio(
                                    [Sample(True, x) for x in inproc_ms], [Sample(True, x) for x in cli_ms])})
            ctx.add_measurement(suite="inproc", backend=backend, name=f"run_cli{suffix}", label="cli", mode="cold",
                                samples=[Sample(True, x) for x in cli_ms])
            ctx.add_ratio(suite="inproc", backend=backend, ours=f"inproc/{backend}/run_inproc{suffix}",
                          raw=f"inproc/{backend}/run_cli{suffix}",
                          label=f"in-process Sandbox.run vs CLI one-shot ({where})")
        return ctx.doc
    finally:
        ctx.close()


def _goal_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| in-process `Sandbox.run` ≤ CLI one-shot")]


def test_goal_row_passes_when_in_process_is_no_slower():
    md = report.render(_doc([200.0, 210.0, 220.0], [280.0, 300.0, 320.0]))
    rows = _goal_rows(md)
    assert len(rows) == 2, md
    assert "podman" in rows[0] and "oci -o runtime=runsc" in rows[1]
    assert all("**pass**" in r and "0.70x" in r for r in rows)
    assert "## In-process `Sandbox.run` vs the CLI one-shot (same run, interleaved)" in md
    assert "| oci -o runtime=runsc | 210 ms | 300 ms | 0.70x (1.4x faster) | 0.70x (1.4x faster) |" in md
    assert "0.70x (1.4x faster) (paired per round 0.70x)" in rows[0]


def test_paired_ratio_is_the_median_of_each_rounds_ratio_and_skips_failed_rounds():
    ours = [Sample(True, 100.0), Sample(False, None, "x"), Sample(True, 300.0), Sample(True, 50.0)]
    cli = [Sample(True, 200.0), Sample(True, 100.0), Sample(True, 200.0), Sample(True, 100.0)]
    assert inproc.paired_ratio(ours, cli) == 0.5  # rounds 1, 3, 4: 0.5, 1.5, 0.5
    assert inproc.paired_ratio([Sample(False, None)], [Sample(True, 1.0)]) is None


def test_goal_row_misses_when_in_process_is_slower():
    rows = _goal_rows(report.render(_doc([415.0, 415.0], [297.0, 297.0])))
    assert len(rows) == 2 and all("**miss**" in r and "(slower)" in r for r in rows)


def test_no_row_without_the_suite():
    ctx = BenchContext(BenchConfig(backends=["oci"], suites=["headline"], quick=True, progress=False))
    try:
        md = report.render(ctx.doc)
    finally:
        ctx.close()
    assert _goal_rows(md) == [] and "In-process `Sandbox.run` vs the CLI one-shot" not in md


@pytest.mark.engine("oci")
@pytest.mark.slow
def test_tiny_real_run_writes_the_pair_and_the_ratio(tmp_path):
    from tests.conftest import require_backend

    require_backend("oci")
    env = dict(os.environ)
    env.pop("AGENTKERNEL_NO_DAEMON", None)  # the bench manages its own dirs
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "agentkernel", "bench", "--backends", "oci", "--suite", "inproc",
                        "--iterations", "2", "--warmup", "0", "--quick", "--out", str(out), "--no-progress",
                        "--settle", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    js = [f for f in os.listdir(out) if f.endswith(".json")]
    doc = json.loads((out / js[0]).read_text())
    ms = {m["id"]: m for m in doc["measurements"] if m["suite"] == "inproc"}
    assert ms["inproc/oci/run_inproc"]["stats"]["n"] == 2 and ms["inproc/oci/run_cli"]["stats"]["n"] == 2, ms
    ratio = next(x for x in doc["ratios"] if x["id"] == "inproc/oci/run_inproc~inproc/oci/run_cli")
    assert ratio["available"] and ratio["ratio"] > 0
    md = [f for f in os.listdir(out) if f.endswith(".md")]
    text = (out / md[0]).read_text()
    assert "in-process `Sandbox.run` ≤ CLI one-shot (no pool), oci |" in text
    again = tmp_path / "again"
    rep = subprocess.run([sys.executable, "-m", "agentkernel", "bench", "report", str(out / js[0]), "--out",
                          str(again), "--no-charts"], capture_output=True, text=True, timeout=60, env=env)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    text = next(again.glob("*.md")).read_text()
    assert "In-process `Sandbox.run` vs the CLI one-shot" in text
    assert "in-process `Sandbox.run` ≤ CLI one-shot (no pool), oci |" in text
