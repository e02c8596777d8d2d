"""The full orphan scan (``agentkernel.reap``, used by ``gc`` and the daemon's start-up): what it may judge.

- A resource made from another runtime dir (another daemon, user or test session) is judged by its
  owner's journal, named on its labels: a live claim there (a leased pool member whose client outlived
  the daemon) wins over the labels' dead owner; a journal that cannot be read is not ours to judge.
- Another process's store is read without writing anything to it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys

import pytest

from agentkernel import owner, reap
from agentkernel.backends import get_backend
from agentkernel.backends.base import LABEL_JOURNAL, SandboxRef
from agentkernel.config import resolve_spec
from agentkernel.store import SCHEMA, foreign_ids
from tests.conftest import require_backend

pytestmark = pytest.mark.timeout(180)


def _dead_owner() -> dict:
    p = subprocess.Popen(["sleep", "30"])
    dead = owner.owner_of_pid(p.pid)
    p.kill()
    p.wait()
    assert owner.is_dead(dead)
    return dead


def _orphan_ids() -> set[str]:
    return {info.id for _name, info in asyncio.run(reap.collect_orphans())}


def test_scan_from_another_runtime_dir_reads_the_owners_journal(tmp_path, monkeypatch):
    """A pool member leased to a live client, labelled with its dead daemon, seen from a second runtime dir."""
    require_backend("podman")
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    spec = resolve_spec({"backend": "podman", "image": "agentkernel/busybox"})
    sid = owner.new_id("reap")

    async def create() -> SandboxRef:
        b = get_backend("podman")
        try:
            return await b.create(spec, sandbox_id=sid, owner=_dead_owner())  # the daemon that made it died
        finally:
            await b.aclose()

    async def remove(ref: SandboxRef) -> None:
        b = get_backend("podman")
        try:
            await b.remove(ref)
        finally:
            await b.aclose()

    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", run_a)
    ref = asyncio.run(create())
    try:
        (info,) = [i for i in asyncio.run(_listing()) if i.id == sid]
        assert info.labels[LABEL_JOURNAL] == os.path.join(run_a, "owned")
        owner.claim("podman", sid, ref.handle)  # the lease: this (live) process is its client
        assert sid not in _orphan_ids()  # the owner's own runtime dir: its journal wins, as before

        monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", run_b)
        assert sid not in _orphan_ids(), "a scan from another runtime dir would reap a member whose client lives"

        monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", run_a)
        owner.release("podman", sid)  # the client is done and gone: nobody lives to claim it
        monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", run_b)
        assert sid in _orphan_ids()

        # a journal that exists but cannot be read: not ours to judge
        os.rmdir(os.path.join(run_a, "owned"))
        with open(os.path.join(run_a, "owned"), "w") as f:
            f.write("not a directory")
        assert sid not in _orphan_ids()
        os.unlink(os.path.join(run_a, "owned"))  # a journal that is gone (wiped by a reboot) holds no claim
        assert sid in _orphan_ids()
    finally:
        asyncio.run(remove(ref))


async def _listing():
    b = get_backend("podman")
    try:
        return await b.list()
    finally:
        await b.aclose()


def _wal_store(path: str, ids: list[str]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    for i, sid in enumerate(ids):
        db.execute("INSERT INTO sandboxes_v2(name, id, backend, spec, state, created_at, updated_at) "
                   "VALUES (?, ?, 'podman', '{}', 'created', 0, 0)", (f"n{i}", sid))
    db.close()


def _snapshot(d: str) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for fn in sorted(os.listdir(d)):
        st = os.stat(os.path.join(d, fn))
        with open(os.path.join(d, fn), "rb") as f:
            out[fn] = (st.st_mode, st.st_mtime_ns, f.read())
    return out


def test_foreign_store_is_read_without_writing_anything(tmp_path):
    store = str(tmp_path / "state.db")
    _wal_store(store, ["keep-0123456789"])
    before = _snapshot(str(tmp_path))
    assert reap._store_has(store, "keep-0123456789")
    assert not reap._store_has(store, "gone-0123456789")
    assert _snapshot(str(tmp_path)) == before  # no -wal/-shm left next to it, not a byte changed


def test_foreign_store_with_a_live_writer_sees_rows_only_in_its_wal(tmp_path):
    store = str(tmp_path / "state.db")
    _wal_store(store, [])
    writer = sqlite3.connect(store, isolation_level=None)
    try:
        writer.execute("INSERT INTO sandboxes_v2(name, id, backend, spec, state, created_at, updated_at) "
                       "VALUES ('w', 'wal-0123456789', 'podman', '{}', 'created', 0, 0)")
        assert os.path.exists(store + "-wal")
        assert reap._store_has(store, "wal-0123456789")
    finally:
        writer.close()


def test_old_schema_store_is_not_migrated(tmp_path):
    store = str(tmp_path / "state.db")
    db = sqlite3.connect(store, isolation_level=None)
    db.execute("CREATE TABLE sandboxes_v2 (owner TEXT, name TEXT, id TEXT)")
    db.execute("INSERT INTO sandboxes_v2 VALUES ('local', 'old', 'old-0123456789')")
    db.close()
    assert reap._store_has(store, "old-0123456789")
    cols = {r[1] for r in sqlite3.connect(store).execute("PRAGMA table_info(sandboxes_v2)")}
    assert "owner" in cols and "tenant" not in cols


def test_unreadable_store_keeps_its_sandboxes(tmp_path):
    store = str(tmp_path / "state.db")
    with open(store, "wb") as f:
        f.write(b"not a database" * 100)
    assert foreign_ids(store) is None
    assert reap._store_has(store, "any-0123456789")


def test_read_only_store(tmp_path):
    """On a read-only mount (another user's store, a snapshot): listed ids are kept, others are not."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--version"], capture_output=True).returncode != 0:
        pytest.fail("needs root and unshare(1) to make a read-only mount")
    d = tmp_path / "ro"
    d.mkdir()
    store = str(d / "state.db")
    _wal_store(store, ["keep-0123456789"])
    code = ("import sys; from agentkernel import reap; "
            f"sys.exit(10 * reap._store_has({store!r}, 'keep-0123456789') + reap._store_has({store!r}, 'x-1'))")
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$1" -c "$2"', str(d),
                        sys.executable, code], capture_output=True, text=True)
    assert r.returncode == 10, r.stderr


def test_gc_sweeps_detached_commands_of_sandboxes_the_store_no_longer_lists(tmp_path):
    """A sandbox removed without the manager (gc, an engine-side delete) leaves its detached-command
    directory: the full scan kills a supervisor still running there and deletes it, and leaves the
    directories of sandboxes the store still lists alone (a dry run only names them)."""
    from agentkernel import detached

    store = str(tmp_path / "state.db")
    _wal_store(store, ["keep-0123456789"])
    sup = subprocess.Popen(["sleep", "60"])
    try:
        for sid, status in (("keep-0123456789", "running"), ("gone-0123456789", "running")):
            d = detached.sandbox_dir(store, sid)
            os.makedirs(d)
            detached.save(os.path.join(d, "c0ffee.json"), {
                "id": "c0ffee", "sandbox": "n", "command": ["sleep", "60"], "status": status,
                "supervisor": owner.owner_of_pid(sup.pid) if sid.startswith("gone") else None})
        assert reap._sweep_detached([store], dry_run=True) == ["detached:gone-0123456789"]
        assert os.path.isdir(detached.sandbox_dir(store, "gone-0123456789")) and sup.poll() is None
        assert reap._sweep_detached([store], dry_run=False) == ["detached:gone-0123456789"]
        assert sup.wait(timeout=10) == -15  # the supervisor got SIGTERM
        assert not os.path.exists(detached.sandbox_dir(store, "gone-0123456789"))
        assert os.path.isdir(detached.sandbox_dir(store, "keep-0123456789"))
    finally:
        sup.kill()
        sup.wait()
