"""compare (two runs) and the Markdown report on synthetic documents."""

from __future__ import annotations

import json

import pytest

from agentkernel.bench import compare, report

from .conftest import make_doc


def test_compare_flags_changes_and_matches_ids(tmp_path):
    a, b = make_doc(1.0), make_doc(0.5)
    c = compare.compare(a, b, threshold=10)
    rows = {r["id"]: r for r in c["measurements"]}
    assert rows["headline/podman/cold"]["a_p50_ms"] == 200.0 and rows["headline/podman/cold"]["b_p50_ms"] == 100.0
    assert rows["headline/podman/cold"]["delta_pct"] == -50.0 and rows["headline/podman/cold"]["flag"]
    assert not rows["headline/podman/raw_podman"]["flag"]
    assert rows["headline/qemu/cold"]["a_p50_ms"] is None
    text = compare.format_compare(c)
    assert "-50.0%" in text and "**headline/podman/cold**" in text
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    b["schema_version"] = 99
    pb.write_text(json.dumps(b))
    assert compare.load(str(pa))["run_id"] == a["run_id"]
    with pytest.raises(compare.CompareError, match="schema version 99"):
        compare.load(str(pb))


def test_report_keeps_unavailable_rows_and_reference_column(synthetic_doc):
    md = report.render(synthetic_doc, {"latency": "x-latency.png"})
    assert "| Backend | Mode | Latency (p50) | p95 | Throughput | Isolation | Reference |" in md
    assert "Podman (Linux): ~310ms" in md
    assert "unavailable: backend 'qemu' is not built into this version of agentkernel" in md
    assert "raw QEMU boot" in md  # the raw baseline row is printed, not dropped
    assert "0.65x (1.5x faster)" in md  # 200 / 310
    assert "![Latency distribution" in md and "x-latency.png" in md
    note = report.closing_note(synthetic_doc)
    assert note.startswith("| Backend | Mode | p50 |") and "qemu" in note


def test_report_formats():
    assert report.fmt_ms(0.0002) == "200 ns"
    assert report.fmt_ms(0.5) == "500.0 µs"
    assert report.fmt_ms(12.34) == "12.3 ms"
    assert report.fmt_ms(1234) == "1,234 ms"
    assert report.fmt_ms(12345) == "12.3 s"
    assert report.fmt_ratio(0.25) == "0.25x (4.0x faster)"


def _qemu_doc(warm_ms: float, snapshot_ms: float) -> dict:
    from agentkernel.bench import schema
    from agentkernel.bench.harness import BenchConfig, BenchContext, Sample

    ctx = BenchContext(BenchConfig(backends=["qemu"], suites=["headline"], iterations=3, warmup=1, quick=True,
                                   progress=False))
    try:
        ctx._doctor = {}
        ctx.doc["backends"] = {"qemu": {"available": True, "reason": "qemu 7.2", "isolation": "microVM",
                                        "image": "agentkernel/busybox"}}
        for name, ms in (("warm", warm_ms), ("snapshot", snapshot_ms)):
            ctx.add_measurement(suite="headline", backend="qemu", name=name, label=f"agentkernel run ({name})",
                                mode=name, samples=[Sample(True, ms * f) for f in (0.9, 1.0, 1.1)])
        ctx.doc["duration_s"] = 1.0
        return schema.finalize(ctx.doc)
    finally:
        ctx.close()


@pytest.mark.parametrize(("warm", "snapshot", "verdict"),
                         [(25.0, 141.0, "**pass**"), (25.0, 217.0, "**miss**"), (60.0, 150.0, "**miss**")])
def test_qemu_goal_row_has_a_verdict(warm, snapshot, verdict):
    md = report.render(_qemu_doc(warm, snapshot), {})
    row = next(line for line in md.splitlines() if line.startswith("| qemu microVM: warm-pool run"))
    assert row.rstrip().endswith(f"| {verdict} |"), row
