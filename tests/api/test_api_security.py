"""Attacks on `agentkernel serve` by a hostile tenant or a hostile web page (issue 11 items 1, 4, 7, 15).
Each test performs the attack against a real server and passes only when it is refused or contained.
The rows of docs/security.md "HTTP API and MCP" name these tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import pytest
from api_helpers import TOKENS, auth, start_server, unique

pytestmark = pytest.mark.engine("podman")

SECRET = "top-secret-4711"


def _cwd_with_secret(tmp_path, config: str = "") -> str:
    d = tmp_path / "srv"
    d.mkdir()
    secret = d / "secret.txt"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    if config:
        (d / "agentkernel.toml").write_text(config)
    return str(d)


STEAL = ["sh", "-c", "cat /workspace/secret.txt /workspace/agentkernel.toml; echo X > /workspace/planted.txt"]


# ---- item 1: the server's working directory, permissive, tokens ------------------------------------------------


@pytest.mark.parametrize("backend", ["wasm", "podman"])
def test_remote_caller_cannot_read_or_write_server_cwd(tmp_path, backend):
    """The audit's attack: permissive (mount_cwd) asked for by a token. Refused by the default policy; where a
    tenant may use permissive, /workspace is still never the server's directory."""
    cwd = _cwd_with_secret(tmp_path, '[[api.tenant]]\nname = "bob"\nprofiles = ["moderate", "permissive"]\n')
    srv = start_server(cwd, tokens=TOKENS, pool_min=0)
    try:
        body = {"command": STEAL, "backend": backend, "profile": "permissive", "fast": False}
        r = httpx.post(srv.url + "/run", json=body, headers=auth("alice"), timeout=120)
        assert r.status_code == 403 and "profile 'permissive' is not allowed" in r.json()["error"], r.text
        r = httpx.post(srv.url + "/run", json=body, headers=auth("bob"), timeout=120)
        assert r.status_code == 200, r.text
        d = r.json()["data"]
        assert SECRET not in d["stdout"] + d["stderr"] and "api.tenant" not in d["stdout"]
        assert not os.path.exists(os.path.join(cwd, "planted.txt"))
    finally:
        assert srv.stop() == 0


def test_policy_refuses_backend_network_and_resources(server, alice):
    for body, why in (({"command": ["true"], "network": True}, "network access is not allowed"),
                      ({"command": ["true"], "profile": "permissive"}, "profile 'permissive'"),):
        r = alice.post("/run", json=body)
        assert r.status_code == 403 and why in r.json()["error"], r.text
    r = alice.post("/sandboxes", json={"name": unique("big"), "memory_mb": 1 << 20})
    assert r.status_code == 403 and "memory_mb" in r.json()["error"], r.text
    r = alice.post("/sandboxes", json={"name": unique("net"), "network": True})
    assert r.status_code == 403, r.text


def test_policy_allowed_backends(tmp_path):
    cwd = _cwd_with_secret(tmp_path, '[api]\nbackends = ["podman"]\n')
    srv = start_server(cwd, tokens=TOKENS, pool_min=0)
    try:
        r = httpx.post(srv.url + "/run", json={"command": ["true"], "backend": "wasm"}, headers=auth(), timeout=60)
        assert r.status_code == 403 and "backend 'wasm' is not allowed" in r.json()["error"], r.text
    finally:
        assert srv.stop() == 0


def test_mcp_tool_gets_the_same_policy(server):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def go():
        async with (httpx.AsyncClient(headers=auth(), timeout=60) as http,
                    streamable_http_client(server.url + "/mcp/", http_client=http) as streams,
                    ClientSession(streams[0], streams[1]) as session):
            await session.initialize()
            r = await session.call_tool("sandbox_run", {"command": STEAL, "profile": "permissive"})
            assert r.is_error and "permissive" in r.content[0].text

    asyncio.run(asyncio.wait_for(go(), 60))


def _serve_fails(cwd: str, env: dict[str, str], *args: str) -> str:
    full = dict(os.environ, AGENTKERNEL_API_TOKENS="", **env)
    full.pop("AGENTKERNEL_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "agentkernel", "serve", "--port", "1", *args], cwd=cwd, env=full,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    return r.stderr


def test_tokens_never_kept_where_a_sandbox_can_be_pointed(tmp_path):
    cwd = _cwd_with_secret(tmp_path, '[api]\ntokens = ["alice=alice-token-0123456789abcdef"]\n')
    err = _serve_fails(cwd, {})
    assert "inside the server's working directory" in err and "Traceback" not in err
    inside = os.path.join(cwd, "tokens")
    with open(inside, "w") as f:
        f.write("alice=alice-token-0123456789abcdef\n")
    os.chmod(inside, 0o600)
    os.remove(os.path.join(cwd, "agentkernel.toml"))
    assert "inside the server's working directory" in _serve_fails(cwd, {"AGENTKERNEL_API_TOKEN_FILE": inside})
    outside = str(tmp_path / "tokens")
    with open(outside, "w") as f:
        f.write("# tenants\nalice=alice-token-0123456789abcdef\n")
    os.chmod(outside, 0o644)
    assert "accessible to other users" in _serve_fails(cwd, {"AGENTKERNEL_API_TOKEN_FILE": outside})
    os.chmod(outside, 0o600)
    srv = start_server(cwd, tokens=None, pool_min=0, extra_env={"AGENTKERNEL_API_TOKEN_FILE": outside})
    try:
        assert httpx.get(srv.url + "/sandboxes", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/sandboxes", headers=auth("alice"), timeout=10).status_code == 200
    finally:
        assert srv.stop() == 0


# ---- item 4: cross-site requests and websocket hijack ----------------------------------------------------------


def test_origin_null_and_foreign_origins_refused(tmp_path):
    srv = start_server(str(tmp_path / "nt"), tokens=None, pool_min=0)
    try:
        for origin in ("null", "http://evil.example", "http://localhost:8000"):
            r = httpx.post(srv.url + "/run", json={"command": ["true"]}, headers={"Origin": origin}, timeout=30)
            assert r.status_code == 403, (origin, r.text)
            r = httpx.post(srv.url + "/sandboxes", json={"name": "x"}, headers={"Origin": origin}, timeout=30)
            assert r.status_code == 403, (origin, r.text)
            r = httpx.post(srv.url + "/mcp/", json={}, headers={"Origin": origin}, timeout=30)
            assert r.status_code == 403, (origin, r.text)
        assert httpx.get(srv.url + "/health", headers={"Origin": "null"}, timeout=5).status_code == 403
        _ws_refused(srv.url, "null")
        _ws_refused(srv.url, "http://evil.example")
    finally:
        assert srv.stop() == 0


def test_standalone_mcp_http_has_the_same_guard(tmp_path):
    from api_helpers import free_port

    port = free_port()
    env = dict(os.environ, AGENTKERNEL_API_TOKENS=",".join(f"{k}={v}" for k, v in TOKENS.items()))
    env.pop("AGENTKERNEL_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "mcp", "--transport", "http", "--port", str(port),
                             "--pool-min", "0"], cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(url, json={}, timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
        assert r.status_code == 401, r.text
        r = httpx.post(url, json={}, headers={"Origin": "null", **auth()}, timeout=5)
        assert r.status_code == 403 and "Origin: null" in r.json()["error"], r.text
    finally:
        proc.terminate()
        proc.wait(30)


def _ws_refused(url: str, origin: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    ws_url = url.replace("http", "ws") + "/sandboxes/anything/attach?cmd=id"

    async def go():
        with pytest.raises(InvalidStatus):
            async with connect(ws_url, origin=origin):
                pass

    asyncio.run(asyncio.wait_for(go(), 30))


def test_allowed_origin_passes_token_still_required(tmp_path):
    cwd = _cwd_with_secret(tmp_path, '[api]\nallowed_origins = ["https://app.example"]\n')
    srv = start_server(cwd, tokens=TOKENS, pool_min=0)
    try:
        r = httpx.post(srv.url + "/sandboxes", json={"name": "bad name"}, timeout=30,
                       headers={"Origin": "https://app.example", **auth()})
        assert r.status_code == 400, r.text  # past the guard: the name is what is wrong
        r = httpx.post(srv.url + "/sandboxes", json={"name": "x"}, headers={"Origin": "https://evil.example", **auth()},
                       timeout=30)
        assert r.status_code == 403, r.text
        r = httpx.post(srv.url + "/sandboxes", json={"name": "x"}, headers={"Origin": "null", **auth()}, timeout=30)
        assert r.status_code == 403, r.text
    finally:
        assert srv.stop() == 0


# ---- item 7: limits per token and per server ------------------------------------------------------------------


LIMITS = "[api]\nmax_runs = 2\nmax_sandboxes = 2\nmax_batch = 3\nserver_max_runs = 3\n"


def test_limits_answer_429_with_retry_after(tmp_path):
    cwd = _cwd_with_secret(tmp_path, LIMITS)
    srv = start_server(cwd, tokens=TOKENS, pool_min=0, pool_max=2)
    try:
        def run(tenant: str) -> httpx.Response:
            return httpx.post(srv.url + "/run", json={"command": ["sleep", "3"], "fast": False}, headers=auth(tenant),
                              timeout=120)

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(run, ["alice"] * 6))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) <= 2 and codes.count(429) >= 4, codes
        limited = next(r for r in rs if r.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1 and "concurrent runs" in limited.json()["error"]
        # the server-wide limit (3) across tenants
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(run, ["alice", "alice", "bob", "bob", "fuzz", "fuzz"]))
        assert sum(r.status_code == 200 for r in rs) <= 3, [r.status_code for r in rs]
        # a stream is admitted before it starts: the 429 is a plain HTTP answer, not an SSE error event
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(run, "alice") for _ in range(2)]
            time.sleep(1.0)
            r = httpx.post(srv.url + "/run/stream", json={"command": ["true"]}, headers=auth(), timeout=30)
            assert r.status_code == 429 and "Retry-After" in r.headers, r.text
            assert [f.result().status_code for f in futs] == [200, 200]
        r = httpx.post(srv.url + "/batch/run", json={"commands": [{"command": ["true"]}] * 4}, headers=auth(),
                       timeout=60)
        assert r.status_code == 429 and "batch of 4" in r.json()["error"] and "Retry-After" in r.headers, r.text
        names = [unique("lim") for _ in range(3)]
        for n in names[:2]:
            r = httpx.post(srv.url + "/sandboxes", json={"name": n, "start": False}, headers=auth(), timeout=120)
            assert r.status_code == 201, r.text
        r = httpx.post(srv.url + "/sandboxes", json={"name": names[2], "start": False}, headers=auth(), timeout=120)
        assert r.status_code == 429 and "live sandboxes" in r.json()["error"], r.text
        r = httpx.post(srv.url + "/sandboxes", json={"name": names[2], "start": False}, headers=auth("bob"),
                       timeout=120)
        assert r.status_code == 201, r.text  # another tenant has its own allowance
        for n, t in ((names[0], "alice"), (names[1], "alice"), (names[2], "bob")):
            httpx.delete(f"{srv.url}/sandboxes/{n}", headers=auth(t), timeout=60)
    finally:
        assert srv.stop() == 0


# ---- item 15: docs, metrics, failed creates --------------------------------------------------------------------


def test_docs_and_openapi_need_the_token(server):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401, path
        assert httpx.get(server.url + path, headers=auth(), timeout=10).status_code == 200, path


def test_metrics_show_only_the_callers_tenant(server, alice, bob):
    name = unique("secretname")
    assert bob.post("/sandboxes", json={"name": name, "start": False}).status_code == 201
    try:
        mine = alice.get("/metrics").text
        assert "agentkernel_pool_ready{" not in mine and "agentkernel_http_requests_total{" not in mine
        assert 'agentkernel_sandboxes{backend="podman",state="created"}' not in mine
        theirs = bob.get("/metrics").text
        assert 'agentkernel_sandboxes{backend="podman",state="created"}' in theirs
        whole = httpx.get(server.url + "/metrics", headers=auth("ops"), timeout=10).text
        assert "agentkernel_http_requests_total{" in whole
    finally:
        bob.delete(f"/sandboxes/{name}")


def test_create_whose_start_fails_leaves_no_record(tmp_path, monkeypatch):
    """The engine really creates the container; its start is made to fail (nothing here can make a real start
    fail after a successful create on demand). The record and the container must both be gone."""
    from agentkernel.api.service import Service
    from agentkernel.backends.podman import PodmanBackend
    from agentkernel.errors import SandboxError
    from agentkernel.store import Store

    async def failing_start(self, ref):
        raise SandboxError("start failed (test)")

    monkeypatch.setattr(PodmanBackend, "start", failing_start)
    monkeypatch.setenv("AGENTKERNEL_BACKEND", "podman")  # backend auto may pick oci
    store = Store(str(tmp_path / "state.db"))
    svc = Service(store=store, with_daemon=False)
    name = unique("failstart")

    async def go():
        spec = svc.sandbox_spec("api:alice", name)
        with pytest.raises(SandboxError):
            await svc.create("api:alice", spec, start=True)
        assert store.find(name, "api:alice") is None
        await svc.close()

    asyncio.run(go())
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert name not in out


def test_cold_starts_share_the_start_limiter(tmp_path):
    """A pool miss and a cold (``fast: false``) run wait for the start slot that refills use: while every slot
    is held, neither starts a sandbox."""
    from agentkernel import owner
    from agentkernel.backends import get_backend
    from agentkernel.backends.base import ExecRequest
    from agentkernel.config import resolve_spec
    from agentkernel.manager import SandboxManager
    from agentkernel.pool import PoolConfig, WarmPool
    from agentkernel.store import Store

    async def go():
        sem = asyncio.Semaphore(1)
        spec = resolve_spec({"backend": "podman"})
        pool = WarmPool(spec, get_backend("podman"), PoolConfig(min_size=0, max_size=2, wait_s=0.1), sem,
                        owner.current_owner())
        await sem.acquire()  # a refill holds the only start slot
        task = asyncio.create_task(pool.acquire())
        await asyncio.sleep(1.5)
        assert not task.done(), "a pool miss started a sandbox past the start limiter"
        sem.release()
        member, hit = await asyncio.wait_for(task, 60)
        assert not hit
        pool.release(member)
        await pool.close()

        mgr = SandboxManager(Store(str(tmp_path / "state.db")))
        await sem.acquire()
        run = asyncio.create_task(mgr.run(spec, ExecRequest(["true"], timeout=30), start_gate=sem))
        await asyncio.sleep(1.5)
        assert not run.done(), "a cold run started a sandbox past the start limiter"
        sem.release()
        result = await asyncio.wait_for(run, 60)
        assert result.exit_code == 0 and result.timings["start_wait_ms"] >= 1000
        await mgr.aclose()

    asyncio.run(go())
