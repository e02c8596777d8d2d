"""The Markdown report: the reference page's tables, in its layouts, with our numbers from one run and a
"Reference" column holding the reference's published figure (AMD EPYC / M3 Pro, their hardware: compare
ratios, not absolutes). Rows for backends that could not run say "unavailable: <doctor's reason>".
Standard library only; renders from the results document alone (``agentkernel bench report X.json``).
"""

from __future__ import annotations

import collections
from typing import Any

from .machine import short_label

# The reference's published numbers (reference/agentkernel-benchmarks.txt), by the table they belong to.
REF_HEADLINE = {
    ("wasm", "warm"): "Hyperlight pool: <1µs, ~3,300 RPS",
    ("qemu", "warm"): "Firecracker daemon: 195ms, ~5.1/s",
    ("qemu", "cold"): "Firecracker cold: 800ms, ~1.3/s",
    ("firecracker", "warm"): "Firecracker daemon: 195ms, ~5.1/s",
    ("firecracker", "cold"): "Firecracker cold: 800ms, ~1.3/s",
    ("docker", "warm"): "Docker pool (Linux): ~250ms, ~4.0/s",
    ("docker", "cold"): "Docker (Linux): ~350ms",
    ("podman", "cold"): "Podman (Linux): ~310ms, ~3.2/s",
    ("podman", "warm"): "(no Podman pool; Docker pool ~250ms)",
    ("kubernetes", "cold"): "Kubernetes (remote): ~570ms, ~7.7/s",
    ("nomad", "cold"): "Nomad (remote): ~570ms, ~6.1/s",
    ("apple", "cold"): "Apple Containers: ~940ms, ~1.1/s",
    ("oci", "cold"): "(no engine-less backend in the reference)",
    ("gvisor", "cold"): "(no gVisor backend in the reference)",
}
REF_PHASES = {
    ("wasm", "warm"): "Hyperlight pool: 0ms / <1µs / <1ms / N/A",
    ("qemu", "warm"): "Firecracker daemon: 0 / 0 / 19 / 0 ms",
    ("qemu", "cold"): "Firecracker cold: 78 / 110 / 19 / 20 ms",
    ("firecracker", "cold"): "Firecracker cold: 78 / 110 / 19 / 20 ms",
    ("apple", "cold"): "Apple: 860 / 860 / 95 / 37 ms",
    ("docker", "cold"): "Docker/Podman: one combined `run --rm` step",
    ("podman", "cold"): "Docker/Podman: one combined `run --rm` step",
}
REF_DAEMON = {"first": ("800ms", "195ms", "4.1x"), "subsequent": ("800ms", "195ms", "4.1x"),
              "seq10": ("8.0s", "1.95s", "4.1x"), "reuse": ("0%", "~95%", "--")}
REF_100 = {"wasm": "Hyperlight: 0.03s, ~3,333 RPS", "docker": "Docker: 8.4s, ~12 RPS",
           "podman": "Podman: 18.2s, ~5.5 RPS"}
REF_ONE_SHOT = {"docker": "580ms (Linux), 577ms (macOS)", "kubernetes": "571ms", "nomad": "569ms"}
REF_EXEC50 = {"docker": "67ms, 14.8/s (Linux)", "kubernetes": "128ms, 7.7/s", "nomad": "163ms, 6.1/s"}
REF_SINGLE_DOCKER = {"create": "47ms", "start": "198ms", "exec": "68ms", "stop": "152ms", "total": "465ms"}
REF_CONTAINER_LINUX = {"podman": ("~310ms", "~350ms"), "docker": ("~350ms", "~550ms")}
REF_STRESS10 = {"wall": "4.5s", "success": "100%", "lifecycle": "446ms", "create": "44ms", "start": "174ms",
                "exec": "83ms", "stop": "109ms", "remove": "41ms"}
REF_5X2 = {"throughput": "1.8-2.0/s", "p50": "498ms", "p95": "702ms", "p99": "1028ms"}
REF_10X10 = {"wall": "119.4s", "success": "100%", "avg": "1,194ms", "p50": "1,178ms", "p95": "1,458ms",
             "p99": "1,705ms", "throughput": "0.84/s"}
REF_VM = {"process start": ("40ms", "46ms"), "instance ready": ("155ms", "110ms"),
          "command execution": ("53ms", "19ms"),
          "shutdown": ("130ms", "20ms"), "memory per instance": ("~50-100MB", "<10MB")}
REF_SCALE = {"kubernetes": "5: 116ms/1.4s/5/5/124ms; 10: 134ms/1.4s/10/10/163ms; 20: 241ms/120s/15/20/287ms",
             "nomad": "5: 46ms/814ms/5/5/171ms; 10: 52ms/834ms/10/10/197ms; 20: 107ms/1.4s/20/20/310ms"}

NA = "\u2013"  # an en dash: "no value"

CONTAINER_ORDER = ("podman", "docker", "gvisor", "oci", "wasm", "qemu", "firecracker", "kubernetes", "nomad", "apple")


# ---- formatting --------------------------------------------------------------------------------------


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "\u2013"
    if x == 0:
        return "0 ms"
    if x < 0.001:
        return f"{x * 1e6:.0f} ns"
    if x < 1:
        return f"{x * 1e3:.1f} µs"
    if x < 100:
        return f"{x:.1f} ms"
    if x < 10000:
        return f"{x:,.0f} ms"
    return f"{x / 1000:.1f} s"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "\u2013"
    if x >= 100:
        return f"{x:,.0f}/s"
    return f"{x:.1f}/s"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "\u2013"
    if r < 1:
        return f"{r:.2f}x ({1 / r:.1f}x faster)"
    if r > 1:
        return f"{r:.2f}x (slower)"
    return "1.00x"


def fmt_pct(x: float | None) -> str:
    return "\u2013" if x is None else f"{x * 100:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    return out


class _Doc:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.m = {m["id"]: m for m in doc.get("measurements", [])}
        self.r = {r["id"]: r for r in doc.get("ratios", [])}
        self.res = doc.get("results", {})
        self.backends = doc.get("backends", {})

    def get(self, mid: str) -> dict[str, Any] | None:
        return self.m.get(mid)

    def p50(self, mid: str) -> float | None:
        m = self.m.get(mid)
        return m["stats"]["p50_ms"] if m else None

    def cell(self, mid: str, key: str = "p50_ms") -> str:
        m = self.m.get(mid)
        if m is None:
            return "not run"
        if not m["available"]:
            return f"unavailable: {m['reason']}"
        if m["stats"]["n"] == 0:
            return f"failed: {(m['errors'] or ['no successful run'])[0][:160]}"
        return fmt_ms(m["stats"][key])

    def ratio(self, ours: str, raw: str) -> float | None:
        r = self.r.get(f"{ours}~{raw}")
        return r["ratio"] if r else None

    def ordered(self) -> list[str]:
        names = list(self.backends)
        return sorted(names, key=lambda b: CONTAINER_ORDER.index(b) if b in CONTAINER_ORDER else 99)

    def unavailable(self, b: str) -> str | None:
        e = self.backends.get(b) or {}
        return None if e.get("available") else f"unavailable: {e.get('reason')}"


# ---- sections ----------------------------------------------------------------------------------------


def _header(d: _Doc, for_docs: bool, json_name: str | None) -> list[str]:
    doc = d.doc
    mach, ver, git, cfg = doc["machine"], doc["versions"], doc["git"], doc["config"]
    out = ["# agentkernel benchmarks", ""]
    if for_docs:
        out += ["Regenerate this page (and `docs/benchmarks/*.png`) on a quiet machine with one command:", "",
                "```", "scripts/benchmark.sh --docs", "```", "",
                "(= `agentkernel bench --docs docs`: every suite, every backend, the raw engines interleaved in the "
                "same run; a JSON copy of the run lands in `benchmark-results/`. How each number is measured: "
                "[benchmark-method.md](benchmark-method.md).)", ""]
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    runs = cfg.get("merged_from") or []
    if runs:
        when = (f"- **Dates**: {runs[0]['date']} to {runs[-1]['date']} ({len(runs)} runs, listed below with each "
                f"one's duration, load and commit); newest commit `{commit}`")
        load = ("- **Load average**: per run, below (a shared or busy machine makes every absolute number noisy; "
                "the ratios are measured interleaved and hold up better)")
    else:
        when = f"- **Date**: {doc['date']}; run `{doc['run_id']}`; {doc.get('duration_s') or 0:.0f} s; git `{commit}`"
        load = (f"- **Load average** at start {mach.get('loadavg_start')}, at end {mach.get('loadavg_end')} "
                f"(a shared or busy machine makes every absolute number noisy; the ratios are measured interleaved "
                "and hold up better)")
    out += [f"- **Machine**: {short_label(mach)}; {mach.get('os')}; virtualization: {mach.get('virtualization')}; "
            f"cgroups {mach.get('cgroup')}", when, load,
            "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v and k != "python_executable"),
            f"- **Settings**: {_settings(cfg)}; suites: {', '.join(cfg.get('suites', []))}",
            "- Latencies are medians (p50) of per-run samples, each a new process from spawn to exit with its "
            "output checked; the reference column is the reference's published number on its own hardware "
            "(AMD EPYC 16 cores / M3 Pro): compare ratios, not absolutes."]
    if runs:
        out.append(f"- **Combined from {len(runs)} runs** on this machine (each figure below comes from the run "
                   "that measured its suite; the load is the 1/5/15-minute load average at its start and end):")
        for r in runs:
            # runs merged before their settings were recorded (the merged document kept only the last run's)
            settings = f", {_settings(r)}" if r.get("iterations") is not None else ", settings not recorded"
            out.append(f"  - `{r['run_id']}`: {r['date']}, {r.get('duration_s') or 0:.0f} s{settings}, suites "
                       f"{', '.join(r.get('suites') or [])}, backends {', '.join(r.get('backends') or []) or 'all'}; "
                       f"load {r.get('loadavg_start')} -> {r.get('loadavg_end')}; git `{(r.get('commit') or '?')[:12]}`"
                       f"{' (dirty)' if r.get('dirty') else ''}")
    if json_name:
        out.append(f"- Raw data: `{json_name}`")
    out.append("")
    return out


def _settings(cfg: dict[str, Any]) -> str:
    """Runs per command and warm-up runs: of the run, or "per run" when merged runs differ (or did not say)."""
    runs = cfg.get("merged_from") or []
    if runs and len({(r.get("iterations"), r.get("warmup"), r.get("quick")) for r in runs}) != 1:
        return "runs per command and warm-up runs per run, below"
    c = runs[0] if runs else cfg
    return (f"{c.get('iterations')} measured runs per command after {c.get('warmup')} warm-up "
            f"runs{' (--quick)' if c.get('quick') else ''}")


def _headline(d: _Doc) -> list[str]:
    rows = []
    for row in d.doc.get("summary", {}).get("headline", []):
        b, mode = row["backend"], row["mode"]
        cell = d.cell(row["measurement"])
        rows.append([b, mode, cell, fmt_ms(row["p95_ms"]) if row["available"] and row["p50_ms"] else "\u2013",
                     fmt_rate(row["throughput_per_s"]) if row["available"] else "\u2013", row["isolation"] or "\u2013",
                     REF_HEADLINE.get((b, mode), "\u2013")])
    if not rows:
        return []
    return ["## The headline numbers: `agentkernel run -- echo hello`", "",
            "End to end as a user sees it: a new `agentkernel` process per run, from invocation to output. "
            "*cold* = `--no-daemon` (a fresh sandbox per run); *warm* = through the daemon's warm pool; "
            "throughput = 1 / median (sequential).", "",
            *_table(["Backend", "Mode", "Latency (p50)", "p95", "Throughput", "Isolation", "Reference"], rows), ""]


def _ratios(d: _Doc) -> list[str]:
    rows = []
    for r in d.doc.get("ratios", []):
        if r["suite"] != "headline":
            continue
        ours, raw = d.get(r["ours"]), d.get(r["raw"])
        if ours is None or raw is None:
            continue
        ratio = fmt_ratio(r["ratio"]) if r["available"] else (f"{NA} ({r['reason']})" if r.get("reason") else NA)
        rows.append([r["backend"], ours["label"], raw["label"], d.cell(r["ours"]), d.cell(r["raw"]), ratio])
    unavailable = [m for m in d.doc.get("measurements", []) if m["suite"] == "headline" and m["mode"] == "raw"
                   and not m["available"]]
    for m in unavailable:
        rows.append([m["backend"], "\u2013", m["label"], "\u2013", f"unavailable: {m['reason']}", "\u2013"])
    if not rows:
        return []
    return ["## Ours vs the raw engines (same run, interleaved)", "",
            "Ratio = our median / the raw engine's median, measured round-robin in one block so machine noise "
            "hits both. Below 1 means agentkernel is faster. \"+ our flags\" is the raw engine with the same "
            "hardening our one-shot applies (network none, cap-drop all, no-new-privileges, seccomp, user 1000, "
            "memory/cpu/pids limits).", "",
            *_table(["Backend", "Ours", "Raw engine", "Ours p50", "Raw p50", "Ratio (ours / raw)"], rows), ""]


def _goals(d: _Doc) -> list[str]:
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "\u2013" if ok is None else ("**pass**" if ok else "**miss**")

    w, rp = d.p50("headline/podman/warm"), d.ratio("headline/podman/warm", "headline/podman/raw_podman")
    rows.append(["daemon warm pool, podman: median ≤ 25 ms and ≥ 6x faster than `podman run --rm`",
                 f"{fmt_ms(w)}, {fmt_ratio(rp)}",
                 verdict(None if w is None or rp is None else (w <= 25 and rp <= 1 / 6))])
    for engine in ("podman", "docker"):
        rc = d.ratio(f"headline/{engine}/cold", f"headline/{engine}/raw_{engine}")
        rh = d.ratio(f"headline/{engine}/cold", f"headline/{engine}/raw_{engine}_hardened")
        rows.append([f"no daemon (cold), {engine}: ≤ 1.15x raw `{engine} run --rm`",
                     f"{fmt_ratio(rc)} vs plain; {fmt_ratio(rh)} vs same flags",
                     verdict(None if rc is None else rc <= 1.15)])
    oc, orr = d.p50("headline/oci/cold"), d.ratio("headline/oci/cold", "headline/oci/raw_podman")
    rows.append(["`run --backend oci`, cold: ≤ 60 ms and ≥ 2.5x faster than `podman run --rm`",
                 f"{fmt_ms(oc)}, {fmt_ratio(orr)}",
                 verdict(None if oc is None or orr is None else (oc <= 60 and orr <= 0.4))])
    ex = d.p50("phases/podman/exec_agent")
    xr = d.ratio("baselines/podman/exec_inproc", "baselines/podman/exec_raw")
    rows.append(["exec in a running sandbox via the agent: ≤ 3 ms median (podman, in-process)",
                 fmt_ms(ex) + (f"; vs `podman exec`, interleaved (baselines): {fmt_ratio(xr)}" if xr else ""),
                 verdict(None if ex is None else ex <= 3)])
    wa = d.p50("wasm/wasm/warm_acquire")
    wc = d.get("wasm/wasm/concurrent")
    tp = ((d.res.get("wasm") or {}).get("wasm") or {}).get("throughput") or {}
    cc_n = (wc or {}).get("extra", {}).get("concurrent_n")
    wcv = d.p50("wasm/wasm/concurrent")
    rows.append(["wasm: pool acquire < 1 µs; 100 concurrent `echo hello` < 30 ms; ≥ 3,333 runs/s (sustained, "
                 "in-process)",
                 f"{fmt_ms(wa)}; {fmt_ms(wcv)} for {cc_n}; {tp.get('runs_per_s', NA)} runs/s",
                 verdict(None if wa is None or wcv is None or cc_n != 100 else
                         (wa < 0.001 and wcv < 30 and (tp.get("runs_per_s") or 0) >= 3333))])
    q = d.unavailable("qemu")
    qw, qs = d.p50("headline/qemu/warm"), d.p50("headline/qemu/snapshot")
    rows.append(["qemu microVM: warm-pool run ≤ 50 ms; snapshot restore ≤ 200 ms",
                 q or f"{d.cell('headline/qemu/warm')}; {d.cell('headline/qemu/snapshot')}",
                 "\u2013" if q else verdict(None if qw is None or qs is None else (qw <= 50 and qs <= 200))])
    tc, tr = d.get("throughput/podman/runs_cold"), d.get("throughput/podman/runs_raw_podman")
    if tc and tr and tc["available"] and tr["available"]:
        wc_, wr_ = tc["extra"].get("wall_ms"), tr["extra"].get("wall_ms")
        ok = wc_ is not None and wr_ is not None and wc_ <= wr_ and tc["failures"] == 0
        rows.append([f"throughput {tc['extra'].get('total')} runs / {tc['extra'].get('concurrency')} concurrent, "
                     "podman: ≥ raw podman, 100% success",
                     f"{fmt_ms(wc_)} vs raw {fmt_ms(wr_)}, {fmt_pct(tc['success_rate'])}", verdict(ok)])
    to = d.get("throughput/oci/runs_cold")
    if to and to["available"] and to["extra"].get("total") == 100 and to["extra"].get("concurrency") == 10:
        wo = to["extra"].get("wall_ms")
        rows.append(["`run --backend oci`: 100 runs / 10 concurrent ≤ 2.5 s, 100% success",
                     f"{fmt_ms(wo)}, {fmt_pct(to['success_rate'])}",
                     verdict(None if wo is None else (wo <= 2500 and to["failures"] == 0))])
    for b, r in sorted((d.res.get("stress") or {}).items()):
        if not r.get("available"):
            continue
        lc = r.get("leak_check") or {}
        ok = r.get("success_rate") == 1 and lc.get("clean")
        rows.append([f"stress {b} ({r.get('count')} sandboxes, {r.get('max_concurrent')} concurrent): 100% success, "
                     "0 leaked", f"{fmt_pct(r.get('success_rate'))}, {lc.get('leak_count', NA)} leaked", verdict(ok)])
    pss = ((d.res.get("phases") or {}).get("podman") or {}).get("idle_pss_mib")
    if pss:
        rows.append(["idle pooled container (podman): ≤ 2 MiB PSS overhead", f"{pss['total']:.2f} MiB",
                     verdict(pss["total"] <= 2)])
    for where, r in _inproc_ratios(d):
        paired = _paired(d, r)
        rows.append([f"in-process `Sandbox.run` ≤ CLI one-shot (no pool), {where}",
                     f"{d.cell(r['ours'])} vs {d.cell(r['raw'])}, {fmt_ratio(r['ratio'])}"
                     + (f" (paired per round {paired:.2f}x)" if paired else ""),
                     verdict(r["ratio"] <= 1 if r["available"] else None)])
    return ["## Design goals (DESIGN.md), checked on this run", "",
            *_table(["Goal", "Measured", "Verdict"], rows), ""]


def _phases(d: _Doc) -> list[str]:
    rows = []
    for b in d.ordered():
        for mode in ("cold", "warm"):
            tot = d.get(f"phases/{b}/{mode}_total")
            if tot is None:
                continue
            if not tot["available"] or tot["stats"]["n"] == 0:
                rows.append([b, mode, d.cell(f"phases/{b}/{mode}_total"), "", "", "", "",
                             REF_PHASES.get((b, mode), NA)])
                continue
            rows.append([b, mode, *(d.cell(f"phases/{b}/{mode}_{p}") for p in ("boot", "ready", "exec", "shutdown")),
                         d.cell(f"phases/{b}/{mode}_total"), REF_PHASES.get((b, mode), "\u2013")])
    if not rows:
        return []
    out = ["## Where the time goes (phases)", "",
           "In-process, from the backends' own phase timings (no CLI start-up): *cold* = `Backend.run` "
           "(boot = create, ready = start until the agent answers, exec, shutdown = remove); *warm* = the "
           "daemon's pool (ready = hand-out + health check; boot and shutdown happen off the request path). "
           "The cold row times the step-by-step path on purpose (each phase needs a time of its own); a plain "
           "`Sandbox.run` takes the one-shot path instead (suite `inproc`).", "",
           *_table(["Backend", "Mode", "Boot", "Ready", "Exec", "Shutdown", "Total", "Reference"], rows), ""]
    rows2 = []
    for b in d.ordered():
        m = d.get(f"phases/{b}/exec_agent")
        if m is None:
            continue
        pss = ((d.res.get("phases") or {}).get(b) or {}).get("idle_pss_mib")
        rows2.append([b, d.cell(f"phases/{b}/exec_agent"), d.cell(f"phases/{b}/exec_agent", "p95_ms"),
                      *(d.cell(f"phases/{b}/named_{op}") for op in ("create", "start", "stop", "remove")),
                      f"{pss['total']:.2f} MiB" if pss else "\u2013"])
    if rows2:
        out += ["Named sandboxes, in-process: exec through the agent in a running sandbox, lifecycle steps, and "
                "the PSS of every host process of one idle sandbox (engine helper + agent).", "",
                *_table(["Backend", "Exec p50", "Exec p95", "Create", "Start", "Stop", "Remove", "Idle memory (PSS)"],
                        rows2), ""]
    return out


def _vm_vs_container(d: _Doc) -> list[str]:
    cols = [b for b in ("docker", "podman", "oci", "qemu") if b in d.backends]
    if not cols:
        return []

    def val(b: str, metric: str) -> str:
        u = d.unavailable(b)
        if u:
            return u
        key = {"process start": "named_create", "instance ready": "named_start", "command execution": "exec_agent",
               "shutdown": "named_stop"}.get(metric)
        if key:
            return d.cell(f"phases/{b}/{key}")
        pss = ((d.res.get("phases") or {}).get(b) or {}).get("idle_pss_mib")
        return f"{pss['total']:.2f} MiB PSS" if pss else "\u2013"

    rows = [[metric.capitalize(), *(val(b, metric) for b in cols), *REF_VM[metric]] for metric in REF_VM]
    rows.append(["Isolation", *((d.backends.get(b) or {}).get("isolation") or "\u2013" for b in cols),
                 "Shared kernel", "Separate kernel"])
    return ["## VM vs container (reference: \"Firecracker vs Docker\")", "",
            "Same metrics as the reference's table, from the in-process phases suite (process start = create, "
            "instance ready = start until the agent answers, command execution = exec via the agent, shutdown = "
            "stop).", "",
            *_table(["Metric", *cols, "Reference Docker", "Reference Firecracker"], rows), ""]


def _wasm(d: _Doc) -> list[str]:
    r = (d.res.get("wasm") or {}).get("wasm")
    if not r:
        return []
    if not r.get("available"):
        return ["## Wasm (reference: \"Hyperlight\")", "", f"unavailable: {r.get('reason')}", ""]
    cs = r.get("cold_start") or {}
    c = cs.get("cold_start") or {}
    wa = (r.get("warm_acquire") or {}).get("warm_acquire") or {}
    fc = r.get("function_call") or {}
    cc = r.get("concurrent") or {}
    tp = r.get("throughput") or {}

    def us(v):
        return "\u2013" if v is None else fmt_ms(v / 1e3)

    rows = [
        ["Cold startup (new process, in-process part)",
         f"{fmt_ms(c.get('mean_ms'))} (avg), {fmt_ms(c.get('median_ms'))} (p50)",
         "68ms (avg), 67ms (p50)"],
        ["Cold startup, whole process", fmt_ms((cs.get("process_wall") or {}).get("median_ms")), "\u2013"],
        ["Warm acquire", f"{us(wa.get('mean_us'))} (avg), {us(wa.get('median_us'))} (p50)", "0.2µs (avg), <1µs (p50)"],
        ["Function call (live instance / fresh pooled instance)",
         f"{us((fc.get('call_warm_instance') or {}).get('median_us'))} / "
         f"{us((fc.get('call_fresh_pooled_instance') or {}).get('median_us'))}", "<1ms"],
        [f"{cc.get('concurrent_n', NA)} concurrent requests (in-process)",
         f"{fmt_ms((cc.get('total') or {}).get('median_ms'))} (~{cc.get('rps_at_median', NA):,} RPS)"
         if cc.get("rps_at_median") else "\u2013", "0.03s (~3,333 RPS)"],
        ["Sustained sequential runs (in-process, pool refilling)", f"{tp.get('runs_per_s', NA)}/s", "\u2013"],
    ]
    for conc, dt in sorted(((r.get("daemon_throughput") or {}).get("by_concurrency") or {}).items()):
        rows.append([f"Through the daemon, {conc} client thread(s), a connection per run",
                     f"{dt.get('runs_per_s', NA)}/s (p50 {fmt_ms((dt.get('latency') or {}).get('median_ms'))} "
                     "per run)", "\u2013"])
    engine = cs.get("engine") or "wasmtime"
    return ["## Wasm: the pool (reference: \"Hyperlight: sub-microsecond execution\")", "",
            f"In-process numbers from `wasm_bench` ({engine}; the reference's Hyperlight runs Wasm inside a "
            "hypervisor micro-VM, which needs hardware KVM: see the wasm row of the headline).", "",
            *_table(["Metric", "Value", "Reference (Hyperlight)"], rows), ""]


def _concurrent(d: _Doc, suite: str, title: str, intro: str, refs: dict[str, str]) -> list[str]:
    rows = []
    for m in d.doc.get("measurements", []):
        if m["suite"] != suite or m["kind"] != "latency":
            continue
        b = m["backend"]
        if not m["available"]:
            rows.append([b, m["mode"], f"unavailable: {m['reason']}", "", "", "", "", refs.get(b, "\u2013")])
            continue
        e = m["extra"]
        rows.append([b, m["label"].split(":")[0], fmt_ms(e.get("wall_ms")), fmt_rate(e.get("runs_per_s")),
                     fmt_pct(m["success_rate"]), fmt_ms(m["stats"]["p50_ms"]), fmt_ms(m["stats"]["p95_ms"]),
                     refs.get(b, "\u2013") if m["mode"] == "cold" else ""])
    if not rows:
        return []
    return [f"## {title}", "", intro, "",
            *_table(["Backend", "Mode", "Wall", "Runs/s", "Success", "p50 per run", "p95 per run", "Reference"], rows),
            ""]


def _containers(d: _Doc) -> list[str]:
    rows = []
    for b in ("podman", "docker"):
        m = d.get(f"headline/{b}/cold")
        if m is None:
            continue
        first = fmt_ms(m["first_ms"]) if m["available"] and m["first_ms"] is not None else "\u2013"
        ref = REF_CONTAINER_LINUX.get(b, ("\u2013", "\u2013"))
        rows.append([b, d.cell(f"headline/{b}/cold"), first, ref[0], ref[1]])
    if not rows:
        return []
    return ["## Docker and Podman: the container backends (Linux)", "",
            "Latency = median of the cold one-shot runs; cold start = the first run of the block (the first "
            "warm-up run, after the backend was idle).", "",
            *_table(["Backend", "Latency", "Cold start", "Reference latency", "Reference cold start"], rows), ""]


def _daemon(d: _Doc) -> list[str]:
    out = []
    for b in d.ordered():
        r = (d.res.get("daemon") or {}).get(b)
        if r is None:
            m = d.get(f"daemon/{b}/subsequent_daemon")
            if m is not None and not m["available"]:
                out += [f"**{b}**: unavailable: {m['reason']}", ""]
            continue
        rows = []
        for key, label in (("first", "First command"), ("subsequent", "Subsequent"), ("seq10", "10 sequential")):
            e, dm = f"daemon/{b}/{key}_ephemeral", f"daemon/{b}/{key}_daemon"
            ratio = d.ratio(dm, e)
            ref = REF_DAEMON[key]
            rows.append([label, d.cell(e), d.cell(dm), f"{1 / ratio:.1f}x" if ratio else NA, *ref])
        rows.append(["Pool hit rate (subsequent / 10 sequential)", "0%",
                     f"{fmt_pct(r.get('hit_rate_subsequent'))} / {fmt_pct(r.get('hit_rate_sequential'))}", "--",
                     *REF_DAEMON["reuse"]])
        rows.append(["Daemon start-up (answers / pool warm)", "\u2013",
                     f"{fmt_ms(r.get('daemon_start_ms'))} / {fmt_ms(r.get('daemon_ready_ms'))}", "", "", "~3s", ""])
        out += [f"### {b}", "", *_table(["Metric", "Ephemeral", "Daemon", "Speedup", "Ref. ephemeral",
                                         "Ref. daemon", "Ref. speedup"], rows), ""]
    if not out:
        return []
    return ["## Daemon mode vs ephemeral", "",
            "Reference: Firecracker, daemon with 3-5 pre-booted VMs. Our pool members are used once and "
            "destroyed (never reused): a *hit* is a pre-started member. Subsequent runs wait until the pool is "
            "full again; the 10 sequential runs do not (misses show there).", "", *out]


def leak_cell(d: _Doc, label: str, summary: dict[str, Any]) -> str:
    """A leak check in one cell: leaks attributed to the run, and the unattributed rest by category (on a
    shared machine, mostly other users' resources that came and went)."""
    # the newest check of that label (results from several runs: the later run's result is the one shown)
    lc = next((x for x in reversed(d.doc.get("leak_checks", [])) if x.get("label") == label), None)
    if lc is None:
        return "clean" if summary.get("clean") else f"{summary.get('leak_count', NA)} leaked"
    if lc["clean"]:
        return "clean"
    ours = [x for x in lc["leaks"] if x.get("attributed")]
    rest = collections.Counter(x["category"] for x in lc["leaks"] if not x.get("attributed"))
    head = f"**{len(ours)} leaked by this run**" if ours else "0 leaked by this run"
    if rest:
        head += "; unattributed: " + ", ".join(f"{k} {v}" for k, v in sorted(rest.items()))
    return head


def _stress(d: _Doc) -> list[str]:
    out = []
    for b in d.ordered():
        r = (d.res.get("stress") or {}).get(b)
        if r is None:
            continue
        if not r.get("available"):
            out += [f"**{b}**: unavailable: {r.get('reason')}", ""]
            continue
        lc = r.get("leak_check") or {}
        rows = [["Total time", fmt_ms(r.get("wall_ms")), REF_STRESS10["wall"]],
                ["Success rate", fmt_pct(r.get("success_rate")), REF_STRESS10["success"]],
                ["Full lifecycle (avg)", fmt_ms(r.get("avg_lifecycle_ms")), REF_STRESS10["lifecycle"]]]
        for op in ("create", "start", "exec", "stop", "remove"):
            rows.append([f"{op.capitalize()} (avg)", fmt_ms(r.get(f"avg_{op}_ms")), REF_STRESS10[op]])
        rows.append(["Max start", fmt_ms(r.get("max_start_ms")), "\u2013"])
        rows.append(["Lifecycle p50 / p95 / p99", f"{fmt_ms(r.get('p50_ms'))} / {fmt_ms(r.get('p95_ms'))} / "
                     f"{fmt_ms(r.get('p99_ms'))}", "\u2013"])
        p = r.get("pooled") or {}
        if p.get("total"):
            hits, misses = p.get("pool_hits") or 0, p.get("pool_misses") or 0
            rows.append([f"Pooled `run` x{p['total']}: wall, commands/s",
                         f"{fmt_ms(p.get('wall_ms'))}, {fmt_rate(p.get('commands_per_s'))} "
                         f"({p.get('successful')}/{p.get('total')} ok, {hits} hits, {misses} misses)", "\u2013"])
            rows.append(["Pooled `run` p50 / p95 / p99", f"{fmt_ms(p.get('p50_ms'))} / {fmt_ms(p.get('p95_ms'))} / "
                         f"{fmt_ms(p.get('p99_ms'))}", "\u2013"])
        elif p.get("error"):
            rows.append(["Pooled phase", f"failed: {p['error']}", "\u2013"])
        rows.append(["Leak check", leak_cell(d, f"stress {b}", lc), NA])
        errs = r.get("errors") or []
        out += [f"### {b}: {r.get('count')} parallel sandboxes (at most {r.get('max_concurrent')} at once)", "",
                *_table(["Metric", "Value", "Reference (Docker macOS, 10 parallel)"], rows), ""]
        if errs:
            out += ["Errors: " + "; ".join(f"`{e[:200]}`" for e in errs[:3]), ""]
    if not out:
        return []
    return ["## Stress test (`STRESS_VM_COUNT`, `STRESS_MAX_CONCURRENT`)", "",
            "Each sandbox: CLI `create`, `start`, `exec -- echo hello` (output checked), `stop`, `rm`, each a new "
            "process; then the same number of pooled `agentkernel run` through the daemon; then the daemon is "
            "stopped and the leak check runs.", "", *out]


def _lifecycle(d: _Doc) -> list[str]:
    out = []
    for b in d.ordered():
        r = (d.res.get("lifecycle") or {}).get(b)
        if r is None:
            continue
        if not r.get("available"):
            out += [f"**{b}**: unavailable: {r.get('reason')}", ""]
            continue
        for run in r.get("runs", []):
            s, it = run["sandboxes"], run["iterations"]
            if (s, it) == (5, 2):
                rows = [["Throughput", fmt_rate(run.get("sandboxes_per_s")), REF_5X2["throughput"]],
                        ["p50 latency", fmt_ms(run.get("p50_ms")), REF_5X2["p50"]],
                        ["p95 latency", fmt_ms(run.get("p95_ms")), REF_5X2["p95"]],
                        ["p99 latency", fmt_ms(run.get("p99_ms")), REF_5X2["p99"]],
                        ["Success rate", fmt_pct(run.get("success_rate")), "\u2013"]]
                ref_name = "Docker macOS, 10 cycles 5x2"
            else:
                rows = [["Total wall time", fmt_ms(run.get("wall_ms")), REF_10X10["wall"]],
                        ["Success rate", fmt_pct(run.get("success_rate")), REF_10X10["success"]],
                        ["Avg lifecycle", fmt_ms(run.get("avg_lifecycle_ms")), REF_10X10["avg"]],
                        ["p50", fmt_ms(run.get("p50_ms")), REF_10X10["p50"]],
                        ["p95", fmt_ms(run.get("p95_ms")), REF_10X10["p95"]],
                        ["p99", fmt_ms(run.get("p99_ms")), REF_10X10["p99"]],
                        ["Throughput", fmt_rate(run.get("sandboxes_per_s")), REF_10X10["throughput"]]]
                ref_name = "Docker Linux, 100 cycles 10x10"
            p = run.get("pooled") or {}
            if p.get("total"):
                rows.append(["Pooled run: p50 / p95 / p99, commands/s",
                             f"{fmt_ms(p.get('p50_ms'))} / {fmt_ms(p.get('p95_ms'))} / {fmt_ms(p.get('p99_ms'))}, "
                             f"{fmt_rate(p.get('commands_per_s'))}", "\u2013"])
            out += [f"### {b}: {run['cycles']} cycles, {s}x{it}", "",
                    *_table(["Metric", "Value", f"Reference ({ref_name})"], rows), ""]
            if run.get("errors"):
                out += ["Errors: " + "; ".join(f"`{e[:200]}`" for e in run["errors"][:3]), ""]
        lc = r.get("leak_check") or {}
        out += [f"Leak check after {b}: " + ("clean" if lc.get("clean") else
                                              f"**{lc.get('leak_count')} leaked** ({lc.get('attributed_count')} "
                                              "attributed to this run)"), ""]
    if not out:
        return []
    sec = ["## Repeated lifecycles (`BENCH_SANDBOXES`, `BENCH_ITERATIONS`)", "",
           "Per iteration, `BENCH_SANDBOXES` parallel CLI lifecycles (create, start, exec, stop, rm); percentiles "
           "of the whole lifecycle (linear interpolation, see the method); throughput = successful lifecycles / "
           "total wall time.", "", *out]
    # single sandbox lifecycle, reference layout: operations as rows, backends as columns
    cols = [b for b in d.ordered() if ((d.res.get("lifecycle") or {}).get(b) or {}).get("available")]
    if cols:
        rows = []
        for op in ("create", "start", "exec", "stop", "lifecycle"):
            label = "Total" if op == "lifecycle" else op.capitalize()
            rows.append([label, *(d.cell(f"lifecycle/{b}/single_{op}") for b in cols),
                         REF_SINGLE_DOCKER["total" if op == "lifecycle" else op]])
        sec += ["## Single sandbox lifecycle", "",
                "Create → start → exec → stop → rm, one sandbox at a time, each step a CLI process (medians; "
                "total includes rm).", "",
                *_table(["Operation", *cols, "Reference Docker (Linux)"], rows), ""]
    return sec


def _one_shot(d: _Doc) -> list[str]:
    rows = []
    for b in d.ordered():
        if d.get(f"headline/{b}/cold") is None:
            continue
        rows.append([b, d.cell(f"headline/{b}/cold"), REF_ONE_SHOT.get(b, "\u2013")])
    if not rows:
        return []
    return ["## One-shot run command", "", "`agentkernel run --backend <backend> --no-daemon -- echo hello` "
            "(full lifecycle in one command).", "", *_table(["Backend", "Linux (this run)", "Reference"], rows), ""]


def _inproc_ratios(d: _Doc) -> list[tuple[str, dict[str, Any]]]:
    """The ``inproc`` suite's pairs (in-process ``Sandbox.run`` / CLI one-shot), each with where it ran
    (the backend and its options: ``oci -o runtime=runsc``)."""
    out = []
    for r in d.doc.get("ratios", []):
        if r["suite"] == "inproc" and d.get(r["ours"]) is not None and d.get(r["raw"]) is not None:
            out.append((r["label"].rpartition("(")[2].rstrip(")") or r["backend"], r))
    return out


def _paired(d: _Doc, r: dict[str, Any]) -> float | None:
    """The median of the per-round ratios the ``inproc`` suite keeps with its in-process measurement."""
    return ((d.get(r["ours"]) or {}).get("extra") or {}).get("paired_ratio_median")


def _inproc(d: _Doc) -> list[str]:
    rows = []
    for where, r in _inproc_ratios(d):
        ratio = fmt_ratio(r["ratio"]) if r["available"] else (f"{NA} ({r['reason']})" if r.get("reason") else NA)
        rows.append([where, d.cell(r["ours"]), d.cell(r["raw"]), ratio, fmt_ratio(_paired(d, r))])
    for m in d.doc.get("measurements", []):
        if m["suite"] == "inproc" and not m["available"]:
            rows.append([m["backend"], f"unavailable: {m['reason']}", NA, NA, NA])
    if not rows:
        return []
    return ["## In-process `Sandbox.run` vs the CLI one-shot (same run, interleaved)", "",
            "`Sandbox.run([\"echo\", \"hello\"], backend=B)` without a pool (one event loop kept across samples, "
            "each call resolving its spec and making its manager) next to `agentkernel run --backend B --no-daemon "
            "-- echo hello` (a new CLI process each), round-robin in one block, same image and default policy. "
            "On the container backends both take the same one-shot (`oneshot.run_outcome` -> the backend's "
            "`run_oneshot`); wasm (in-memory instances) and qemu (its VM snapshot is keyed by the workdir) keep "
            "their asyncio `run` in-process. Goal: ratio ≤ 1. The paired ratio is the median of each round's "
            "in-process / CLI sample (a load swing on a shared machine moves both samples of a round).",
            "", *_table(["Backend", "In-process p50", "CLI one-shot p50", "Ratio (in-process / CLI)",
                         "Paired ratio (per round)"], rows), ""]


def _exec50(d: _Doc) -> list[str]:
    rows = []
    for b in d.ordered():
        m = d.get(f"baselines/{b}/exec_cli")
        if m is None:
            continue
        if not m["available"]:
            rows.append([b, f"unavailable: {m['reason']}", "", "", "", REF_EXEC50.get(b, "\u2013")])
            continue
        raw = d.get(f"baselines/{b}/exec_raw")
        rows.append([b, fmt_ms(m["stats"]["mean_ms"]), fmt_rate(m["extra"].get("calls_per_s")),
                     f"{raw['label']}: {fmt_ms(raw['stats']['mean_ms'])}"
                     if raw and raw["available"] and raw["stats"]["n"]
                     else ("\u2013" if raw is None else f"{raw['label']}: {d.cell(raw['id'])}"),
                     fmt_rate(raw["extra"].get("calls_per_s")) if raw and raw["available"] else "\u2013",
                     d.cell(f"baselines/{b}/exec_inproc"),
                     fmt_ratio(d.ratio(f"baselines/{b}/exec_inproc", f"baselines/{b}/exec_raw")),
                     _rate(d.get(f"baselines/{b}/exec_inproc_c10")),
                     REF_EXEC50.get(b, "\u2013")])
    if not rows:
        return []
    n = (d.doc.get("config") or {}).get("exec_calls")
    return ["## Exec throughput", "",
            f"{n} sequential `agentkernel exec NAME -- echo hello` calls on one running sandbox (each a new "
            "process), interleaved with the engine's own exec into a plain container of the same image and "
            "with in-process `SandboxManager.exec` calls on the same sandbox (one at a time: p50; 10 at once: "
            "execs per second), which share the sandbox's agent connection.", "",
            *_table(["Backend", "Avg", "Calls/s", "Raw engine exec avg", "Raw calls/s", "In-process p50",
                     "In-process / raw exec (p50)", "In-process, 10 at once", "Reference (Linux)"], rows), ""]


def _rate(m: dict | None) -> str:
    if m is None or not m["available"] or not m["stats"]["n"]:
        return "\u2013"
    return fmt_rate(m['extra'].get('calls_per_s'))


def _scale(d: _Doc) -> list[str]:
    out = []
    for b in d.ordered():
        r = (d.res.get("concurrency") or {}).get(f"{b}:scale")
        if r is None:
            continue
        if not r.get("available"):
            out += [f"**{b}**: unavailable: {r.get('reason')}", ""]
            continue
        rows = [[x["count"], fmt_ms(x["create_ms"]), fmt_ms(x["start_ms"]), f"{x['running']}/{x['count']}",
                 fmt_ms(x["parallel_exec_ms"])] for x in r.get("rows", [])]
        out += [f"### {b}", "", *_table(["Count", "Create", "Start", "Running", "Parallel exec"], rows), ""]
        errs = [e for x in r.get("rows", []) for e in x.get("errors", [])]
        if errs:
            out += ["Errors: " + "; ".join(f"`{e[:200]}`" for e in errs[:3]), ""]
    if not out:
        return []
    return ["## Concurrent scale", "",
            "N named sandboxes created concurrently, started concurrently, counted running, one `echo hello` "
            "in each in parallel (wall times, in-process). Reference (Kubernetes k3d / Nomad dev agent): "
            f"{REF_SCALE['kubernetes']} / {REF_SCALE['nomad']}.", "", *out]


def _speed_rows(sp: dict[str, Any]) -> list[list[str]]:
    """Issue 18's measures (suite ``speed``), each with its goal and verdict."""
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "\u2013" if ok is None else ("**pass**" if ok else "**miss**")

    def lat(x: dict | None, key: str = "median_ms") -> float | None:
        return ((x or {}).get("latency") or {}).get(key)

    b2b = sp.get("back_to_back") or {}
    if b2b.get("runs"):
        rps, hit = b2b.get("runs_per_s"), b2b.get("hit_rate")
        rows.append([f"back-to-back `agentkernel run -- echo hello` x{b2b['runs']}, default backend "
                     f"({sp.get('backend')}), default daemon: >= 40 runs/s, hit rate >= 0.9",
                     f"{rps} runs/s, hit rate {hit}, {b2b.get('failures')} failed (floor p50 "
                     f"{fmt_ms(lat({'latency': b2b.get('floor')}))})",
                     verdict(None if rps is None or hit is None else rps >= 40 and hit >= 0.9)])
        for pv in b2b.get("pools") or []:
            if pv.get("cannot_keep_up"):
                rows.append(["\u2003the pool said", f"cannot keep up: {pv['cannot_keep_up']}", ""])
    pc = sp.get("paced") or {}
    if pc.get("runs"):
        m, f = lat(pc), lat({"latency": pc.get("floor")})
        rows.append(["one warm run, paced: <= 12 ms (2x the interpreter floor)",
                     f"{fmt_ms(m)} (floor {fmt_ms(f)}, {pc.get('x_floor', NA)}x)",
                     verdict(None if m is None else m <= 12)])
    for key, goal_rps, label in (("serve_run_c10", 40, "`serve` `/run` at 10 concurrent: >= 40 req/s, p99 <= 100 ms"),
                                 ("serve_exec_c10", 1000, "exec in one sandbox through `serve`, 10 concurrent: "
                                  ">= 1,000 req/s")):
        r = sp.get(key) or {}
        if r.get("requests"):
            rps, p99 = r.get("rps"), (r.get("latency") or {}).get("p99_ms")
            ok = rps is not None and rps >= goal_rps and (key != "serve_run_c10" or (p99 or 1e9) <= 100)
            rows.append([label, f"{rps} req/s, p99 {fmt_ms(p99)}, success {fmt_pct(r.get('success_rate'))}",
                         verdict(ok)])
            dr = r.get("direct") or {}
            if dr.get("requests"):  # the same work without HTTP, same run (api_bench.with_ratio)
                dl = dr.get("latency") or {}
                rows.append(["\u2003the same without HTTP (`direct`)",
                             f"{dr.get('rps')} req/s, p50 {fmt_ms(dl.get('p50_ms'))}, p99 {fmt_ms(dl.get('p99_ms'))}, "
                             f"success {fmt_pct(dr.get('success_rate'))}; HTTP/direct "
                             f"{r.get('ratio_vs_direct', NA)}x", ""])
    wp, wi = sp.get("wasm_pipelined") or {}, sp.get("wasm_in_process") or {}
    if wp.get("runs_per_s"):
        cpu = wp.get("cpu_per_run") or {}
        threads = ", ".join(f"{k} {v}" for k, v in (cpu.get("daemon_threads_us") or {}).items())
        cpu_note = (f"; CPU per run: daemon {cpu['daemon_us']} us ({threads}), client {cpu.get('client_us', NA)} us"
                    if cpu.get("daemon_us") else "")
        rows.append(["wasm runs through the daemon, one client pipelined: >= 3,333/s",
                     f"{wp['runs_per_s']}/s ({wp.get('window')} in flight; in-process "
                     f"{wi.get('runs_per_s', NA)}/s, per-connection "
                     f"{(sp.get('wasm_per_connection') or {}).get('runs_per_s', NA)}/s{cpu_note})",
                     verdict(wp["runs_per_s"] >= 3333)])
    oc = sp.get("oci_cold") or {}
    if oc.get("runs"):
        m = lat(oc)
        rows.append(["`oci` cold, new process: <= 30 ms",
                     f"{fmt_ms(m)} (floor {fmt_ms(lat({'latency': oc.get('floor')}))})",
                     verdict(None if m is None else m <= 30)])
    lv = sp.get("live") or {}
    if lv.get("asked"):
        dm = lv.get("daemon") or {}
        pss = lv.get("pss_mib_per_member")
        rows.append([f"daemon with {lv['asked']} live sandboxes: RSS and fds; <= 2 MiB PSS per idle member",
                     f"{lv.get('ready')} ready; daemon RSS {round((dm.get('vmrss') or 0) / 1024, 1)} MiB, "
                     f"{dm.get('fds', NA)} fds; {pss if pss is not None else NA} MiB PSS per member (agent)",
                     verdict(None if pss is None else pss <= 2)])
    return rows


def _speed(d: _Doc) -> list[str]:
    sp = (d.res.get("speed") or {}).get("default")
    if not sp:
        return []
    rows = _speed_rows(sp)
    errs = [f"{k}: {v['error']}" for k, v in sp.items() if isinstance(v, dict) and v.get("error")]
    return ["## Speed under sustained load (issue 18)", "",
            f"Default backend (`auto`) on this host: **{sp.get('backend')}**. Each latency is next to the "
            "interpreter floor (`python -S -I -c pass`) measured in the same run.", "",
            *_table(["Measure and goal", "Measured", "Verdict"], rows), "",
            *(["Errors: " + "; ".join(f"`{e[:200]}`" for e in errs), ""] if errs else [])]


def _live(d: _Doc) -> list[str]:
    rows = []
    for b, r in sorted((d.res.get("live") or {}).items()):
        if not r.get("available"):
            rows.append([b, f"unavailable: {r.get('reason')}"] + [NA] * 6)
            continue
        if r.get("error"):
            rows.append([b, f"failed: `{r['error'][:200]}`"] + [NA] * 6)
            continue
        dm, pss = r.get("daemon") or {}, r.get("pss_mib_per_member")
        eng = ", ".join(f"{k} x{v}" for k, v in sorted((r.get("engine_processes") or {}).items())) or "none"
        lc = leak_cell(d, f"live {b}", r.get("leak_check") or {})
        rows.append([b, f"{r.get('ready')}/{r.get('asked')} ready ({r.get('agents')} agents measured)",
                     f"{round((dm.get('vmrss') or 0) / 1024, 1)} MiB, {dm.get('fds', NA)} fds, "
                     f"{dm.get('threads', NA)} threads",
                     f"{pss if pss is not None else NA} MiB ({eng} above the agent)",
                     f"{r.get('agent_pss_mib_per_member', NA)} MiB",
                     f"{r.get('cgroup_mib_per_member', NA)} MiB", lc,
                     "\u2013" if pss is None else ("**pass**" if pss <= 2 else "**miss**")])
    if not rows:
        return []
    return ["## Daemon with live pooled sandboxes", "",
            "A daemon asked to hold N warm members (`--pool-min N --pool-max N`), idle. PSS per member: the "
            "member's agent (`ak-agent serve`) plus the engine's per-container processes above it (podman's "
            "conmon; crun exits after start). Cgroup memory: what the kernel charges the container (page "
            "cache, kernel memory), not in PSS. Goal: <= 2 MiB PSS per idle member.", "",
            *_table(["Backend", "Members", "Daemon", "PSS per member", "Agent PSS", "Cgroup memory", "Leaked",
                     "Goal"], rows), ""]


def _soak_trends(r: dict[str, Any]) -> list[str]:
    """Flat or growing: each series' median over its first and last tenth, and the machine's load."""
    tr = r.get("trends") or {}
    names = {"daemon_rss_kib": ("daemon RSS", 1 / 1024, "MiB"), "daemon_fds": ("daemon fds", 1, ""),
             "client_fds": ("client fds", 1, ""), "p50_ms": ("p50", 1, "ms"), "p99_ms": ("p99", 1, "ms"),
             "ops_per_s": ("ops/s", 1, ""), "hit_rate": ("hit rate", 1, ""), "load1": ("machine load (1 min)", 1, "")}
    rows = []
    for key, (label, k, unit) in names.items():
        t = tr.get(key)
        if not t:
            continue

        def f(v: float, k: float = k) -> str:
            return f"{v * k:,.0f}" if abs(v * k) >= 100 else f"{v * k:.3g}"

        rows.append([label, f"{f(t['first'])} -> {f(t['last'])} {unit}".rstrip(),
                     f"{f(t['min'])}-{f(t['max'])} {unit}".rstrip()])
    out = []
    if rows:
        out += [f"Trends (median of the first and last tenth of the {r.get('bucket_s', 1):g} s samples):", "",
                *_table(["Series", "First -> last tenth", "Range"], rows), ""]
    for pv in r.get("pools_end") or []:
        if pv.get("cannot_keep_up"):
            out += [f"The {pv.get('backend')} pool at the end: cannot keep up: {pv['cannot_keep_up']}", ""]
    return out


def _soak(d: _Doc) -> list[str]:
    out = []
    for b, r in sorted((d.res.get("soak") or {}).items()):
        if r.get("available") is False:
            out += [f"**{b}**: unavailable: {r.get('reason')}", ""]
            continue
        if r.get("error") and not r.get("ops"):
            out += [f"**{b}**: failed: `{r['error'][:300]}`", ""]
            continue
        lt, lc = r.get("latency") or {}, r.get("leak_check") or {}
        before, after = r.get("daemon_before") or {}, r.get("daemon_after") or {}
        hits = [x["hit_rate"] for x in r.get("series", []) if x.get("hit_rate") is not None]
        rows = [[f"{r.get('duration_s', 0):.0f} s", str(r.get("concurrency")), str(r.get("ops")),
                 fmt_pct(r.get("success_rate")), f"{fmt_ms(lt.get('median_ms'))} / {fmt_ms(lt.get('p95_ms'))} / "
                 f"{fmt_ms(lt.get('p99_ms'))}",
                 f"{min(hits):.2f}-{max(hits):.2f}" if hits else NA,
                 leak_cell(d, f"soak {b}", lc),
                 f"{round((before.get('vmrss') or 0) / 1024, 1)} -> {round((after.get('vmrss') or 0) / 1024, 1)} MiB, "
                 f"{before.get('fds', NA)} -> {after.get('fds', NA)} fds"]]
        out += [f"### {b}", "", *_table(["Duration", "Concurrent", "Ops", "Success", "p50 / p95 / p99",
                                         "Hit rate (per sample)", "Leaked", "Daemon RSS, fds"], rows), ""]
        out += _soak_trends(r)
        if r.get("errors"):
            out += ["First errors: " + "; ".join(f"`{e[:160]}`" for e in r["errors"][:3]), ""]
    if not out:
        return []
    return ["## Soak: mixed run/exec/cp under sustained load", "",
            "Runs over one multiplexed daemon connection, exec and file copy (write + read back) in one named "
            "sandbox; the leak check covers containers, runtime state, cgroups, mounts, processes, journal "
            "entries, run dirs, store rows and temp dirs. The chart `soak` plots throughput, latency, the "
            "pool's hit rate, the daemon's RSS and fds and the machine's load over time.", "", *out]


def _floors(d: _Doc) -> list[str]:
    rows = [[m["label"], d.cell(m["id"]), d.cell(m["id"], "p95_ms")] for m in d.doc.get("measurements", [])
            if m["suite"] == "baselines" and m["backend"] == "host"]
    if not rows:
        return []
    return ["## Floors", "", "What any new process costs here, before a sandbox is involved.", "",
            *_table(["Command", "p50", "p95"], rows), ""]


def _leaks(d: _Doc) -> list[str]:
    rows = []
    for lc in d.doc.get("leak_checks", []):
        what = "clean" if lc["clean"] else f"{lc['leak_count']} leaked ({lc['attributed_count']} attributed)"
        detail = "; ".join(f"{x['category']}: {(x['info'].get('name') or x['key'])[:80]}" for x in lc["leaks"][:4])
        label = lc["label"]
        if label == "whole run" and lc.get("run_id") and d.doc.get("config", {}).get("merged_from"):
            label = f"whole run `{lc['run_id']}`"  # one per merged run
        rows.append([label, what, detail or "\u2013", f"{len(lc.get('foreign', []))}"])
    if not rows:
        return []
    return ["## Leak checks", "",
            "After every stress and lifecycle run and after the whole run: containers (podman, docker), runsc "
            "sandboxes, OCI runtime state and bundles, cgroups, qemu processes, processes naming the run, "
            "journal entries, run dirs, store rows, temp dirs, mounts. Leaks attributed to the run are removed "
            "after being reported; \"foreign\" = resources of other live owners on the machine (ignored).", "",
            *_table(["Check", "Result", "Leaked", "Foreign"], rows), ""]


def _unavailable(d: _Doc) -> list[str]:
    rows = [[b, e.get("reason") or "\u2013"] for b, e in d.backends.items() if not e.get("available")]
    if not rows:
        return []
    return ["## Backends not measured here", "", *_table(["Backend", "Doctor's reason"], rows), ""]


def _errors(d: _Doc) -> list[str]:
    errs = d.doc.get("errors", [])
    if not errs:
        return []
    return ["## Errors during the run", "", *[f"- {e['suite']}/{e.get('backend') or '-'}: `{e['message'][:400]}`"
                                              for e in errs], ""]


def _charts(charts: dict[str, str]) -> list[str]:
    if not charts:
        return []
    titles = {"latency": "Latency distribution per backend (headline, per-run samples)",
              "phases": "Phase breakdown (median)", "ratios": "Ours / raw engine (median ratio)",
              "throughput": "Throughput batches (wall time)",
              "soak": "Soak: throughput, latency and pool hit rate over time under sustained load"}
    out = ["## Charts", ""]
    for key, path in charts.items():
        out += [f"![{titles.get(key, key)}]({path})", ""]
    return out


def closing_note(doc: dict[str, Any]) -> str:
    """The headline table with ratios, as plain Markdown (for a PR / issue note)."""
    d = _Doc(doc)
    rows = []
    for row in doc.get("summary", {}).get("headline", []):
        if not row["available"]:
            rows.append([row["backend"], row["mode"], f"unavailable: {row['reason']}", "\u2013"])
            continue
        rs = "; ".join(f"{r['label'].split(' vs ')[-1]}: {fmt_ratio(r['ratio'])}" for r in row["ratios"]) or "\u2013"
        rows.append([row["backend"], row["mode"], d.cell(row["measurement"]), rs])
    return "\n".join(_table(["Backend", "Mode", "p50", "Ratio to raw engines (ours/raw)"], rows))


def render(doc: dict[str, Any], charts: dict[str, str] | None = None, *, json_name: str | None = None,
           for_docs: bool = False) -> str:
    d = _Doc(doc)
    parts: list[str] = []
    parts += _header(d, for_docs, json_name)
    parts += _headline(d)
    parts += _ratios(d)
    parts += _goals(d)
    parts += _speed(d)
    parts += _phases(d)
    parts += _vm_vs_container(d)
    parts += _wasm(d)
    parts += _concurrent(d, "concurrency", f"{(doc.get('config') or {}).get('concurrent_n', 100)} concurrent",
                         "All runs started at once, each a new `agentkernel run` process (or the raw engine's "
                         "one-shot).",
                         REF_100)
    cfg = doc.get("config") or {}
    parts += _concurrent(d, "throughput",
                         f"Throughput: {cfg.get('runs_total')} runs, {cfg.get('runs_concurrency')} concurrent",
                         "`scripts/stress-test.sh TOTAL CONCURRENCY`: new processes, at most CONCURRENCY at a time.",
                         REF_100)
    parts += _containers(d)
    parts += _daemon(d)
    parts += _stress(d)
    parts += _soak(d)
    parts += _live(d)
    parts += _lifecycle(d)
    parts += _one_shot(d)
    parts += _inproc(d)
    parts += _exec50(d)
    parts += _scale(d)
    parts += _floors(d)
    parts += _leaks(d)
    parts += _unavailable(d)
    parts += _errors(d)
    parts += _charts(charts or {})
    return "\n".join(parts).rstrip() + "\n"
