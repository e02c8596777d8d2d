"""A tiny real run (2 iterations, podman + wasm) through the CLI, as a user runs it: JSON that validates,
the Markdown report with the reference's layouts, PNG charts, `bench compare` and `bench report`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from agentkernel.bench import schema


def _can_run() -> str | None:
    try:
        import matplotlib  # noqa: F401
        import wasmtime  # noqa: F401
    except ImportError as exc:
        return f"needs the bench and wasm extras: {exc}"
    if shutil.which("podman") is None:
        return "podman is not installed"
    if subprocess.run(["podman", "image", "exists", "agentkernel/busybox"], capture_output=True).returncode != 0:
        return "agentkernel/busybox is not built"
    return None


def _ak(*args, timeout=240):
    env = dict(os.environ)
    env.pop("AGENTKERNEL_NO_DAEMON", None)  # the bench manages its own daemon in its own runtime dir
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.engine("podman")
@pytest.mark.slow
@pytest.mark.skipif(_can_run() is not None, reason=str(_can_run()))
def test_tiny_run_produces_json_report_and_charts(tmp_path):
    out = tmp_path / "results"
    r = _ak("bench", "--backends", "podman,wasm", "--suite", "headline,phases", "--iterations", "2", "--warmup", "1",
            "--quick", "--out", str(out), "--no-progress", "--settle", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(os.listdir(out))
    js = [f for f in files if f.endswith(".json")]
    md = [f for f in files if f.endswith(".md")]
    pngs = [f for f in files if f.endswith(".png")]
    assert len(js) == 1 and len(md) == 1, files
    assert {p.rsplit("-", 1)[1] for p in pngs} >= {"latency.png", "phases.png", "ratios.png"}
    for p in pngs:
        with open(out / p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out / p) > 5000

    with open(out / js[0]) as f:
        doc = json.load(f)
    assert schema.validate(doc) == []
    assert doc["machine"]["cores"] and doc["versions"]["podman"] and doc["git"]["commit"]
    ms = {m["id"]: m for m in doc["measurements"]}
    for mid in ("headline/podman/cold", "headline/podman/warm", "headline/podman/raw_podman",
                "headline/podman/raw_podman_hardened", "headline/wasm/cold", "headline/wasm/warm",
                "headline/wasm/raw_wasmtime", "phases/podman/cold_total", "phases/podman/exec_agent"):
        m = ms[mid]
        assert m["available"] and m["stats"]["n"] >= 1, (mid, m["errors"])
        assert all(isinstance(x, float | int) and x > 0 for x in m["samples_ms"])
    assert len(ms["headline/podman/cold"]["samples_ms"]) + ms["headline/podman/cold"]["failures"] == 2
    assert len(ms["headline/podman/cold"]["warmup_ms"]) == 1
    ratios = {r["id"]: r for r in doc["ratios"]}
    assert ratios["headline/podman/warm~headline/podman/raw_podman"]["ratio"] > 0
    assert [lc["label"] for lc in doc["leak_checks"]] == ["whole run"]
    assert doc["leak_checks"][0]["attributed_count"] == 0, doc["leak_checks"][0]["leaks"]

    with open(out / md[0]) as f:
        text = f.read()
    for heading in ("## The headline numbers", "## Ours vs the raw engines", "## Where the time goes",
                    "## Design goals", "| Backend | Mode | Latency (p50) | p95 | Throughput | Isolation | Reference |",
                    "Podman (Linux): ~310ms", "![Latency distribution"):
        assert heading in text, heading
    assert "| Backend | Mode | p50 |" in r.stdout  # the closing note on stdout

    c = _ak("bench", "compare", str(out / js[0]), str(out / js[0]))
    assert c.returncode == 0 and "+0.0%" in c.stdout and "0 changes" in c.stdout, c.stdout + c.stderr
    rr = _ak("bench", "report", str(out / js[0]), "--out", str(tmp_path / "again"), "--no-charts")
    assert rr.returncode == 0, rr.stderr
    assert os.path.exists(tmp_path / "again" / md[0])
