"""The leak check: after a run, nothing of it may be left on the host.

``snapshot(scope)`` lists every resource that agentkernel (or the bench's raw baselines) could leave
behind, by category:

| category | what is listed |
|---|---|
| podman_containers, docker_containers | labelled ``agentkernel.managed=true``, named ``agentkernel-*``/``akbench-*`` |
| runsc | runsc processes (sandbox, gofer) and podman's runsc state files in /run/runsc |
| oci_state | the oci backend's runtime state and bundles under each scoped runtime dir, the raw bundles' state |
| cgroups | ``agentkernel/<id>`` cgroups in every hierarchy (the oci backend's) |
| qemu_processes | ``qemu-system-*`` processes |
| processes | processes whose command line names the bench's temp dir or run id |
| journal | ownership-journal entries in each scoped runtime dir |
| run_dirs | per-sandbox run dirs (agent sockets, status files) in each scoped runtime dir |
| store | named sandboxes left in the scoped store(s) |
| temp_dirs | wasm scratch dirs ``ak-<pid>-*`` in /tmp and /dev/shm, stray ``akbench-*`` dirs |
| mounts | mount points under the scoped dirs |

``check(scope, baseline)`` reports what exists now and did not at the baseline, after letting it settle
(``--rm`` clean-up and the daemon's background destroys finish within a few seconds): it re-checks every
0.5 s for up to ``settle_s`` while anything is left. Each item is classified:

- **attributed** to this run: owner label naming a process the bench spawned (a live process only when
  its start time is the one recorded at spawn: pids are reused on a busy machine), a name or path with the
  bench's run id / temp dir, anything in the bench's own runtime dir or store;
- **foreign**: its owner labels name a process that is alive and not ours (someone else's running
  sandbox), a resource labelled with another bench run's id, a temp dir that a live process outside this
  run names in its command line or environment (another bench run), a cgroup whose processes do not use
  this run's runtime dir: listed in ``foreign``, never counted as a leak;
- **unattributed**: new since the baseline but with no owner we can tie to anyone (no owner labels,
  a dead owner that is not ours, a cgroup): counted as a leak. On a busy shared machine another user's
  leak can show up here; the report says which kind each leak is.

Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from typing import Any

CATEGORIES = ("podman_containers", "docker_containers", "runsc", "oci_state", "cgroups", "qemu_processes",
              "processes", "journal", "run_dirs", "store", "temp_dirs", "mounts")


class LeakScope:
    """What "ours" means for one bench run."""

    def __init__(self, *, runtime_dirs: Iterable[str] = (), homes: Iterable[str] = (), tmp_root: str | None = None,
                 run_id: str | None = None, own_pids: set[int] | None = None,
                 extra_state_dirs: Iterable[str] = (), own_starts: dict[int, int] | None = None) -> None:
        self.runtime_dirs = [os.path.realpath(d) for d in runtime_dirs if d]
        self.homes = [os.path.realpath(d) for d in homes if d]
        self.tmp_root = os.path.realpath(tmp_root) if tmp_root else None
        self.run_id = run_id
        self.own_pids = own_pids if own_pids is not None else {os.getpid()}
        self.own_starts = own_starts if own_starts is not None else {}
        self.extra_state_dirs = list(extra_state_dirs)

    @classmethod
    def for_context(cls, ctx) -> LeakScope:
        from .suites.raw import raw_state_dirs

        return cls(runtime_dirs=[ctx.runtime_dir], homes=[ctx.home], tmp_root=ctx.tmp, run_id=ctx.run_id,
                   own_pids=ctx.spawned, extra_state_dirs=raw_state_dirs(ctx),
                   own_starts=getattr(ctx, "spawn_starts", None))

    def owns_live(self, pid: int) -> bool:
        """``pid`` is a live process this run spawned (not a later process that reused the number)."""
        from ..owner import process_start_time

        if pid == os.getpid():
            return True
        start = self.own_starts.get(pid)
        return pid in self.own_pids and start is not None and process_start_time(pid) == start

    def owns_label(self, pid: int, start: int | None) -> bool:
        """An owner label (pid, start time) names a process this run spawned."""
        if pid not in self.own_pids:
            return False
        known = self.own_starts.get(pid)
        return known is None or start is None or known == start

    def names_us(self, text: str) -> bool:
        return bool((self.run_id and self.run_id in text) or (self.tmp_root and self.tmp_root in text))


# ---- collectors --------------------------------------------------------------------------------------


def _run_json_lines(argv: list[str], timeout: float = 60) -> tuple[list[Any] | None, str | None]:
    if shutil.which(argv[0]) is None:
        return None, f"{argv[0]} is not installed"
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{argv[0]} did not answer: {exc}"
    if r.returncode != 0:
        return None, f"{' '.join(argv[:2])} failed: {r.stderr.strip()[:200]}"
    out = r.stdout.strip()
    if not out:
        return [], None
    try:
        if out.startswith("["):
            return json.loads(out), None
        return [json.loads(line) for line in out.splitlines() if line.strip()], None
    except ValueError as exc:
        return None, f"cannot parse {argv[0]} output: {exc}"


def _interesting(name: str, labels: dict[str, str]) -> bool:
    return labels.get("agentkernel.managed") == "true" or name.startswith(("agentkernel-", "akbench-"))


def _podman_containers() -> tuple[dict[str, dict], str | None]:
    rows, err = _run_json_lines(["podman", "ps", "-a", "--format", "json"])
    out: dict[str, dict] = {}
    for c in rows or []:
        labels = c.get("Labels") or {}
        name = (c.get("Names") or [""])[0]
        if _interesting(name, labels):
            out[c.get("Id", name)] = {"name": name, "state": c.get("State"), "image": c.get("Image"),
                                      "labels": {k: v for k, v in labels.items() if k.startswith("agentkernel.")}}
    return out, err


def _docker_labels(s: str) -> dict[str, str]:
    out = {}
    for part in (s or "").split(","):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip()] = v
    return out


def _docker_containers() -> tuple[dict[str, dict], str | None]:
    if not os.path.exists("/var/run/docker.sock") and not os.environ.get("DOCKER_HOST"):
        return {}, "docker engine socket not present"
    rows, err = _run_json_lines(["docker", "ps", "-a", "--no-trunc", "--format", "{{json .}}"])
    out: dict[str, dict] = {}
    for c in rows or []:
        labels = _docker_labels(c.get("Labels", ""))
        name = (c.get("Names") or "").split(",")[0]
        if _interesting(name, labels):
            out[c.get("ID", name)] = {"name": name, "state": c.get("State"), "image": c.get("Image"),
                                      "labels": {k: v for k, v in labels.items() if k.startswith("agentkernel.")}}
    return out, err


def _proc_cmdlines() -> dict[int, str]:
    me = os.getpid()
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if raw:
            out[int(name)] = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return out


def _listdir(d: str) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []


def _cgroups() -> dict[str, dict]:
    out: dict[str, dict] = {}
    base = "/sys/fs/cgroup"
    roots = [base] + [os.path.join(base, d) for d in _listdir(base)]
    for r in roots:
        d = os.path.join(r, "agentkernel")
        for sid in _listdir(d):
            p = os.path.join(d, sid)
            if os.path.isdir(p):
                out.setdefault(sid, {"paths": []})["paths"].append(p)
    return out


def _mounts(prefixes: list[str]) -> dict[str, dict]:
    out = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mnt = line.split()[4].replace("\\040", " ")
                if any(mnt == p or mnt.startswith(p.rstrip("/") + "/") for p in prefixes):
                    out[mnt] = {"mountpoint": mnt}
    except OSError:
        pass
    return out


def _store_rows(home: str) -> dict[str, dict]:
    path = os.path.join(home, "state.db")
    if not os.path.exists(path):
        return {}
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            table = next((t for t in ("sandboxes_v2", "sandboxes") if t in tables), None)  # store.py's table
            if table is None:
                return {}
            cols = [r[1] for r in con.execute(f"pragma table_info({table})")]
            rows = con.execute(f"select * from {table}").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    out = {}
    for row in rows:
        d = dict(zip(cols, row, strict=False))
        key = str(d.get("id") or d.get("name"))
        out[key] = {"name": d.get("name"), "backend": d.get("backend"), "state": d.get("state")}
    return out


def snapshot(scope: LeakScope) -> dict[str, Any]:
    """Everything that could be a leak, right now: {"items": {category: {key: info}}, "errors": {...}}."""
    items: dict[str, dict[str, dict]] = {c: {} for c in CATEGORIES}
    errors: dict[str, str] = {}
    items["podman_containers"], err = _podman_containers()
    if err and "not installed" not in err:
        errors["podman_containers"] = err
    items["docker_containers"], err = _docker_containers()
    if err and "not installed" not in err and "not present" not in err:
        errors["docker_containers"] = err
    procs = _proc_cmdlines()
    for pid, cmd in procs.items():
        argv0 = os.path.basename(cmd.split(" ", 1)[0])
        if "runsc" in argv0 and (" boot" in cmd or " gofer" in cmd or "runsc-sandbox" in cmd or " run " in cmd):
            items["runsc"][f"pid:{pid}"] = {"pid": pid, "cmdline": cmd[:300]}
        elif argv0.startswith("qemu-system"):
            items["qemu_processes"][f"pid:{pid}"] = {"pid": pid, "cmdline": cmd[:300]}
        if scope.names_us(cmd) and pid not in (os.getpid(),):
            items["processes"][f"pid:{pid}"] = {"pid": pid, "cmdline": cmd[:300]}
    for fn in _listdir("/run/runsc"):
        if fn.endswith(".state"):
            items["runsc"][f"/run/runsc/{fn}"] = {"path": f"/run/runsc/{fn}"}
    for rt in scope.runtime_dirs:
        for sub in ("oci/bundles",):
            for fn in _listdir(os.path.join(rt, sub)):
                p = os.path.join(rt, sub, fn)
                items["oci_state"][p] = {"path": p, "ours": True}
        for runtime in _listdir(os.path.join(rt, "oci", "state")):
            for fn in _listdir(os.path.join(rt, "oci", "state", runtime)):
                p = os.path.join(rt, "oci", "state", runtime, fn)
                items["oci_state"][p] = {"path": p, "ours": True}
        for fn in _listdir(os.path.join(rt, "owned")):
            if fn.endswith(".json"):
                p = os.path.join(rt, "owned", fn)
                info: dict[str, Any] = {"path": p, "ours": True}
                try:
                    with open(p) as f:
                        e = json.load(f)
                    info.update({"backend": e.get("backend"), "id": e.get("id"),
                                 "owner_pid": (e.get("owner") or {}).get("pid")})
                except (OSError, ValueError):
                    pass
                items["journal"][p] = info
        runs = os.path.join(rt, "sb")  # backends/_container.sandbox_run_dir
        for fn in _listdir(runs):
            p = os.path.join(runs, fn)
            items["run_dirs"][p] = {"path": p, "ours": True}
    for d in scope.extra_state_dirs:
        for fn in _listdir(d):
            p = os.path.join(d, fn)
            items["oci_state"][p] = {"path": p, "ours": True}
    for sid, info in _cgroups().items():
        items["cgroups"][sid] = info
    for home in scope.homes:
        for key, info in _store_rows(home).items():
            items["store"][f"{home}:{key}"] = {**info, "ours": True}
    for tdir in ("/tmp", "/dev/shm"):
        for fn in _listdir(tdir):
            p = os.path.join(tdir, fn)
            if scope.tmp_root and os.path.realpath(p) == scope.tmp_root:
                continue
            if fn.startswith("ak-") and fn[3:].split("-", 1)[0].isdigit():
                pid = int(fn[3:].split("-", 1)[0])
                items["temp_dirs"][p] = {"path": p, "owner_pid": pid}
            elif fn.startswith(("akbench-", "akb-")):
                items["temp_dirs"][p] = {"path": p}
    prefixes = [*scope.runtime_dirs, *([scope.tmp_root] if scope.tmp_root else [])]
    items["mounts"] = _mounts(prefixes)
    for m in items["mounts"].values():
        m["ours"] = True
    return {"items": items, "errors": errors, "taken_at": time.time()}


# ---- classification ----------------------------------------------------------------------------------


def _pid_alive(pid: int, start: int | None) -> bool:
    from ..owner import process_start_time

    st = process_start_time(pid)
    if st is None:
        return False
    return not start or st == start


def classify(category: str, key: str, info: dict, scope: LeakScope) -> str:
    """'ours', 'foreign' or 'unattributed' (see the module docstring)."""
    if info.get("ours"):
        return "ours"
    if scope.names_us(key) or scope.names_us(json.dumps(info, default=str)):
        return "ours"
    labels = info.get("labels") or {}
    other_run = labels.get("agentkernel.bench-run")
    if other_run and other_run != scope.run_id:
        return "foreign"  # another bench run's resource: that run's own leak check answers for it
    pid_s = labels.get("agentkernel.owner.pid") or ""
    if pid_s.isdigit():
        pid = int(pid_s)
        start = labels.get("agentkernel.owner.start") or ""
        if scope.owns_label(pid, int(start) if start.isdigit() else None):
            return "ours"
        host = labels.get("agentkernel.owner.host")
        if host == os.uname().nodename and _pid_alive(pid, int(start) if start.isdigit() else None):
            return "foreign"
        return "unattributed"
    owner_pid = info.get("owner_pid")
    if isinstance(owner_pid, int):
        if owner_pid in scope.own_pids:
            return "ours"
        if _pid_alive(owner_pid, None):
            return "foreign"
    if category in ("runsc", "qemu_processes", "processes"):
        pid = info.get("pid")
        if isinstance(pid, int) and scope.owns_live(pid):
            return "ours"
    if category == "temp_dirs" and info.get("path") and _live_process_names(info["path"], scope):
        return "foreign"
    if category == "cgroups":
        procs = _cgroup_procs(info.get("paths") or [])
        if procs:
            root = (scope.runtime_dirs or [None])[0]
            return "ours" if root and any(_uses_dir(p, root) for p in procs) else "foreign"
    return "unattributed"


def _live_process_names(path: str, scope: LeakScope) -> bool:
    """A live process that is not this run's names ``path`` in its command line or environment."""
    needle = path.encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in scope.own_pids:
            continue
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{d}/{what}", "rb") as f:
                    if needle in f.read():
                        return True
            except OSError:
                continue
    return False


def _cgroup_procs(paths: list[str]) -> list[int]:
    for p in paths:
        try:
            with open(os.path.join(p, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
        if pids:
            return pids
    return []


def _uses_dir(pid: int, root: str) -> bool:
    """``pid`` has a bind mount from under ``root`` (a sandbox's run dir: its agent socket)."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(len(x) > 3 and x[3].startswith(prefix) for x in (ln.split() for ln in f))
    except OSError:
        return False


def _diff(now: dict, base: dict | None, scope: LeakScope) -> tuple[list[dict], list[dict]]:
    leaks, foreign = [], []
    base_items = (base or {}).get("items") or {}
    for cat, items in now["items"].items():
        old = base_items.get(cat) or {}
        for key, info in items.items():
            if key in old:
                continue
            kind = classify(cat, key, info, scope)
            row = {"category": cat, "key": key, "info": info, "attributed": kind == "ours", "kind": kind}
            (foreign if kind == "foreign" else leaks).append(row)
    return leaks, foreign


def check(scope: LeakScope, baseline: dict | None = None, *, settle_s: float = 10.0, label: str = "") -> dict[str, Any]:
    """What this run left behind (new since ``baseline``), after up to ``settle_s`` of settling."""
    t0 = time.monotonic()
    now = snapshot(scope)
    leaks, foreign = _diff(now, baseline, scope)
    while leaks and time.monotonic() - t0 < settle_s:
        time.sleep(0.5)
        now = snapshot(scope)
        leaks, foreign = _diff(now, baseline, scope)
    counts = {c: len(v) for c, v in now["items"].items()}
    return {
        "label": label,
        "clean": not leaks,
        "leaks": leaks,
        "leak_count": len(leaks),
        "attributed_count": sum(1 for x in leaks if x["attributed"]),
        "foreign": foreign,
        "categories": list(CATEGORIES),
        "present_counts": counts,
        "probe_errors": now["errors"],
        "duration_ms": round((time.monotonic() - t0) * 1e3, 3),
        "settle_s": settle_s,
    }


def cleanup(report: dict[str, Any], scope: LeakScope | None = None) -> list[str]:
    """Remove the leaks attributed to this run (after they were reported). Returns what was removed.
    A process is killed only when ``scope`` still shows it is one this run spawned (same start time)."""
    removed = []
    for leak in report.get("leaks", []):
        if not leak.get("attributed"):
            continue
        cat, key, info = leak["category"], leak["key"], leak["info"]
        try:
            if cat in ("podman_containers", "docker_containers"):
                engine = "podman" if cat.startswith("podman") else "docker"
                subprocess.run([engine, "rm", "-f", key], capture_output=True, timeout=120)
            elif cat in ("processes", "runsc", "qemu_processes") and info.get("pid"):
                if scope is None or not scope.owns_live(int(info["pid"])):  # exited or reused: not ours to kill
                    continue
                os.kill(int(info["pid"]), 9)
            elif cat in ("oci_state", "run_dirs", "journal", "temp_dirs") and info.get("path"):
                p = info["path"]
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
            else:
                continue
            removed.append(f"{cat}:{key}")
        except (OSError, subprocess.SubprocessError):
            continue
    return removed


def format_report(report: dict[str, Any]) -> str:
    lines = [f"leak check{(' (' + report['label'] + ')') if report.get('label') else ''}: "
             + ("clean" if report["clean"] else f"{report['leak_count']} leaked "
                f"({report['attributed_count']} attributed to this run)")]
    for leak in report["leaks"]:
        info = leak["info"]
        what = info.get("name") or info.get("path") or info.get("cmdline") or ""
        lines.append(f"  - {leak['category']}: {leak['key']} {what} [{leak['kind']}]")
    if report.get("foreign"):
        lines.append(f"  ({len(report['foreign'])} resources of other live owners ignored)")
    for cat, err in (report.get("probe_errors") or {}).items():
        lines.append(f"  ! could not check {cat}: {err}")
    return "\n".join(lines)
