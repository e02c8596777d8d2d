"""PNG charts of a results document (matplotlib, Agg backend: no display needed). Needs the ``bench``
extra. Every chart names the machine, the date and the commit in its subtitle.

- ``latency``: distribution of the headline's per-run samples per backend and mode (box + every sample),
  log scale;
- ``phases``: median boot / ready / exec / shutdown per backend, cold and warm;
- ``ratios``: ours / raw engine (medians) per pair, log scale, 1 = parity;
- ``throughput``: wall time of the throughput and concurrency batches.
"""

from __future__ import annotations

from typing import Any

from .machine import short_label

MODE_COLORS = {"cold": "#1f77b4", "warm": "#2ca02c", "snapshot": "#9467bd", "raw": "#7f7f7f"}
PHASE_COLORS = {"boot": "#1f77b4", "ready": "#ff7f0e", "exec": "#2ca02c", "shutdown": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(doc: dict[str, Any]) -> str:
    commit = (doc.get("git") or {}).get("commit") or "unknown"
    return f"{short_label(doc['machine'])} | {doc['date']} | git {commit[:10]}"


def latency(doc: dict[str, Any], path: str) -> str | None:
    ms = [m for m in doc["measurements"] if m["suite"] == "headline" and m["available"] and m["samples_ms"]]
    if not ms:
        return None
    plt = _plt()
    ms.sort(key=lambda m: (m["backend"], {"cold": 0, "warm": 1, "snapshot": 2}.get(m["mode"], 3), m["name"]))
    labels = [f"{m['backend']}: {m['label']}" for m in ms]
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.42 * len(ms) + 1.5)))
    data = [m["samples_ms"] for m in ms]
    ax.boxplot(data, vert=False, widths=0.6, showfliers=False)
    for i, m in enumerate(ms, start=1):
        xs = m["samples_ms"]
        ys = [i + (j % 5 - 2) * 0.05 for j in range(len(xs))]
        ax.scatter(xs, ys, s=10, alpha=0.7, color=MODE_COLORS.get(m["mode"], "#333333"), zorder=3)
    ax.set_yticks(range(1, len(ms) + 1))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds per run (log scale): new process, invocation to output")
    ax.invert_yaxis()
    ax.grid(axis="x", which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in MODE_COLORS.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("agentkernel run -- echo hello: latency per run", fontsize=12)
    ax.set_title(_subtitle(doc), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phases(doc: dict[str, Any], path: str) -> str | None:
    by: dict[str, dict[str, dict[str, float]]] = {"cold": {}, "warm": {}}
    for m in doc["measurements"]:
        if m["suite"] != "phases" or not m["available"] or m["stats"]["p50_ms"] is None:
            continue
        mode, _, ph = m["name"].partition("_")
        if mode in by and ph in PHASE_COLORS:
            by[mode].setdefault(m["backend"], {})[ph] = m["stats"]["p50_ms"]
    if not any(by.values()):
        return None
    plt = _plt()
    modes = [k for k in ("cold", "warm") if by[k]]
    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 1.5 + 0.5 * sum(len(by[k]) for k in modes) + 1.2 * len(modes)),
                             squeeze=False)
    for ax, mode in zip([a[0] for a in axes], modes, strict=True):
        names = sorted(by[mode])
        left = [0.0] * len(names)
        for ph, color in PHASE_COLORS.items():
            vals = [by[mode][b].get(ph, 0.0) for b in names]
            ax.barh(names, vals, left=left, color=color, label=ph)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        for y, total in enumerate(left):
            ax.text(total, y, f" {total:.1f} ms" if total >= 1 else f" {total * 1000:.0f} µs", va="center", fontsize=8)
        ax.set_title(f"{mode}: {'Backend.run in-process' if mode == 'cold' else 'daemon pool in-process'}",
                     fontsize=9)
        ax.set_xlabel("milliseconds (median)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.25 or 1)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Where the time goes: boot / ready / exec / shutdown\n{_subtitle(doc)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratios(doc: dict[str, Any], path: str) -> str | None:
    rs = [r for r in doc["ratios"] if r["available"] and r["ratio"]]
    if not rs:
        return None
    plt = _plt()
    labels = [f"{r['backend']} {r['suite']}: {r['ours'].rsplit('/', 1)[-1]} / {r['raw'].rsplit('/', 1)[-1]}"
              for r in rs]
    vals = [r["ratio"] for r in rs]
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.38 * len(rs) + 1.5)))
    colors = ["#2ca02c" if v < 1 else "#d62728" for v in vals]
    ax.barh(range(len(rs)), vals, color=colors)
    ax.set_yticks(range(len(rs)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("ours / raw (median): below 1 = agentkernel faster (log scale)")
    ax.invert_yaxis()
    fig.suptitle("agentkernel vs the raw engines, same run, interleaved", fontsize=11)
    ax.set_title(_subtitle(doc), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput(doc: dict[str, Any], path: str) -> str | None:
    ms = [m for m in doc["measurements"] if m["suite"] in ("throughput", "concurrency") and m["available"]
          and m["kind"] == "latency" and m["extra"].get("wall_ms")]
    if not ms:
        return None
    plt = _plt()
    labels = [f"{m['backend']} {m['mode']} ({m['extra'].get('total')} runs @ {m['extra'].get('concurrency')})"
              for m in ms]
    vals = [m["extra"]["wall_ms"] / 1000 for m in ms]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.35 * len(ms) + 1.5)))
    ax.barh(range(len(ms)), vals, color=[MODE_COLORS.get(m["mode"], "#333333") for m in ms])
    ax.set_yticks(range(len(ms)))
    ax.set_yticklabels(labels, fontsize=8)
    for i, (v, m) in enumerate(zip(vals, ms, strict=True)):
        rate, ok = m["extra"].get("runs_per_s") or 0, (m["success_rate"] or 0) * 100
        ax.text(v, i, f" {v:.2f} s, {rate:.0f}/s, {ok:.0f}% ok", va="center", fontsize=7)
    ax.set_xlabel("wall time, seconds")
    ax.invert_yaxis()
    ax.margins(x=0.3)
    fig.suptitle("Throughput and concurrency batches", fontsize=11)
    ax.set_title(_subtitle(doc), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def soak(doc: dict[str, Any], path: str) -> str | None:
    """The soak suite's series: ops/s, p50/p99 latency, the pool's hit rate, the daemon's RSS and fds, and
    the machine's 1-minute load (the machine is shared: the load says what else ran). One column per
    backend, each on its own time axis (soaks of different lengths side by side stay readable)."""
    runs = [(b, r) for b, r in sorted(((doc.get("results") or {}).get("soak") or {}).items()) if r.get("series")]
    if not runs:
        return None
    plt = _plt()
    fig, grid = plt.subplots(4, len(runs), figsize=(max(10, 5.5 * len(runs)), 9), squeeze=False)
    for col, (b, r) in enumerate(runs):
        axes = [grid[row][col] for row in range(4)]
        s = r["series"]
        t = [x["t"] for x in s]
        axes[0].plot(t, [x["ops_per_s"] for x in s], label="ops/s")
        axes[1].plot(t, [x["p50_ms"] for x in s], label="p50")
        axes[1].plot(t, [x["p99_ms"] for x in s], label="p99", linestyle="--")
        axes[2].plot(t, [x["hit_rate"] for x in s], label="hit rate")
        axes[3].plot(t, [(x.get("daemon_rss_kib") or 0) / 1024 for x in s], label="daemon RSS, MiB")
        if any(x.get("daemon_fds") is not None for x in s):
            axes[3].plot(t, [x.get("daemon_fds") for x in s], label="daemon fds", linestyle=":")
        if any(x.get("load1") is not None for x in s):
            load_ax = axes[0].twinx()  # its own scale: a load of 100 would flatten the ops/s line
            load_ax.plot(t, [x.get("load1") for x in s], label="machine load (1 min)", color="#7f7f7f",
                         linewidth=0.8)
            load_ax.set_ylim(bottom=0)
            load_ax.legend(fontsize=7, loc="upper right")
            if col == len(runs) - 1:
                load_ax.set_ylabel("load (1 min)", color="#7f7f7f")
        axes[0].set_title(f"{b}: {r.get('duration_s', 0):.0f} s at {r.get('concurrency')} concurrent", fontsize=9)
        bucket = r.get("bucket_s") or 1
        axes[0].set_ylabel(f"ops/s (per {bucket:g} s)" if col == 0 else f"per {bucket:g} s")
        axes[3].set_xlabel("seconds into the soak")
        if col == 0:
            axes[1].set_ylabel("latency, ms")
            axes[2].set_ylabel("pool hit rate")
            axes[3].set_ylabel("daemon")
        for ax in axes:
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(alpha=0.3)
        axes[2].set_ylim(0, 1.05)
    fig.suptitle(f"Soak: sustained mixed load\n{_subtitle(doc)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_all(doc: dict[str, Any], prefix: str) -> dict[str, str]:
    """Write every chart that has data as ``<prefix><name>.png``; returns name -> path."""
    out = {}
    for name, fn in (("latency", latency), ("phases", phases), ("ratios", ratios), ("throughput", throughput),
                     ("soak", soak)):
        p = fn(doc, f"{prefix}{name}.png")
        if p:
            out[name] = p
    return out
