"""``bench report A.json B.json``: one report from several runs, each figure's run named in the header."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from agentkernel.bench import merge, report, schema
from tests.bench.test_speed_soak_report import make_doc


def _run(run_id: str, date: str, suite: str, result: dict, load: list[float]) -> dict:
    doc = copy.deepcopy(make_doc())
    doc["run_id"], doc["date"] = run_id, date
    doc["config"]["suites"], doc["config"]["backends"] = [suite], ["oci"]
    doc["machine"]["loadavg_start"], doc["machine"]["loadavg_end"] = load, load
    doc["results"] = {suite: {"oci": result}}
    doc["leak_checks"] = [{"label": "whole run", "clean": True, "leaks": [], "leak_count": 0, "attributed_count": 0,
                           "foreign": [], "categories": [], "present_counts": {}, "probe_errors": {},
                           "duration_ms": 1.0, "settle_s": 0.0, "suite": "run", "backend": None, "removed": []}]
    return schema.finalize(doc)


def test_merge_keeps_every_runs_results_and_names_the_runs():
    a = _run("20991201T100000Z-aaaaaa", "2099-12-01T10:00:00Z", "stress", {"available": True, "count": 1000}, [5.0])
    b = _run("20991201T110000Z-bbbbbb", "2099-12-01T11:00:00Z", "live", {"available": True, "asked": 200}, [9.0])
    c = _run("20991201T120000Z-cccccc", "2099-12-01T12:00:00Z", "stress", {"available": True, "count": 999}, [1.0])
    m = merge.merge([b, c, a])  # any order: sorted by date, later wins
    assert m["results"]["stress"]["oci"]["count"] == 999 and m["results"]["live"]["oci"]["asked"] == 200
    assert m["run_id"] == "20991201T100000Z-aaaaaa+2" and m["date"] == "2099-12-01T10:00:00Z"
    assert [r["run_id"] for r in m["config"]["merged_from"]] == [a["run_id"], b["run_id"], c["run_id"]]
    assert m["config"]["suites"] == ["stress", "live"]
    assert [lc["run_id"] for lc in m["leak_checks"]] == [a["run_id"], b["run_id"], c["run_id"]]
    assert schema.validate(m) == []
    md = report.render(m)
    assert "**Combined from 3 runs**" in md and "`20991201T110000Z-bbbbbb`: 2099-12-01T11:00:00Z" in md
    assert "load [9.0] -> [9.0]" in md
    assert merge.merge([a])["run_id"] == a["run_id"]


def test_a_merged_report_merged_again_keeps_each_runs_date_and_settings():
    """Merging a report that was itself merged lists its runs, not one made-up run; settings that differ
    between runs are given per run; each run's whole-run leak check is named by its run."""
    a = _run("20991201T100000Z-aaaaaa", "2099-12-01T10:00:00Z", "stress", {"available": True, "count": 1}, [5.0])
    b = _run("20991201T110000Z-bbbbbb", "2099-12-01T11:00:00Z", "live", {"available": True, "asked": 2}, [9.0])
    c = _run("20991201T120000Z-cccccc", "2099-12-01T12:00:00Z", "soak", {"duration_s": 5, "ops": 1}, [1.0])
    a["config"]["iterations"], a["config"]["warmup"] = 10, 2
    b["config"]["iterations"], b["config"]["warmup"] = 10, 2
    c["config"]["iterations"], c["config"]["warmup"] = 20, 3
    ab = merge.merge([a, b])
    assert report._settings(ab["config"]) == "10 measured runs per command after 2 warm-up runs (--quick)"
    m = merge.merge([ab, c])
    assert [r["run_id"] for r in m["config"]["merged_from"]] == [a["run_id"], b["run_id"], c["run_id"]]
    md = report.render(m)
    assert "**Combined from 3 runs**" in md
    assert "- **Settings**: runs per command and warm-up runs per run, below;" in md
    assert f"`{a['run_id']}`: 2099-12-01T10:00:00Z, 0 s, 10 measured runs per command after 2 warm-up runs" in md
    assert f"`{c['run_id']}`: 2099-12-01T12:00:00Z, 0 s, 20 measured runs per command after 3 warm-up runs" in md
    assert md.count("| whole run `") == 3 and f"| whole run `{b['run_id']}` |" in md


def test_merge_refuses_runs_of_different_machines():
    a = _run("20991201T100000Z-aaaaaa", "2099-12-01T10:00:00Z", "stress", {}, [1.0])
    b = copy.deepcopy(a)
    b["machine"]["hostname"] = "another-host"
    with pytest.raises(merge.MergeError, match="different machines"):
        merge.merge([a, b])


def test_bench_report_takes_several_files(tmp_path):
    a = _run("20991201T100000Z-aaaaaa", "2099-12-01T10:00:00Z", "stress", {"available": True, "count": 3}, [1.0])
    b = _run("20991201T110000Z-bbbbbb", "2099-12-01T11:00:00Z", "soak", {"duration_s": 5, "ops": 1}, [2.0])
    for d in (a, b):
        (tmp_path / f"{d['run_id']}.json").write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "agentkernel", "bench", "report", str(tmp_path / f"{a['run_id']}.json"),
                        str(tmp_path / f"{b['run_id']}.json"), "--out", str(tmp_path / "out"), "--no-charts",
                        "--docs", str(tmp_path / "docs")], capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "**Combined from 2 runs**" in md and "## Soak" in md
    bad = subprocess.run([sys.executable, "-m", "agentkernel", "bench", "report", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot read" in bad.stderr
