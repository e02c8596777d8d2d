"""``agentkernel bench compare A.json B.json``: what changed from run A to run B.

Measurements are matched by ``id`` (``suite/backend/name``) and compared by median (p50): the change in
milliseconds and in percent (B relative to A; negative = B faster). Ratios to the raw engines are
compared too: they are measured interleaved within each run, so they are the better signal when A and
B ran on different machines or under different load. A change is flagged when it exceeds
``threshold`` percent (default 10). Documents of different schema versions are refused.
"""

from __future__ import annotations

import json
from typing import Any

from .report import _table, fmt_ms
from .schema import SCHEMA_NAME, SCHEMA_VERSION


class CompareError(Exception):
    pass


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None
    if doc.get("schema") != SCHEMA_NAME:
        raise CompareError(f"{path} is not an agentkernel bench result (schema {doc.get('schema')!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CompareError(f"{path} has schema version {doc.get('schema_version')}, this agentkernel reads "
                           f"{SCHEMA_VERSION}")
    return doc


def _pct(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return round((b - a) / a * 100, 2)


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 10.0) -> dict[str, Any]:
    ma = {m["id"]: m for m in a.get("measurements", [])}
    mb = {m["id"]: m for m in b.get("measurements", [])}
    rows = []
    for mid in list(dict.fromkeys([*ma, *mb])):
        x, y = ma.get(mid), mb.get(mid)
        pa = x["stats"]["p50_ms"] if x and x["available"] else None
        pb = y["stats"]["p50_ms"] if y and y["available"] else None
        pct = _pct(pa, pb)
        rows.append({"id": mid, "label": (y or x)["label"], "a_p50_ms": pa, "b_p50_ms": pb,
                     "delta_ms": round(pb - pa, 6) if pa is not None and pb is not None else None, "delta_pct": pct,
                     "flag": pct is not None and abs(pct) >= threshold,
                     "note": "only in A" if y is None else ("only in B" if x is None else None)})
    ra = {r["id"]: r for r in a.get("ratios", [])}
    rb = {r["id"]: r for r in b.get("ratios", [])}
    ratios = []
    for rid in list(dict.fromkeys([*ra, *rb])):
        x, y = ra.get(rid), rb.get(rid)
        va, vb = (x or {}).get("ratio"), (y or {}).get("ratio")
        pct = _pct(va, vb)
        ratios.append({"id": rid, "label": (y or x)["label"], "a_ratio": va, "b_ratio": vb, "delta_pct": pct,
                       "flag": pct is not None and abs(pct) >= threshold})
    same_machine = {k: a["machine"].get(k) for k in ("cpu_model", "cores", "memory_mib", "kernel")} == \
        {k: b["machine"].get(k) for k in ("cpu_model", "cores", "memory_mib", "kernel")}
    return {"a": {"run_id": a["run_id"], "date": a["date"], "commit": a["git"].get("commit"),
                  "machine": a["machine"].get("cpu_model")},
            "b": {"run_id": b["run_id"], "date": b["date"], "commit": b["git"].get("commit"),
                  "machine": b["machine"].get("cpu_model")},
            "same_machine": same_machine, "threshold_pct": threshold, "measurements": rows, "ratios": ratios}


def format_compare(c: dict[str, Any], only_flagged: bool = False) -> str:
    def pct(x: float | None) -> str:
        return "\u2013" if x is None else f"{x:+.1f}%"

    out = [f"A: run {c['a']['run_id']} ({c['a']['date']}, git {(c['a']['commit'] or '?')[:10]}, {c['a']['machine']})",
           f"B: run {c['b']['run_id']} ({c['b']['date']}, git {(c['b']['commit'] or '?')[:10]}, {c['b']['machine']})"]
    if not c["same_machine"]:
        out.append("note: different machines: compare the ratios, not the absolute times")
    out.append("")
    rows = [[("**" if r["flag"] else "") + r["id"] + ("**" if r["flag"] else ""), fmt_ms(r["a_p50_ms"]),
             fmt_ms(r["b_p50_ms"]), pct(r["delta_pct"]), r["note"] or ""]
            for r in c["measurements"] if (r["flag"] or not only_flagged)]
    out += _table(["Measurement (p50)", "A", "B", "Change", ""], rows)
    out.append("")
    rrows = [[("**" if r["flag"] else "") + r["label"] + ("**" if r["flag"] else ""),
              "\u2013" if r["a_ratio"] is None else f"{r['a_ratio']:.3f}",
              "\u2013" if r["b_ratio"] is None else f"{r['b_ratio']:.3f}", pct(r["delta_pct"])]
             for r in c["ratios"] if (r["flag"] or not only_flagged)]
    if rrows:
        out += _table(["Ratio (ours / raw)", "A", "B", "Change"], rrows)
        out.append("")
    flagged = sum(1 for r in c["measurements"] if r["flag"]) + sum(1 for r in c["ratios"] if r["flag"])
    out.append(f"{flagged} changes of {c['threshold_pct']:g}% or more (bold).")
    return "\n".join(out) + "\n"
