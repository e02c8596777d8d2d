"""Run the selected suites and write the outputs: ``<out>/bench-<run id>.json`` (schema.py), the Markdown
report ``bench-<run id>.md`` and the PNG charts ``bench-<run id>-*.png``; with ``docs_dir`` also
``<docs_dir>/benchmarks.md``, ``<docs_dir>/benchmarks/*.png`` and ``<docs_dir>/benchmarks/results.json``
(the committed report and its data).

A whole-run leak check brackets the run (baseline before the first suite, check after the last);
stress and lifecycle suites also check after each of their runs.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from . import leaks, machine, schema
from .harness import BenchConfig, BenchContext, write_json
from .suites import SUITES


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Returns {"doc": the results document, "json": path, "markdown": path, "charts": [paths], ...}."""
    ctx = BenchContext(cfg)
    out: dict[str, Any] = {}
    try:
        ctx.progress.note(f"run {ctx.run_id}: backends {', '.join(cfg.backends)}; suites {', '.join(cfg.suites)}; "
                          f"{cfg.iterations} iterations (+{cfg.warmup} warm-up)")
        ctx.doctor()
        for b in cfg.backends:
            e = ctx.doc["backends"][b]
            if not e["available"]:
                ctx.progress.note(f"{b}: unavailable: {e['reason']}")
        scope = leaks.LeakScope.for_context(ctx)
        baseline = leaks.snapshot(scope)
        ctx.leak_baseline = baseline
        for suite in cfg.suites:
            target = SUITES[suite]
            mod_name, fn_name = target.split(":")
            t0 = time.monotonic()
            try:
                fn = getattr(importlib.import_module(mod_name), fn_name)
                fn(ctx)
            except Exception as exc:  # one suite failing must not lose the others' numbers
                import traceback

                ctx.error(suite, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
            ctx.progress.note(f"suite {suite} finished in {time.monotonic() - t0:.1f} s")
        rep = leaks.check(scope, baseline, settle_s=cfg.settle_s, label="whole run")
        rep["suite"], rep["backend"] = "run", None
        rep["removed"] = leaks.cleanup(rep, scope)
        ctx.doc["leak_checks"].append(rep)
        ctx.progress.note(leaks.format_report(rep))
        ctx.doc["duration_s"] = round(time.time() - ctx.t0, 3)
        ctx.doc["machine"]["loadavg_end"] = machine.loadavg()
        doc = schema.finalize(ctx.doc)
        problems = schema.validate(doc)
        if problems:
            ctx.doc["errors"].append({"suite": "schema", "backend": None, "message": "; ".join(problems[:10])})
        out.update(write_outputs(doc, cfg.out_dir, charts=cfg.charts, docs_dir=cfg.docs_dir, progress=ctx.progress))
        out["doc"] = doc
        return out
    finally:
        ctx.close()


def write_outputs(doc: dict[str, Any], out_dir: str, *, charts: bool = True, docs_dir: str | None = None,
                  progress=None) -> dict[str, Any]:
    """JSON + Markdown + charts for a results document (also used by ``bench report``)."""
    from . import report

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"bench-{doc['run_id']}")
    write_json(stem + ".json", doc)
    chart_paths: dict[str, str] = {}
    if charts:
        chart_paths = _charts(doc, stem + "-", progress)
    md = report.render(doc, {k: os.path.basename(v) for k, v in chart_paths.items()},
                       json_name=os.path.basename(stem + ".json"))
    with open(stem + ".md", "w") as f:
        f.write(md)
    res = {"json": stem + ".json", "markdown": stem + ".md", "charts": list(chart_paths.values())}
    if docs_dir:
        img_dir = os.path.join(docs_dir, "benchmarks")
        os.makedirs(img_dir, exist_ok=True)
        doc_charts = _charts(doc, os.path.join(img_dir, ""), progress) if charts else {}
        rel = {k: os.path.relpath(v, docs_dir) for k, v in doc_charts.items()}
        write_json(os.path.join(img_dir, "results.json"), compact(doc))
        md = report.render(doc, rel, json_name="benchmarks/results.json", for_docs=True)
        with open(os.path.join(docs_dir, "benchmarks.md"), "w") as f:
            f.write(md)
        res["docs"] = os.path.join(docs_dir, "benchmarks.md")
        res["docs_charts"] = list(doc_charts.values())
    return res


def compact(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without the per-sandbox ``details`` rows of the stress and lifecycle results (the
    copy committed under docs/ stays small; benchmark-results/ keeps everything)."""
    import copy

    out = copy.deepcopy(doc)
    for suite in ("stress", "lifecycle"):
        for r in (out.get("results", {}).get(suite) or {}).values():
            if not isinstance(r, dict):
                continue
            r.pop("details", None)
            if isinstance(r.get("single"), dict):
                r["single"].pop("details", None)
            for run in r.get("runs", []) or []:
                run.pop("details", None)
    out["config"]["compacted"] = True
    return out


def _charts(doc: dict[str, Any], prefix: str, progress) -> dict[str, str]:
    try:
        from . import charts
    except ImportError as exc:
        if progress:
            progress.note(f"no charts: {exc} (pip install 'agentkernel-sandbox[bench]')")
        return {}
    try:
        return charts.render_all(doc, prefix)
    except ImportError as exc:
        if progress:
            progress.note(f"no charts: {exc} (pip install 'agentkernel-sandbox[bench]')")
        return {}
