"""Full scan for orphans: every backend the registry marks ``gc`` is asked for its agentkernel resources
(its own listing), and those whose owner is provably dead are removed. The ownership journal covers the
common case cheaply (``owner.reap_dead``); this catches everything else, e.g. after the runtime dir was
wiped by a reboot. Used by ``agentkernel gc`` and by the daemon at start-up."""

from __future__ import annotations

import os

from . import owner
from .backends import REGISTRY, get_backend_class
from .backends.base import LABEL_NAME, LABEL_STORE, SandboxRef, owner_from_labels
from .spec import SandboxSpec


def scanned() -> list[str]:
    """The backends whose resource listings the full scan reads (registry metadata ``gc``)."""
    return [name for name, e in REGISTRY.items() if e.gc]


def _store_has(store_path: str, sandbox_id: str) -> bool:
    """A named sandbox is kept while the store it belongs to still lists it."""
    if not store_path or not os.path.exists(store_path):
        return False
    import sqlite3

    from .store import Store

    try:
        st = Store(store_path, readonly=True)  # never create or migrate another process's store
        try:
            return sandbox_id in st.ids()
        finally:
            st.close()
    except sqlite3.Error:
        return True  # a store we cannot read (busy, another schema): keep its sandboxes


async def collect_orphans(listed: set[str] | None = None) -> list[tuple[str, object]]:
    """Resources whose owner is dead. ``listed`` (when given) receives the id of every resource seen, plus
    every id the journal says a live owner holds."""
    orphans = []
    # a journal entry with a live owner wins over the labels (e.g. a pool member leased to a client that
    # outlived the daemon named in the member's labels)
    claimed = {(e.get("backend"), e.get("id")) for e in owner.entries() if not owner.is_dead(e.get("owner") or {})}
    for name in scanned():
        try:
            cls = get_backend_class(name)
            if not cls.probe().available:
                continue
            backend = cls()
            infos = await backend.list()
        except Exception:
            continue
        if listed is not None:
            listed.add(f"backend:{name}")  # this engine's listing is complete
        for info in infos:
            if listed is not None:
                listed.add(info.id)
            labels = info.labels
            if labels.get(LABEL_NAME) and _store_has(labels.get(LABEL_STORE, ""), info.id):
                continue
            if (name, info.id) in claimed:
                continue
            if owner.is_dead(owner_from_labels(labels)):
                orphans.append((name, info))
    if listed is not None:
        listed.update(i for _, i in claimed)
    return orphans


# a capped directory is made a moment before its container: younger ones may belong to a create in progress
DISK_DIR_GRACE_S = 300.0


def stale_disk_dirs(live: set[str]) -> list[str]:
    """Capped sandbox directories (``diskquota.sandboxes_dir()``) whose sandbox no engine lists any more."""
    import time

    from .diskquota import sandboxes_dir

    base = sandboxes_dir()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    now = time.time()
    grace = float(os.environ.get("AGENTKERNEL_DISK_DIR_GRACE_S") or DISK_DIR_GRACE_S)
    out = []
    for name in names:
        if name in live:
            continue
        path = os.path.join(base, name)
        try:
            if now - os.lstat(path).st_ctime < grace:
                continue
        except OSError:
            continue
        out.append(path)
    return out


async def reap(dry_run: bool = False) -> list[str]:
    removed = []
    owner.reap_dead()
    listed: set[str] = set()
    orphans = await collect_orphans(listed)
    for name, info in orphans:
        removed.append(f"{name}:{info.id}")
        if dry_run:
            continue
        backend = get_backend_class(name)()
        await backend.remove(SandboxRef(name, info.id, info.handle, SandboxSpec(backend=name)))
        await backend.aclose()
    if not dry_run:  # the removals above took their own capped directories
        listed -= {info.id for _, info in orphans}
    from .diskquota import remove_capped_dir

    # only when every engine that binds capped directories was listed (a failed listing is not "gone")
    complete = all(f"backend:{n}" in listed for n in ("podman", "gvisor") if n in scanned())
    for path in stale_disk_dirs(listed) if complete else ():
        removed.append(f"disk:{os.path.basename(path)}")
        if not dry_run:
            remove_capped_dir(path)
    return removed
