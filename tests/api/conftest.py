"""Fixtures for the API tests (helpers: api_helpers.py)."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import TOKENS, auth, containers, start_server, unique, wait_pool_ready


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The session's `agentkernel serve` (tokens for alice, bob, fuzz and the admin ops; a warm pool of 1)."""
    srv = start_server(str(tmp_path_factory.mktemp("serve")), tokens=TOKENS, pool_min=1, pool_max=4)
    try:
        wait_pool_ready(srv.url, TOKENS["ops"])
        yield srv
    finally:
        # remove whatever sandboxes the tests left, then stop: pool members go with the server
        for tok in TOKENS.values():
            try:
                h = {"Authorization": f"Bearer {tok}"}
                for sb in httpx.get(srv.url + "/sandboxes", headers=h, timeout=30).json()["data"]:
                    httpx.delete(f"{srv.url}/sandboxes/{sb['name']}", headers=h, timeout=60)
            except Exception:
                pass
        rc = srv.stop()
        assert rc == 0, f"server exit status {rc}:\n{srv.log()}"
        assert "Traceback" not in srv.log(), srv.log()
        leaked = containers()
        assert not leaked, f"leaked containers after the server stopped: {leaked}"


@pytest.fixture
def alice(server):
    with httpx.Client(base_url=server.url, headers=auth("alice"), timeout=120) as c:
        yield c


@pytest.fixture
def bob(server):
    with httpx.Client(base_url=server.url, headers=auth("bob"), timeout=120) as c:
        yield c


@pytest.fixture
def sandbox(alice):
    """A running named sandbox owned by alice (removed afterwards)."""
    name = unique("sb")
    r = alice.post("/sandboxes", json={"name": name})
    assert r.status_code == 201, r.text
    yield name
    alice.delete(f"/sandboxes/{name}")
