"""The results document's schema is stable (a golden field list) and documented; documents validate."""

from __future__ import annotations

import copy
import os

import pytest

from agentkernel.bench import schema

# Changing any of these is a schema change: bump schema.SCHEMA_VERSION, update docs/benchmark-method.md
# and this list together.
GOLDEN = {
    "document": ["schema", "schema_version", "run_id", "date", "duration_s", "machine", "versions", "git", "config",
                 "backends", "measurements", "ratios", "results", "leak_checks", "summary", "errors"],
    "machine": ["hostname", "cpu_model", "cores", "memory_mib", "kernel", "arch", "os", "virtualization", "cgroup",
                "loadavg_start"],
    "versions": ["agentkernel", "python", "podman", "docker", "runsc", "crun", "runc", "wasmtime", "qemu"],
    "measurement": ["id", "suite", "backend", "name", "label", "mode", "kind", "image", "command", "available",
                    "reason", "unit", "samples_ms", "attempts", "failures", "success_rate", "errors", "stats",
                    "first_ms", "warmup_ms", "extra"],
    "stats": ["n", "min_ms", "max_ms", "mean_ms", "stdev_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms"],
    "ratio": ["id", "suite", "backend", "ours", "raw", "label", "ours_p50_ms", "raw_p50_ms", "ratio", "speedup",
              "available", "reason"],
    "leak_check": ["label", "suite", "backend", "clean", "leaks", "leak_count", "attributed_count", "foreign",
                   "categories", "present_counts", "probe_errors", "duration_ms", "settle_s"],
    "leak_item": ["category", "key", "info", "attributed", "kind"],
    "headline_row": ["backend", "mode", "measurement", "available", "reason", "p50_ms", "p95_ms", "throughput_per_s",
                     "isolation", "ratios"],
}


def test_golden_field_list():
    assert schema.SCHEMA_VERSION == 1
    assert schema.field_list() == GOLDEN


def test_every_field_is_documented():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "benchmark-method.md")
    with open(path) as f:
        text = f.read()
    missing = [f"{obj}.{field}" for obj, fields in GOLDEN.items() for field in fields if f"`{field}`" not in text]
    assert not missing, f"fields not documented in docs/benchmark-method.md: {missing}"
    assert f"schema_version` is {schema.SCHEMA_VERSION}" in text


def test_synthetic_document_validates_and_durations_are_ms_numbers(synthetic_doc):
    assert schema.validate(synthetic_doc) == []
    assert list(synthetic_doc)[: len(GOLDEN["document"])] == GOLDEN["document"]
    m = next(x for x in synthetic_doc["measurements"] if x["id"] == "headline/podman/cold")
    assert m["samples_ms"] == [190.0, 200.0, 210.0] and m["failures"] == 1 and m["attempts"] == 4
    assert m["errors"] == ["exit 125: boom"] and m["first_ms"] == 400.0 and m["stats"]["p50_ms"] == 200.0
    q = next(x for x in synthetic_doc["measurements"] if x["id"] == "headline/qemu/cold")
    assert q["available"] is False and "not built" in q["reason"]
    rows = {(r["backend"], r["mode"]): r for r in synthetic_doc["summary"]["headline"]}
    assert rows[("podman", "warm")]["ratios"][0]["ratio"] == pytest.approx(22 / 310, abs=1e-4)
    assert rows[("qemu", "cold")]["available"] is False


def test_validator_catches_drift(synthetic_doc):
    bad = copy.deepcopy(synthetic_doc)
    del bad["measurements"][0]["stats"]["p95_ms"]
    bad["measurements"][1]["samples_ms"] = ["12 ms"]
    bad["ratios"][0]["unexpected"] = 1
    bad["schema_version"] = 2
    problems = "\n".join(schema.validate(bad))
    assert "missing field 'p95_ms'" in problems
    assert "samples_ms[0]: expected number" in problems
    assert "unexpected field 'unexpected'" in problems
    assert "schema_version: expected 1" in problems


def test_schema_is_valid_json_schema(synthetic_doc):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema.SCHEMA)
    jsonschema.Draft202012Validator(schema.SCHEMA).validate(synthetic_doc)
