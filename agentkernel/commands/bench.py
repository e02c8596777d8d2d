"""``agentkernel bench``: the benchmark and stress suite (agentkernel.bench), and its tools.

    agentkernel bench [--backends podman,wasm] [--suite headline,phases] [--iterations N] [--quick]
                      [--out benchmark-results] [--docs docs]
    agentkernel bench compare A.json B.json [--threshold PCT] [--only-changes]
    agentkernel bench report RESULT.json [--out DIR] [--docs DIR]
    agentkernel bench schema

Environment (as the reference's tests): STRESS_VM_COUNT, STRESS_MAX_CONCURRENT, BENCH_SANDBOXES,
BENCH_ITERATIONS, BENCH_MAX_CONCURRENT. Flags win over them.
"""

from __future__ import annotations

import json
import os
import sys


def _csv(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark and stress suite (writes benchmark-results/)",
                       description="Reproduce the reference's benchmark tables beside the raw engines.")
    p.add_argument("--backends", "-b", help="comma-separated backends (default: every backend; unavailable ones "
                   "are reported with the doctor's reason)")
    p.add_argument("--suite", "--suites", dest="suites", help="comma-separated suites: headline, phases, baselines, "
                   "inproc, daemon, throughput, concurrency, stress, lifecycle, wasm, orchestration, egress, speed, "
                   "soak, live (default: all but soak and live)")
    p.add_argument("--iterations", "-n", type=int, help="measured runs per command (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up runs per command, not measured (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run in about a minute)")
    p.add_argument("--out", default="benchmark-results", help="output directory (default benchmark-results)")
    p.add_argument("--docs", nargs="?", const="docs", default=None, metavar="DIR",
                   help="also write DIR/benchmarks.md and DIR/benchmarks/*.png (default DIR: docs)")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--stress-reference", action="store_true",
                   help="stress suite at the reference's full sizes: STRESS_VM_COUNT=1000 STRESS_MAX_CONCURRENT=100")
    p.add_argument("--soak-s", type=float, metavar="S",
                   help="soak suite: duration in seconds (default 3600, --quick 20; env SOAK_S)")
    p.add_argument("--live", type=int, metavar="N",
                   help="speed and live suites: live pooled sandboxes held by the daemon (default 200, --quick 10)")
    p.add_argument("--speed-rows", metavar="ROWS",
                   help="speed suite: only these rows, comma-separated: back_to_back (with paced), serve, "
                   "wasm_pipelined, oci_cold, live (default: all; env SPEED_ROWS)")
    p.add_argument("--runs-total", type=int, metavar="N", help="throughput suite: runs (default 100)")
    p.add_argument("--runs-concurrency", type=int, metavar="C", help="throughput suite: concurrency (default 10)")
    p.add_argument("--concurrent", type=int, metavar="N", help="concurrency suite: runs at once (default 100)")
    p.add_argument("--scale", help="concurrency suite: sandboxes alive, comma-separated (default 5,10,20)")
    p.add_argument("--exec-calls", type=int, metavar="N", help="baselines suite: sequential exec calls (default 50)")
    p.add_argument("--settle", type=float, default=10.0, metavar="S",
                   help="leak check: seconds to let clean-up finish before reporting (default 10)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a leak check is not clean, a stress run is below 100%% success, or a suite failed")
    bsub = p.add_subparsers(dest="bench_cmd", metavar="TOOL")
    c = bsub.add_parser("compare", help="compare two result files (B relative to A)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--threshold", type=float, default=10.0, metavar="PCT", help="flag changes of PCT%% or more")
    c.add_argument("--only-changes", action="store_true", help="list only flagged changes")
    c.add_argument("--json", action="store_true")
    r = bsub.add_parser("report", help="re-render the Markdown report and charts from result files (several: "
                        "one combined report, later runs winning for the same suite and backend)")
    r.add_argument("result", nargs="+")
    r.add_argument("--out", dest="report_out", help="directory (default: next to the result file)")
    r.add_argument("--docs", dest="report_docs", nargs="?", const="docs", default=None, metavar="DIR")
    r.add_argument("--no-charts", dest="report_no_charts", action="store_true")
    bsub.add_parser("schema", help="print the JSON schema of result files")


def bench_cmd(args) -> int:
    tool = getattr(args, "bench_cmd", None)
    if tool == "compare":
        return _compare(args)
    if tool == "report":
        return _report(args)
    if tool == "schema":
        from ..bench.schema import SCHEMA

        print(json.dumps(SCHEMA, indent=2))
        return 0
    return _run(args)


def _run(args) -> int:
    from ..bench.harness import BenchConfig
    from ..bench.report import closing_note
    from ..bench.runner import run_bench

    scale = None
    if args.scale:
        try:
            scale = [int(x) for x in _csv(args.scale) or []]
        except ValueError:
            print("agentkernel bench: --scale takes integers, e.g. 5,10,20", file=sys.stderr)
            return 2
    for name in ("iterations", "warmup", "runs_total", "runs_concurrency", "concurrent", "exec_calls"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            print(f"agentkernel bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.soak_s is not None:
        os.environ["SOAK_S"] = str(args.soak_s)
    if args.live is not None:
        os.environ["SPEED_LIVE"] = str(args.live)
    if args.speed_rows is not None:
        from ..bench.suites.sustained import speed_rows

        os.environ["SPEED_ROWS"] = args.speed_rows
        try:
            speed_rows()
        except ValueError as exc:
            print(f"agentkernel bench: --speed-rows: {exc}", file=sys.stderr)
            return 2
    stress = (1000, 100) if args.stress_reference else (None, None)
    cfg = BenchConfig(backends=_csv(args.backends), suites=_csv(args.suites), iterations=args.iterations,
                      stress_count=stress[0], stress_concurrency=stress[1],
                      warmup=args.warmup, quick=args.quick, out_dir=args.out, charts=not args.no_charts,
                      docs_dir=args.docs, runs_total=args.runs_total, runs_concurrency=args.runs_concurrency,
                      concurrent_n=args.concurrent, scale_counts=scale, exec_calls=args.exec_calls,
                      settle_s=args.settle, progress=not args.no_progress)
    res = run_bench(cfg)
    doc = res["doc"]
    print(closing_note(doc))
    print()
    print(f"results:  {res['json']}")
    print(f"report:   {res['markdown']}")
    for p in res.get("charts", []):
        print(f"chart:    {p}")
    if res.get("docs"):
        print(f"docs:     {res['docs']}")
    bad_leaks = [lc for lc in doc["leak_checks"] if not lc["clean"]]
    for lc in bad_leaks:
        print(f"leak check {lc['label']}: {lc['leak_count']} leaked ({lc['attributed_count']} attributed to this run)",
              file=sys.stderr)
    for e in doc["errors"]:
        print(f"error: {e['suite']}/{e.get('backend') or '-'}: {e['message'].splitlines()[0][:300]}", file=sys.stderr)
    if args.strict:
        low = [b for b, r in (doc["results"].get("stress") or {}).items()
               if r.get("available") and r.get("success_rate") != 1]
        if bad_leaks or doc["errors"] or low:
            return 1
    return 0


def _compare(args) -> int:
    from ..bench.compare import CompareError, compare, format_compare, load

    try:
        c = compare(load(args.a), load(args.b), threshold=args.threshold)
    except CompareError as exc:
        print(f"agentkernel bench compare: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(c, indent=2))
    else:
        sys.stdout.write(format_compare(c, only_flagged=args.only_changes))
    return 0


def _report(args) -> int:
    import os

    from ..bench.compare import CompareError, load
    from ..bench.merge import MergeError, merge
    from ..bench.runner import write_outputs

    try:
        doc = merge([load(p) for p in args.result])
    except (CompareError, MergeError) as exc:
        print(f"agentkernel bench report: {exc}", file=sys.stderr)
        return 2
    out = args.report_out or os.path.dirname(os.path.abspath(args.result[0]))
    res = write_outputs(doc, out, charts=not args.report_no_charts, docs_dir=args.report_docs)
    print(f"report:   {res['markdown']}")
    for p in res.get("charts", []):
        print(f"chart:    {p}")
    if res.get("docs"):
        print(f"docs:     {res['docs']}")
    return 0
