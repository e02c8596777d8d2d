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


async def collect_orphans(seen: dict[str, set[str]] | None = None) -> list[tuple[str, object]]:
    """Listed sandboxes whose owner is dead. ``seen`` (optional) gets {backend: ids it listed} for every
    backend whose listing answered."""
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
        if seen is not None:
            seen[name] = {i.id for i in infos}
        for info in infos:
            labels = info.labels
            if labels.get(LABEL_NAME) and _store_has(labels.get(LABEL_STORE, ""), info.id):
                continue
            if (name, info.id) in claimed:
                continue
            if owner.is_dead(owner_from_labels(labels)):
                orphans.append((name, info))
    return orphans


async def reap(dry_run: bool = False) -> list[str]:
    removed = []
    owner.reap_dead()
    seen: dict[str, set[str]] = {}
    orphans = await collect_orphans(seen)
    for name, info in orphans:
        removed.append(f"{name}:{info.id}")
        if dry_run:
            continue
        backend = get_backend_class(name)()
        await backend.remove(SandboxRef(name, info.id, info.handle, SandboxSpec(backend=name)))
        await backend.aclose()
    removed += await _sweep_egress(seen, {i.id for _, i in orphans}, dry_run)
    return removed


async def _sweep_egress(seen: dict[str, set[str]], reaped: set[str], dry_run: bool) -> list[str]:
    """Egress namespaces, veths, bridges and host tables no live sandbox uses (``egress.sweep``)."""
    import asyncio

    from .egress.sweep import sweep

    claimed = {e.get("id") for e in owner.entries() if not owner.is_dead(e.get("owner") or {})}
    listed = set().union(*seen.values()) - reaped if seen else set()
    listed |= claimed
    all_answered = set(seen) >= set(scanned())  # records made before they named their backend: only then
    # backends listed through another one's scan (gvisor's containers are podman's, gvisor-docker's docker's)
    answered = set(seen) | {n for n, e in REGISTRY.items() if not e.gc and e.image_store in seen}
    try:
        return await asyncio.to_thread(sweep, listed, answered, all_answered, dry_run)
    except Exception as exc:  # the engines' sweep above is done; report, never fail gc on this
        return [f"egress sweep failed: {exc}"]
