"""One report from several result documents (``agentkernel bench report A.json B.json ...``): the soak,
the reference-size stress and the live-sandbox runs each take long and run separately; the benchmark page
shows them together, each figure still naming its own run (date, load, commit) in ``config.merged_from``.

Later documents win for the same result (suite, backend), measurement id or ratio id; leak checks and
errors are kept from every run, their labels prefixed with the run they came from.
"""

from __future__ import annotations

import copy
from typing import Any

from . import schema


class MergeError(ValueError):
    pass


def run_summaries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a document holds: its own, or the runs it was merged from (a report merged again keeps
    every run's own date, load, commit and settings)."""
    merged = (doc.get("config") or {}).get("merged_from")
    return [dict(r) for r in merged] if merged else [run_summary(doc)]


def run_summary(doc: dict[str, Any]) -> dict[str, Any]:
    m, cfg = doc.get("machine") or {}, doc.get("config") or {}
    return {"run_id": doc["run_id"], "date": doc["date"], "duration_s": doc.get("duration_s"),
            "suites": cfg.get("suites"), "backends": cfg.get("backends"),
            "iterations": cfg.get("iterations"), "warmup": cfg.get("warmup"), "quick": cfg.get("quick"),
            "commit": (doc.get("git") or {}).get("commit"), "dirty": (doc.get("git") or {}).get("dirty"),
            "loadavg_start": m.get("loadavg_start"),
            "loadavg_end": m.get("loadavg_end"), "hostname": m.get("hostname"),
            "results": sorted(f"{s}/{b}" for s, r in (doc.get("results") or {}).items() for b in r)}


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    if not docs:
        raise MergeError("no result documents to merge")
    hosts = {(d.get("machine") or {}).get("hostname") for d in docs}
    if len(hosts) > 1:
        raise MergeError(f"results from different machines cannot share one report: {sorted(map(str, hosts))}")
    docs = sorted(docs, key=lambda d: d["date"])
    out = copy.deepcopy(docs[0])
    if len(docs) == 1:
        return out
    runs = [r for d in docs for r in run_summaries(d)]
    meas = {m["id"]: m for m in out["measurements"]}
    ratios = {r["id"]: r for r in out["ratios"]}
    out["leak_checks"] = [_tag(lc, docs[0]) for lc in out["leak_checks"]]
    out["errors"] = [_tag_error(e, docs[0]) for e in out["errors"]]
    for d in docs[1:]:
        d = copy.deepcopy(d)
        for suite, by_backend in (d.get("results") or {}).items():
            out["results"].setdefault(suite, {}).update(by_backend)
        for m in d["measurements"]:
            meas[m["id"]] = m
        for r in d["ratios"]:
            ratios[r["id"]] = r
        for b, e in d["backends"].items():
            if e.get("available") or b not in out["backends"]:
                out["backends"][b] = e
        out["leak_checks"] += [_tag(lc, d) for lc in d["leak_checks"]]
        out["errors"] += [_tag_error(e, d) for e in d["errors"]]
        for k, v in (d.get("versions") or {}).items():
            out["versions"][k] = out["versions"].get(k) or v
    out["measurements"] = list(meas.values())
    out["ratios"] = list(ratios.values())
    out["run_id"] = f"{docs[0]['run_id']}+{len(docs) - 1}"
    out["date"] = docs[0]["date"]
    out["duration_s"] = round(sum(d.get("duration_s") or 0 for d in docs), 3)
    out["machine"] = copy.deepcopy(docs[-1]["machine"])  # the newest description of the machine
    out["machine"]["loadavg_start"] = docs[0]["machine"].get("loadavg_start")
    out["machine"]["loadavg_end"] = docs[-1]["machine"].get("loadavg_end")
    out["git"] = {"commit": docs[-1]["git"].get("commit"), "dirty": any(d["git"].get("dirty") for d in docs)}
    suites = []
    for d in docs:
        suites += [s for s in d["config"].get("suites", []) if s not in suites]
    backends = []
    for d in docs:
        backends += [b for b in d["config"].get("backends", []) if b not in backends]
    out["config"] = {**docs[-1]["config"], "suites": suites, "backends": backends, "merged_from": runs}
    return schema.finalize(out)


def _tag(lc: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": doc["run_id"], **lc}  # one from an earlier merge keeps the run it came from


def _tag_error(e: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    msg = e["message"]
    tagged = msg[:1] == "[" and msg[1:9].isdigit()  # "[<run id>] ...": from an earlier merge
    return e if tagged else {**e, "message": f"[{doc['run_id']}] {msg}"}
