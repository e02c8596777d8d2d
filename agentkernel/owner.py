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


journal_path = paths.journal_path  # this process's journal directory (named on every resource's labels)


def journal_dir() -> str:
    d = journal_path()
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _prefix(backend: str, sandbox_id: str) -> str:
    return f"{backend}--{sandbox_id}--"


def entry_name(backend: str, sandbox_id: str, owner: dict) -> str:
    """The journal entry's file name for ``sandbox_id`` owned by ``owner``. The owner's pid and start time
    are in the name, so a command can tell live owners' entries from dead ones without opening (or
    json-parsing) anything: every CLI start lists this directory."""
    return f"{_prefix(backend, sandbox_id)}{int(owner.get('pid') or 0)}.{int(owner.get('start') or 0)}.json"


def _find(backend: str, sandbox_id: str) -> list[str]:
    d = journal_dir()
    pre = _prefix(backend, sandbox_id)
    return [os.path.join(d, fn) for fn in os.listdir(d) if fn.startswith(pre) and fn.endswith(".json")]


def claim(backend: str, sandbox_id: str, handle: dict, owner: dict | None = None, *, sole: bool = False) -> str:
    """Record that ``owner`` (default: this process) owns a resource. Call BEFORE creating it; call again
    to update the handle or to hand the resource to another owner. ``sole``: no entry of another owner can
    exist for this id (this process made the id and has shown it to no one, or only ever claimed it under
    ``owner``): the journal is not listed for them (a resource has one entry at a time; see ``lend``)."""
    from ._fastjson import dumps

    owner = owner or current_owner()
    entry = {"backend": backend, "id": sandbox_id, "handle": handle, "owner": owner}
    path = os.path.join(journal_dir(), entry_name(backend, sandbox_id, owner))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(dumps(entry))
    os.replace(tmp, path)
    if not sole:
        for other in _find(backend, sandbox_id):
            if other != path:
                _unlink(other)
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def release(backend: str, sandbox_id: str, owners: tuple[dict, ...] = ()) -> None:
    """The resource is gone (or handed to the store as a named sandbox): forget it. ``owners``: whom its
    entry's name may give (its owner, a lease's client it was lent to): it is looked for under those names
    first, and the journal is listed only when it is under none of them."""
    if owners:
        d = journal_dir()
        for who in owners:
            try:
                os.unlink(os.path.join(d, entry_name(backend, sandbox_id, who)))
                return  # one entry per resource: claim and lend replace, hand_back renames
            except FileNotFoundError:
                continue
    for path in _find(backend, sandbox_id):
        _unlink(path)


def lend(backend: str, sandbox_id: str, holder: dict) -> bool:
    """This process's entry for ``sandbox_id`` is renamed to ``holder`` (a live process: a lease's client),
    one rename instead of a new entry: while the holder lives, the entry is a live claim for every reader
    (``reap_dead``, ``live_claims``, ``claimed_alive`` go by the name), and its content still names this
    process, so once both are gone the first command reaps it. The holder gives it back with
    ``hand_back``. False when this process has no entry for it (the caller claims for the holder instead)."""
    d = journal_path()
    try:
        os.rename(os.path.join(d, entry_name(backend, sandbox_id, current_owner())),
                  os.path.join(d, entry_name(backend, sandbox_id, holder)))
        return True
    except OSError:
        return False


def transfer(backend: str, sandbox_id: str, new_owner: dict) -> None:
    """Hand a resource to another process (e.g. a detached remover)."""
    import json

    for path in _find(backend, sandbox_id):
        try:
            with open(path) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        claim(entry["backend"], entry["id"], entry["handle"], new_owner)
        return


def hand_back(sandbox_id: str, holder_pid: int, backend: str | None = None) -> bool:
    """This process's claim on ``sandbox_id`` becomes ``holder_pid``'s (the daemon that lent it), by renaming
    the entry: a client calls this as its lease ends, before telling the daemon, so that the commands run
    right after it never see a dead owner's entry for a member the daemon is about to remove (and race the
    daemon to reap it: ~60 ms of asyncio and backend imports each). The entry's content still names this
    process: if the holder dies too, the first command after both reaps it as before. ``backend``: the
    entry's backend when known (one rename, no listing). True when renamed."""
    start = process_start_time(holder_pid) if holder_pid > 0 else None
    if not start:
        return False
    me = current_owner()
    d = journal_path()
    if backend:
        try:
            os.rename(os.path.join(d, entry_name(backend, sandbox_id, me)),
                      os.path.join(d, entry_name(backend, sandbox_id, {"pid": holder_pid, "start": start})))
            return True
        except OSError:
            pass  # not under that name: look for it
    old = f"--{sandbox_id}--{me['pid']}.{me['start']}.json"
    try:
        names = [fn for fn in os.listdir(d) if fn.endswith(old)]
    except OSError:
        return False
    for fn in names:
        try:
            new = f"{fn[: -len(old)]}--{sandbox_id}--{holder_pid}.{start}.json"
            os.rename(os.path.join(d, fn), os.path.join(d, new))
            return True
        except OSError:
            pass
    return False


def _alive_by_name(fn: str) -> bool:
    """From the entry's name alone: is its owner (pid + start time) a live process?"""
    try:
        pid_start = fn[: -len(".json")].rsplit("--", 1)[1]
        pid, start = (int(x) for x in pid_start.split("."))
    except (IndexError, ValueError):
        return False
    return pid > 0 and process_start_time(pid) == start


def claimed_alive(journal: str, sandbox_id: str) -> bool | None:
    """Does a live process claim ``sandbox_id`` in ``journal`` (another runtime dir's journal, named on a
    resource's labels)? None when that journal exists but cannot be read: then its resources are not ours
    to judge. A journal that is gone (e.g. a runtime dir wiped by a reboot) holds no live claim."""
    try:
        names = os.listdir(journal)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    mid = f"--{sandbox_id}--"
    return any(mid in fn and fn.endswith(".json") and _alive_by_name(fn) for fn in names)


def entries() -> list[dict]:
    import json

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


def live_claims() -> set[tuple[str, str]]:
    """(backend, id) of every entry whose owner is not provably dead: the process its name gives is alive
    (a lease's client, ``lend``: skipped unread), or the owner its content names is not provably dead."""
    from . import _fastjson as json

    out = set()
    d = journal_dir()
    for fn in os.listdir(d):
        if not fn.endswith(".json"):
            continue
        if _alive_by_name(fn):
            backend, _, rest = fn.partition("--")
            sid = rest.rsplit("--", 1)[0]
            if backend and sid:
                out.add((backend, sid))
                continue
        try:
            with open(os.path.join(d, fn), "rb") as f:
                e = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if not is_dead(e.get("owner") or {}):
            out.add((e.get("backend"), e.get("id")))
    return out


def dead_entries() -> list[dict]:
    """Entries whose owner is provably dead (names of live owners are skipped unread)."""
    from . import _fastjson as json  # the CLI's start-up path: no json package (re, enum) import

    out = []
    d = journal_dir()
    for fn in os.listdir(d):
        if not fn.endswith(".json") or _alive_by_name(fn):
            continue
        try:
            with open(os.path.join(d, fn), "rb") as f:
                e = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if is_dead(e.get("owner") or {}):
            out.append(e)
    return out


def reap_dead(verbose: bool = False) -> int:
    """Remove every journalled resource whose owner is provably dead. Cheap when there are none
    (one listdir); imports asyncio and the backends only when there is something to reap."""
    d = journal_dir()
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    seen: dict[str, bool] = {}  # owner ("PID.START") -> alive: a daemon's pool entries all name one owner

    def alive(fn: str) -> bool:
        who = fn.rsplit("--", 1)[-1]
        if who not in seen:
            seen[who] = _alive_by_name(fn)
        return seen[who]

    if all(fn.endswith(".tmp") or alive(fn) for fn in names):
        return 0
    dead = dead_entries()
    if not dead:
        return 0
    return _remove_entries(dead, verbose)


def reap_one(backend: str, sandbox_id: str, verbose: bool = False) -> int:
    """Remove one journalled resource now, whoever owns it (the death watcher of an owner that just died:
    its owner may still be a zombie, which ``is_dead`` cannot yet tell from a live process)."""
    import json

    found = []
    for path in _find(backend, sandbox_id):
        try:
            with open(path) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue
    return _remove_entries(found[:1], verbose) if found else 0


def _remove_entries(dead: list[dict], verbose: bool) -> int:
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
