"""Durable state: named sandboxes, their spec, engine handle, state and tenant (SQLite, WAL).

A name is reserved (state ``creating``) before any engine resource exists, so two concurrent creates
of one name cannot both succeed, and a crash mid-create leaves a row the next command can see and
clean up. Names are unique per tenant (the CLI is tenant "local"; each HTTP API token is its own
tenant), so one tenant cannot even learn which names another uses. Only named (long-lived) sandboxes
live here; one-shot runs and pool members are tracked by the ownership journal (``owner.py``).
"""

from __future__ import annotations

import os
import sqlite3
import time

from . import paths
from ._fastjson import dumps, loads
from .errors import AlreadyExists, NotFound

TYPE_CHECKING = False  # typing costs ~2.5 ms at start-up (the exec fast path reads this store)
if TYPE_CHECKING:
    from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes_v2 (
    tenant      TEXT NOT NULL DEFAULT 'local',
    name        TEXT NOT NULL,
    id          TEXT NOT NULL UNIQUE,
    backend     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    handle      TEXT NOT NULL DEFAULT '{}',
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
"""


LOCAL = "local"  # the tenant of everything created through the CLI and the in-process API


class SandboxRecord:
    __slots__ = ("backend", "created_at", "handle", "id", "name", "spec", "state", "tenant", "updated_at")

    def __init__(self, row: sqlite3.Row) -> None:
        self.name = row["name"]
        self.id = row["id"]
        self.backend = row["backend"]
        self.spec = loads(row["spec"])
        self.handle = loads(row["handle"])
        self.state = row["state"]
        self.tenant = row["tenant"]
        self.created_at = row["created_at"]
        self.updated_at = row["updated_at"]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Store:
    def __init__(self, path: str | None = None, *, readonly: bool = False) -> None:
        self.path = path or paths.store_path()
        if readonly:  # the exec fast path: no schema script, no pragmas, no writes
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._gen = 0
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._gen = 0  # this connection's own writes (SQLite's data_version does not count them)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        _migrate(self._db)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    @property
    def id(self) -> str:
        """Identifies this store on resource labels (so gc knows which store a sandbox belongs to)."""
        return os.path.abspath(self.path)

    def close(self) -> None:
        self._db.close()

    def stamp(self) -> tuple[int, int]:
        """Moves whenever a sandbox row may have changed, so a record read under one stamp may be reused
        while the stamp stays equal (``SandboxManager.lookup``): SQLite's ``data_version`` moves on every
        commit by any other connection (the CLI, another server, gc: other processes included), the local
        generation on this connection's own writes. One cheap read (no row, no JSON)."""
        return self._db.execute("PRAGMA data_version").fetchone()[0], self._gen

    def reserve(self, name: str, sandbox_id: str, backend: str, spec: dict, tenant: str = LOCAL) -> None:
        now = time.time()
        try:
            self._db.execute(
                "INSERT INTO sandboxes_v2(name, id, backend, spec, state, tenant, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'creating', ?, ?, ?)",
                (name, sandbox_id, backend, dumps(spec, sort_keys=True), tenant, now, now),
            )
            self._gen += 1
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a sandbox named {name!r} already exists",
                                hint=f"agentkernel rm {name}, or choose another name") from None

    def update(self, sandbox_id: str, *, state: str | None = None, handle: dict | None = None) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if state is not None:
            sets.append("state = ?")
            args.append(state)
        if handle is not None:
            sets.append("handle = ?")
            args.append(dumps(handle, sort_keys=True))
        args.append(sandbox_id)
        self._db.execute(f"UPDATE sandboxes_v2 SET {', '.join(sets)} WHERE id = ?", args)
        self._gen += 1

    def get(self, name: str, tenant: str | None = None) -> SandboxRecord:
        rec = self.find(name, tenant)
        if rec is None:
            raise NotFound(f"no sandbox named {name!r}", hint="agentkernel list shows the sandboxes")
        return rec

    def find(self, name: str, tenant: str | None = None) -> SandboxRecord | None:
        row = self._db.execute("SELECT * FROM sandboxes_v2 WHERE tenant = ? AND name = ?",
                               (tenant or LOCAL, name)).fetchone()
        return SandboxRecord(row) if row else None

    def delete(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM sandboxes_v2 WHERE id = ?", (sandbox_id,))
        self._gen += 1

    def list(self, tenant: str | None = None) -> list[SandboxRecord]:
        """One tenant's sandboxes (default: the local CLI's)."""
        rows = self._db.execute("SELECT * FROM sandboxes_v2 WHERE tenant = ? ORDER BY created_at",
                                (tenant or LOCAL,)).fetchall()
        return [SandboxRecord(r) for r in rows]

    def list_all(self) -> list[SandboxRecord]:
        """Every tenant's sandboxes (metrics, garbage collection)."""
        return [SandboxRecord(r) for r in self._db.execute("SELECT * FROM sandboxes_v2 ORDER BY created_at")]

    def ids(self) -> set[str]:
        """Every tenant's sandbox ids (for garbage collection)."""
        return {r[0] for r in self._db.execute("SELECT id FROM sandboxes_v2").fetchall()}

    def count(self, tenant: str | None = None) -> int:
        """How many named sandboxes one tenant holds (every tenant's when ``tenant`` is None)."""
        if tenant is None:
            return self._db.execute("SELECT COUNT(*) FROM sandboxes_v2").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM sandboxes_v2 WHERE tenant = ?", (tenant,)).fetchone()[0]

    def counts(self, tenant: str) -> tuple[int, int]:
        """(named sandboxes of ``tenant``, of every tenant) in one query (admission checks both)."""
        mine, total = self._db.execute("SELECT COALESCE(SUM(tenant = ?), 0), COUNT(*) FROM sandboxes_v2",
                                       (tenant,)).fetchone()
        return mine, total


def foreign_ids(path: str) -> set[str] | None:
    """Every sandbox id in another process's store, read without writing anything: no schema, no
    migration, and no ``-wal``/``-shm`` files left next to it (a plain read-only connection to a WAL
    database creates both). None when it cannot be read that way (missing table, unreadable, a WAL
    without its index): the caller then keeps that store's sandboxes.

    A store with a ``-wal`` file has a live (or crashed) writer whose rows may be only in the WAL, so it
    is read through the existing ``-wal``/``-shm``; without one every committed row is in the main file,
    which is then read as immutable (nothing else is opened)."""
    from urllib.parse import quote

    wal, shm = os.path.exists(path + "-wal"), os.path.exists(path + "-shm")
    if wal and not shm:
        return None
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro" + ("" if wal else "&immutable=1")
    try:
        db = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
        try:
            return {r[0] for r in db.execute("SELECT id FROM sandboxes_v2").fetchall()}
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _migrate(db: sqlite3.Connection) -> None:
    """Stores written before the column was named for what it holds called the tenant ``owner``."""
    cols = {r[1] for r in db.execute("PRAGMA table_info(sandboxes_v2)")}
    if "owner" in cols and "tenant" not in cols:
        db.execute("ALTER TABLE sandboxes_v2 RENAME COLUMN owner TO tenant")
