"""Ownership: who owns each live engine resource, and reaping what a dead owner left behind.

Every sandbox resource is owned by exactly one process (the daemon, or the CLI process of a one-shot
run). An owner is (host, boot id, pid, process start time): the pid alone is not enough, pids are
reused. An owner is *provably dead* when it is on this host and either the boot id differs or no
process with that pid and start time exists. Resources of owners on other hosts are never touched.

Two records exist for every resource, on purpose:
- labels on the engine resource itself (the truth; scanned by the daemon at start and by ``gc``),
- an entry in the ownership journal: one small JSON file per resource in the runtime dir. Listing
  that directory costs microseconds, so *every* command can reap dead owners' resources before it
  starts without asking any engine. (An engine-wide label scan costs 50-200 ms; it runs only in the
  daemon's start-up, ``agentkernel gc`` and ``doctor``.)

Standard library only; imported on the CLI's hot path.
"""

from __future__ import annotations

import json
import os

from . import paths

_BOOT_ID: str | None = None
_SELF: dict | None = None


def _hostname() -> str:
    return os.uname().nodename


def new_id(prefix: str) -> str:
    """A sandbox id: readable prefix (the name, or "run") plus 10 random hex digits."""
    return f"{prefix}-{os.urandom(5).hex()}"


def boot_id() -> str:
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


def process_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or None when there
    is no such live process (absent, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and ')' : split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    if rest[0] in (b"Z", b"X"):  # a zombie has exited: it owns nothing any more
        return None
    return int(rest[19])


def current_owner() -> dict:
    """This process as an owner."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF["pid"] != pid:
        _SELF = {"host": _hostname(), "boot": boot_id(), "pid": pid,
                 "start": process_start_time(pid) or 0}
    return dict(_SELF)


def owner_of_pid(pid: int) -> dict:
    return {"host": _hostname(), "boot": boot_id(), "pid": pid, "start": process_start_time(pid) or 0}


def is_dead(owner: dict) -> bool:
    """True only when the owner is provably gone (same host; other boot, or pid+start not alive)."""
    if not owner or owner.get("host") != _hostname():
        return False
    if owner.get("boot") and owner.get("boot") != boot_id():
        return True
    pid = int(owner.get("pid") or 0)
    if pid <= 0:
        return False
    start = process_start_time(pid)
    if start is None:
        return True
    return bool(owner.get("start")) and start != int(owner["start"])


# ---- the journal ----------------------------------------------------------------------------------


def journal_dir() -> str:
    d = os.path.join(paths.runtime_dir(), "owned")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _entry_path(backend: str, sandbox_id: str) -> str:
    return os.path.join(journal_dir(), f"{backend}--{sandbox_id}.json")


def claim(backend: str, sandbox_id: str, handle: dict, owner: dict | None = None) -> str:
    """Record that ``owner`` (default: this process) owns a resource. Call BEFORE creating it."""
    entry = {"backend": backend, "id": sandbox_id, "handle": handle, "owner": owner or current_owner()}
    path = _entry_path(backend, sandbox_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, path)
    return path


def release(backend: str, sandbox_id: str) -> None:
    """The resource is gone (or handed to the store as a named sandbox): forget it."""
    try:
        os.unlink(_entry_path(backend, sandbox_id))
    except FileNotFoundError:
        pass


def transfer(backend: str, sandbox_id: str, new_owner: dict) -> None:
    """Hand a resource to another process (e.g. a detached remover)."""
    path = _entry_path(backend, sandbox_id)
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return
    entry["owner"] = new_owner
    claim(entry["backend"], entry["id"], entry["handle"], new_owner)


def entries() -> list[dict]:
    out = []
    d = journal_dir()
    for fn in os.listdir(d):
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return out


def dead_entries() -> list[dict]:
    return [e for e in entries() if is_dead(e.get("owner") or {})]


def reap_dead(verbose: bool = False) -> int:
    """Remove every journalled resource whose owner is provably dead. Cheap when there are none
    (one listdir); imports asyncio and the backends only when there is something to reap."""
    d = journal_dir()
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    if not names:
        return 0
    dead = dead_entries()
    if not dead:
        return 0
    import asyncio

    from .backends import get_backend_class

    async def reap_all() -> int:
        from .backends.base import SandboxRef
        from .spec import SandboxSpec

        n = 0
        for e in dead:
            try:
                cls = get_backend_class(e["backend"])
                backend = cls()
                ref = SandboxRef(e["backend"], e["id"], e["handle"], SandboxSpec(backend=e["backend"]))
                await backend.remove(ref)
                await backend.aclose()
            except Exception as exc:  # keep the entry: the next command retries
                if verbose:
                    import sys

                    print(f"agentkernel: could not reap {e['backend']}:{e['id']}: {exc}", file=sys.stderr)
                continue
            release(e["backend"], e["id"])
            n += 1
        return n

    return asyncio.run(reap_all())
