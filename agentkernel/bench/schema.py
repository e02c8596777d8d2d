"""The results document: a versioned JSON schema, a finaliser that adds the summary, and a small
validator (the subset of JSON Schema this schema uses; no third-party dependency).

Rules that hold for every version:
- every duration is a JSON number in **milliseconds**, in a field whose name ends in ``_ms`` (lists:
  ``samples_ms``); rates end in ``_per_s``; fractions (success, hit rate) are in [0, 1];
- a measurement keeps its per-run samples (successful runs only; failures are counted with their
  reasons), its warm-up samples separately, and the aggregate ``stats``;
- a backend or baseline that cannot run here is still present, with ``available: false`` and the
  doctor's ``reason``;
- fields are only ever added within a major version; ``schema_version`` changes when a field is
  renamed, removed or changes meaning. ``compare`` refuses documents of different major versions.

The field list is pinned by tests/bench/test_schema.py (a golden list) and documented in
docs/benchmark-method.md.

Version history: 1 (first).
"""

from __future__ import annotations

from typing import Any

SCHEMA_NAME = "agentkernel-bench"
SCHEMA_VERSION = 1

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}

STATS = {
    "type": "object",
    "required": ["n", "min_ms", "max_ms", "mean_ms", "stdev_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms"],
    "additionalProperties": False,
    "properties": {"n": {"type": "integer", "minimum": 0}, "min_ms": _NUM, "max_ms": _NUM, "mean_ms": _NUM,
                   "stdev_ms": _NUM, "p50_ms": _NUM, "p90_ms": _NUM, "p95_ms": _NUM, "p99_ms": _NUM},
}

MEASUREMENT = {
    "type": "object",
    "required": ["id", "suite", "backend", "name", "label", "mode", "kind", "image", "command", "available",
                 "reason", "unit", "samples_ms", "attempts", "failures", "success_rate", "errors", "stats",
                 "first_ms", "warmup_ms", "extra"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},  # "<suite>/<backend>/<name>", unique in a document
        "suite": {"type": "string"},
        "backend": {"type": "string"},
        "name": {"type": "string"},
        "label": {"type": "string"},
        "mode": {"type": "string"},  # cold | warm | snapshot | raw | inproc | pooled | ...
        "kind": {"type": "string"},  # latency (one sample per run) | wall (one sample per batch) | phase
        "image": _STR,
        "command": {"type": ["array", "null"], "items": {"type": "string"}},
        "available": {"type": "boolean"},
        "reason": _STR,
        "unit": {"const": "ms"},
        "samples_ms": {"type": "array", "items": {"type": "number"}},
        "attempts": {"type": "integer", "minimum": 0},
        "failures": {"type": "integer", "minimum": 0},
        "success_rate": _NUM,
        "errors": {"type": "array", "items": {"type": "string"}},
        "stats": {"$ref": "#/$defs/stats"},
        "first_ms": _NUM,
        "warmup_ms": {"type": "array", "items": {"type": "number"}},
        "extra": {"type": "object"},
    },
}

RATIO = {
    "type": "object",
    "required": ["id", "suite", "backend", "ours", "raw", "label", "ours_p50_ms", "raw_p50_ms", "ratio", "speedup",
                 "available", "reason"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"}, "suite": {"type": "string"}, "backend": {"type": "string"},
        "ours": {"type": "string"}, "raw": {"type": "string"}, "label": {"type": "string"},
        "ours_p50_ms": _NUM, "raw_p50_ms": _NUM,
        "ratio": _NUM,  # ours / raw (medians): < 1 means agentkernel is faster
        "speedup": _NUM,  # raw / ours
        "available": {"type": "boolean"}, "reason": _STR,
    },
}

LEAK_ITEM = {
    "type": "object",
    "required": ["category", "key", "info", "attributed", "kind"],
    "properties": {"category": {"type": "string"}, "key": {"type": "string"}, "info": {"type": "object"},
                   "attributed": {"type": "boolean"}, "kind": {"enum": ["ours", "unattributed", "foreign"]}},
}

LEAK_CHECK = {
    "type": "object",
    "required": ["label", "suite", "backend", "clean", "leaks", "leak_count", "attributed_count", "foreign",
                 "categories", "present_counts", "probe_errors", "duration_ms", "settle_s"],
    "properties": {
        "label": {"type": "string"}, "suite": {"type": "string"}, "backend": _STR,
        "clean": {"type": "boolean"},
        "leaks": {"type": "array", "items": {"$ref": "#/$defs/leak_item"}},
        "leak_count": {"type": "integer", "minimum": 0},
        "attributed_count": {"type": "integer", "minimum": 0},
        "foreign": {"type": "array", "items": {"$ref": "#/$defs/leak_item"}},
        "categories": {"type": "array", "items": {"type": "string"}},
        "present_counts": {"type": "object"},
        "probe_errors": {"type": "object"},
        "duration_ms": {"type": "number"},
        "settle_s": {"type": "number"},
        "removed": {"type": "array", "items": {"type": "string"}},
    },
}

HEADLINE_ROW = {
    "type": "object",
    "required": ["backend", "mode", "measurement", "available", "reason", "p50_ms", "p95_ms", "throughput_per_s",
                 "isolation", "ratios"],
    "properties": {
        "backend": {"type": "string"}, "mode": {"type": "string"}, "measurement": {"type": "string"},
        "available": {"type": "boolean"}, "reason": _STR, "p50_ms": _NUM, "p95_ms": _NUM,
        "throughput_per_s": _NUM, "isolation": _STR,
        "ratios": {"type": "array", "items": {"type": "object", "required": ["raw", "label", "raw_p50_ms", "ratio"]}},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://agentkernel.dev/schemas/bench-1.json",
    "title": "agentkernel benchmark results",
    "type": "object",
    "required": ["schema", "schema_version", "run_id", "date", "duration_s", "machine", "versions", "git", "config",
                 "backends", "measurements", "ratios", "results", "leak_checks", "summary", "errors"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "run_id": {"type": "string"},
        "date": {"type": "string"},  # ISO 8601 UTC, start of the run
        "duration_s": _NUM,
        "machine": {
            "type": "object",
            "required": ["hostname", "cpu_model", "cores", "memory_mib", "kernel", "arch", "os", "virtualization",
                         "cgroup", "loadavg_start"],
            "properties": {"hostname": {"type": "string"}, "cpu_model": _STR, "cores": {"type": ["integer", "null"]},
                           "memory_mib": {"type": ["integer", "null"]}, "kernel": {"type": "string"},
                           "arch": {"type": "string"}, "os": _STR, "virtualization": {"type": "string"},
                           "cgroup": {"type": "string"},
                           "loadavg_start": {"type": ["array", "null"], "items": {"type": "number"}},
                           "loadavg_end": {"type": ["array", "null"], "items": {"type": "number"}}},
        },
        "versions": {
            "type": "object",
            "required": ["agentkernel", "python", "podman", "docker", "runsc", "crun", "runc", "wasmtime", "qemu"],
            "additionalProperties": _STR,
        },
        "git": {"type": "object", "required": ["commit", "dirty"],
                "properties": {"commit": _STR, "dirty": {"type": ["boolean", "null"]}}},
        "config": {"type": "object", "required": ["backends", "suites", "iterations", "warmup", "quick"]},
        "backends": {
            "type": "object",
            "additionalProperties": {
                "type": "object", "required": ["available", "reason", "isolation", "image"],
                "properties": {"available": {"type": "boolean"}, "reason": _STR, "isolation": _STR, "image": _STR},
            },
        },
        "measurements": {"type": "array", "items": {"$ref": "#/$defs/measurement"}},
        "ratios": {"type": "array", "items": {"$ref": "#/$defs/ratio"}},
        "results": {"type": "object", "additionalProperties": {"type": "object"}},
        "leak_checks": {"type": "array", "items": {"$ref": "#/$defs/leak_check"}},
        "summary": {"type": "object", "required": ["headline"],
                    "properties": {"headline": {"type": "array", "items": {"$ref": "#/$defs/headline_row"}}}},
        "errors": {"type": "array", "items": {"type": "object", "required": ["suite", "backend", "message"]}},
    },
    "$defs": {"stats": STATS, "measurement": MEASUREMENT, "ratio": RATIO, "leak_item": LEAK_ITEM,
              "leak_check": LEAK_CHECK, "headline_row": HEADLINE_ROW},
}


# ---- finalising ---------------------------------------------------------------------------------------


def headline_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (backend, mode) of the headline suite with its ratios to the raw engines."""
    rows = []
    ratios = doc.get("ratios", [])
    backends = doc.get("backends", {})
    for m in doc.get("measurements", []):
        if m["suite"] != "headline" or m["mode"] not in ("cold", "warm", "snapshot"):
            continue
        st = m["stats"]
        p50 = st["p50_ms"]
        rs = [{"raw": r["raw"], "label": r["label"], "raw_p50_ms": r["raw_p50_ms"], "ratio": r["ratio"]}
              for r in ratios if r["ours"] == m["id"]]
        rows.append({
            "backend": m["backend"], "mode": m["mode"], "measurement": m["id"], "available": m["available"],
            "reason": m["reason"], "p50_ms": p50, "p95_ms": st["p95_ms"],
            "throughput_per_s": round(1000.0 / p50, 3) if p50 else None,
            "isolation": (backends.get(m["backend"]) or {}).get("isolation"), "ratios": rs,
        })
    return rows


def finalize(doc: dict[str, Any]) -> dict[str, Any]:
    doc["schema"] = SCHEMA_NAME
    doc["schema_version"] = SCHEMA_VERSION
    doc["summary"] = {"headline": headline_rows(doc)}
    # a stable key order (the golden order) for humans reading the file
    order = SCHEMA["required"]
    return {k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order}


# ---- validation ---------------------------------------------------------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def _check(value: Any, sch: dict[str, Any], path: str, root: dict[str, Any], out: list[str]) -> None:
    if "$ref" in sch:
        name = sch["$ref"].rsplit("/", 1)[-1]
        _check(value, root["$defs"][name], path, root, out)
        return
    if "const" in sch and value != sch["const"]:
        out.append(f"{path}: expected {sch['const']!r}, got {value!r}")
        return
    if "enum" in sch and value not in sch["enum"]:
        out.append(f"{path}: {value!r} not in {sch['enum']}")
        return
    if "type" in sch:
        types = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
        if not any(_type_ok(value, t) for t in types):
            out.append(f"{path}: expected {'/'.join(types)}, got {type(value).__name__}")
            return
    if "minimum" in sch and isinstance(value, int | float) and value < sch["minimum"]:
        out.append(f"{path}: {value} < minimum {sch['minimum']}")
    if isinstance(value, dict):
        for k in sch.get("required", ()):
            if k not in value:
                out.append(f"{path}: missing field {k!r}")
        props = sch.get("properties", {})
        addl = sch.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                _check(v, props[k], f"{path}.{k}", root, out)
            elif addl is False:
                out.append(f"{path}: unexpected field {k!r}")
            elif isinstance(addl, dict):
                _check(v, addl, f"{path}.{k}", root, out)
    if isinstance(value, list) and "items" in sch:
        for i, v in enumerate(value):
            _check(v, sch["items"], f"{path}[{i}]", root, out)


def validate(doc: Any) -> list[str]:
    """Problems with a results document ([] when it conforms to SCHEMA)."""
    out: list[str] = []
    _check(doc, SCHEMA, "$", SCHEMA, out)
    return out


def field_list() -> dict[str, list[str]]:
    """The documented fields, per object (what the golden-list test pins)."""
    return {
        "document": list(SCHEMA["required"]),
        "machine": list(SCHEMA["properties"]["machine"]["required"]),
        "versions": list(SCHEMA["properties"]["versions"]["required"]),
        "measurement": list(MEASUREMENT["required"]),
        "stats": list(STATS["required"]),
        "ratio": list(RATIO["required"]),
        "leak_check": list(LEAK_CHECK["required"]),
        "leak_item": list(LEAK_ITEM["required"]),
        "headline_row": list(HEADLINE_ROW["required"]),
    }
