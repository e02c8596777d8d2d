"""Full scan for orphans: every backend the registry marks ``gc`` is asked for its agentkernel resources
(its own listing), and those whose owner is provably dead are removed. The ownership journal covers the
common case cheaply (``owner.reap_dead``); this catches everything else, e.g. after the runtime dir was
wiped by a reboot. Used by ``agentkernel gc`` and by the daemon at start-up."""

from __future__ import annotations

import os

from . import owner, paths
from .backends import REGISTRY, get_backend_class
from .backends.base import LABEL_JOURNAL, LABEL_NAME, LABEL_STORE, SandboxRef, owner_from_labels
from .spec import SandboxSpec


def scanned() -> list[str]:
    """The backends whose resource listings the full scan reads (registry metadata ``gc``)."""
    return [name for name, e in REGISTRY.items() if e.gc]


def _store_has(store_path: str, sandbox_id: str) -> bool:
    """A named sandbox is kept while the store it belongs to still lists it, or when that store cannot be
    read without writing to it (another process's store is never created, migrated or touched)."""
    if not store_path or not os.path.exists(store_path):
        return False
    from .store import foreign_ids

    ids = foreign_ids(store_path)
    return ids is None or sandbox_id in ids


def _claimed_elsewhere(labels: dict[str, str], sandbox_id: str, own_journal: str) -> bool:
    """Made from another runtime dir (another daemon, user or test session): its owner's journal, named on
    the labels, decides. A live claim there wins over the labels; a journal we cannot read means the
    resource is not ours to judge."""
    journal = labels.get(LABEL_JOURNAL)
    if not journal or os.path.abspath(journal) == own_journal:
        return False
    return owner.claimed_alive(journal, sandbox_id) is not False


async def collect_orphans(seen: dict[str, set[str]] | None = None) -> list[tuple[str, object]]:
    """Listed sandboxes whose owner is dead. ``seen`` (optional) gets {backend: ids it listed} for every
    backend whose listing answered."""
    orphans = []
    # a journal entry with a live owner wins over the labels (e.g. a pool member leased to a client that
    # outlived the daemon named in the member's labels)
    claimed = owner.live_claims()
    own_journal = owner.journal_path()
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
            if owner.is_dead(owner_from_labels(labels)) and not _claimed_elsewhere(labels, info.id, own_journal):
                orphans.append((name, info))
    return orphans


async def reap(dry_run: bool = False) -> list[str]:
    """Remove every orphan (journal and full scan); ``dry_run`` only names them and removes nothing."""
    removed = []
    if dry_run:
        removed += [f"{e.get('backend')}:{e.get('id')}" for e in owner.dead_entries()]
    else:
        owner.reap_dead()
    seen: dict[str, set[str]] = {}
    orphans = await collect_orphans(seen)
    for name, info in orphans:
        if f"{name}:{info.id}" in removed:
            continue
        removed.append(f"{name}:{info.id}")
        if dry_run:
            continue
        backend = get_backend_class(name)()
        await backend.remove(SandboxRef(name, info.id, info.handle, SandboxSpec(backend=name)))
        await backend.aclose()
    removed += await _sweep_egress(seen, {i.id for _, i in orphans}, dry_run)
    removed += _sweep_disk_dirs(seen, set() if dry_run else {i.id for _, i in orphans}, dry_run)
    stores = {paths.store_path()} | {i.labels.get(LABEL_STORE) or "" for _, i in orphans}
    removed += _sweep_detached(sorted(s for s in stores if s), dry_run)
    return removed


def _sweep_detached(store_paths: list[str], dry_run: bool) -> list[str]:
    """Detached-command directories (``detached``) of sandboxes their store no longer lists: a sandbox
    removed without the manager (gc above, an engine-side delete) leaves them, and a live supervisor in them
    is killed. A store that cannot be read without writing to it is left alone."""
    from . import detached
    from .store import foreign_ids

    out = []
    for store_path in store_paths:
        try:
            ids = os.listdir(detached.root(store_path))
        except OSError:
            continue
        live = foreign_ids(store_path) if os.path.exists(store_path) else set()
        if live is None:
            continue
        for sid in sorted(set(ids) - live):
            out.append(f"detached:{sid}")
            if not dry_run:
                detached.reap(store_path, sid)
    return out


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


def _sweep_disk_dirs(seen: dict[str, set[str]], reaped: set[str], dry_run: bool) -> list[str]:
    """Capped workdirs (podman, gvisor) of sandboxes no engine lists: only when podman's listing answered (a
    failed listing is not "gone"; gvisor's containers are podman's)."""
    if "podman" not in seen:
        return []
    from .diskquota import remove_capped_dir

    claimed = {sid for _, sid in owner.live_claims()}
    live = (set().union(*seen.values()) - reaped) | claimed
    out = []
    for path in stale_disk_dirs(live):
        out.append(f"disk:{os.path.basename(path)}")
        if not dry_run:
            remove_capped_dir(path)
    return out


async def _sweep_egress(seen: dict[str, set[str]], reaped: set[str], dry_run: bool) -> list[str]:
    """Egress namespaces, veths, bridges and host tables no live sandbox uses (``egress.sweep``)."""
    import asyncio

    from .egress.sweep import sweep

    claimed = {sid for _, sid in owner.live_claims()}
    listed = set().union(*seen.values()) - reaped if seen else set()
    listed |= claimed
    all_answered = set(seen) >= set(scanned())  # records made before they named their backend: only then
    # backends listed through another one's scan (gvisor's containers are podman's, gvisor-docker's docker's)
    answered = set(seen) | {n for n, e in REGISTRY.items() if not e.gc and e.image_store in seen}
    try:
        return await asyncio.to_thread(sweep, listed, answered, all_answered, dry_run)
    except Exception as exc:  # the engines' sweep above is done; report, never fail gc on this
        return [f"egress sweep failed: {exc}"]
