"""Detached commands in named sandboxes: each runs under a supervisor process of its own, with its state
and bounded output on disk next to the sandbox store, so it outlives the client that started it and the
server (``serve``) that did, and a restarted server still reports it.

Layout (one directory per sandbox, beside the store's database)::

    <store dir>/detached/<sandbox id>/<cmd id>.json      state (written atomically)
    <store dir>/detached/<sandbox id>/<cmd id>.stdout    first OUTPUT_LIMIT bytes of each stream
    <store dir>/detached/<sandbox id>/<cmd id>.stderr

The supervisor (``python -m agentkernel.detachedrun STATE``, a session of its own) runs the command
through the manager like any exec, records the command's pid inside the sandbox (from the in-sandbox agent)
and its own, and when it ends its exit code or signal. SIGTERM to the supervisor kills the command. A
state that says "running" whose supervisor is provably gone (``owner.is_dead``) reads as failed.
Removing the sandbox (``SandboxManager.remove``) kills its detached commands and deletes their directory;
``reap_orphans`` (``serve``'s maintenance) and ``agentkernel gc`` (``reap._sweep_detached``) do the same for
sandboxes that vanished another way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from typing import Any

from . import owner

OUTPUT_LIMIT = 8 << 20  # bytes kept per stream
TIMEOUT_S = 24 * 3600.0  # the longest a detached command may run
_ID_CHARS = set("0123456789abcdef")


def root(store_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(store_path)), "detached")


def sandbox_dir(store_path: str, sandbox_id: str) -> str:
    return os.path.join(root(store_path), sandbox_id)


def _state_path(d: str, cmd_id: str) -> str:
    return os.path.join(d, f"{cmd_id}.json")


def output_path(d: str, cmd_id: str, stream: str) -> str:
    return os.path.join(d, f"{cmd_id}.{stream}")


def save(path: str, st: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, path)


def load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _alive(st: dict[str, Any]) -> bool:
    sup = st.get("supervisor")
    return bool(sup) and not owner.is_dead(sup)


def view(d: str, st: dict[str, Any]) -> dict[str, Any]:
    """The public shape of a state (the reference clients' fields plus ours)."""
    sizes = {}
    for s in ("stdout", "stderr"):
        try:
            sizes[s] = os.path.getsize(output_path(d, st["id"], s))
        except OSError:
            sizes[s] = 0
    return {"id": st["id"], "sandbox": st["sandbox"], "command": st["command"], "pid": st.get("pid") or 0,
            "supervisor_pid": (st.get("supervisor") or {}).get("pid") or 0, "status": st["status"],
            "exit_code": st.get("exit_code"), "signal": st.get("signal"), "error": st.get("error"),
            "started_at": _iso(st.get("started_at")), "ended_at": _iso(st.get("ended_at")),
            "stdout_bytes": sizes["stdout"], "stderr_bytes": sizes["stderr"],
            "truncated": bool(st.get("truncated", {}).get("stdout") or st.get("truncated", {}).get("stderr"))}


def read_state(d: str, cmd_id: str) -> dict[str, Any] | None:
    """A command's state, or None. A running state whose supervisor is gone is settled as failed."""
    if not cmd_id or not set(cmd_id) <= _ID_CHARS or len(cmd_id) > 32:
        return None
    path = _state_path(d, cmd_id)
    st = load(path)
    if st is None:
        return None
    if st["status"] in ("starting", "running") and st.get("supervisor") and not _alive(st):
        st["status"] = "failed"
        st["error"] = st.get("error") or "its supervisor ended without recording an exit (host restart or kill)"
        st["ended_at"] = st.get("ended_at") or time.time()
        save(path, st)
    return st


def list_states(d: str) -> list[dict[str, Any]]:
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out = [read_state(d, n[:-5]) for n in names if n.endswith(".json")]
    return sorted((s for s in out if s is not None), key=lambda s: s.get("started_at") or 0)


def start(store_path: str, *, tenant: str, sandbox: str, sandbox_id: str, argv: list[str],
          env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = TIMEOUT_S,
          wait_s: float = 10.0) -> dict[str, Any]:
    """Write the state, launch the supervisor, wait until the command runs (or failed to); the state."""
    import subprocess

    d = sandbox_dir(store_path, sandbox_id)
    os.makedirs(d, mode=0o700, exist_ok=True)
    cmd_id = uuid.uuid4().hex[:16]
    path = _state_path(d, cmd_id)
    save(path, {"id": cmd_id, "sandbox": sandbox, "sandbox_id": sandbox_id, "tenant": tenant,
                 "command": list(argv), "env": dict(env or {}), "cwd": cwd, "timeout": timeout,
                 "store": os.path.abspath(store_path), "status": "starting", "started_at": time.time(),
                 "truncated": {"stdout": False, "stderr": False}})
    with open(os.path.join(d, f"{cmd_id}.log"), "wb") as log:
        # the launcher forks the supervisor into a session of its own and exits at once (no zombie here)
        subprocess.run([sys.executable, "-m", "agentkernel.detachedrun", path], stdin=subprocess.DEVNULL,
                       stdout=log, stderr=log, check=True, timeout=30)
    deadline = time.monotonic() + wait_s
    while True:
        st = read_state(d, cmd_id)
        assert st is not None
        if st["status"] != "starting" or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def kill(d: str, cmd_id: str, wait_s: float = 10.0) -> bool:
    """SIGTERM the command's supervisor (it kills the command and records it) and wait, up to ``wait_s``,
    until it has recorded the end and exited: when this returns, nothing of the command runs. False if it
    had ended."""
    st = read_state(d, cmd_id)
    if st is None or st["status"] not in ("starting", "running") or not _alive(st):
        return False
    supervisor = st
    os.kill(int(st["supervisor"]["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        st = read_state(d, cmd_id)
        if (st is None or st["status"] not in ("starting", "running")) and not _alive(supervisor):
            break
        time.sleep(0.02)
    return True


def reap(store_path: str, sandbox_id: str, wait_s: float = 10.0) -> int:
    """The sandbox is gone: kill its detached commands, wait for their supervisors to end (they write their
    final state), then delete the state and output. Returns how many commands there were."""
    d = sandbox_dir(store_path, sandbox_id)
    states = list_states(d)
    live = [st for st in states if _alive(st)]
    for st in live:
        if st["status"] in ("starting", "running"):
            try:
                os.kill(int(st["supervisor"]["pid"]), signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + wait_s
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        live = [st for st in live if _alive(st)]
    for _ in range(3):  # a supervisor still ending may write once more: remove until it is gone
        shutil.rmtree(d, ignore_errors=True)
        if not os.path.exists(d):
            break
        time.sleep(0.1)
    return len(states)


def reap_orphans(store_path: str, live_ids: set[str]) -> int:
    """Directories of sandboxes that no longer exist (removed without the manager, e.g. by gc)."""
    try:
        ids = os.listdir(root(store_path))
    except FileNotFoundError:
        return 0
    return sum(reap(store_path, sid) for sid in ids if sid not in live_ids)
