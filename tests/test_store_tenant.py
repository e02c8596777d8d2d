"""The store's tenant column (called ``owner`` before: an old store is migrated on open)."""

import sqlite3

from agentkernel.store import Store


def test_old_owner_column_is_migrated_to_tenant(tmp_path):
    path = str(tmp_path / "state.db")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE sandboxes_v2 (owner TEXT NOT NULL DEFAULT 'local', name TEXT NOT NULL, "
                "id TEXT NOT NULL UNIQUE, backend TEXT NOT NULL, spec TEXT NOT NULL, handle TEXT NOT NULL "
                "DEFAULT '{}', state TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, "
                "PRIMARY KEY (owner, name))")
    con.execute("INSERT INTO sandboxes_v2 VALUES ('api:ci', 'box', 'box-1', 'podman', '{}', '{}', 'created', 1, 1)")
    con.commit()
    con.close()
    store = Store(path)
    rec = store.get("box", "api:ci")
    assert rec.tenant == "api:ci"
    assert store.find("box") is None  # another tenant (local) does not see it
    assert store.count("api:ci") == 1 and store.count() == 1
    store.reserve("box", "box-2", "podman", {}, tenant="local")
    assert store.count("local") == 1
    store.close()
