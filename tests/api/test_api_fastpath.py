"""The fast path (api/fastpath.py) answers exactly as the FastAPI routes do: the same valid and invalid
requests to ``POST /run`` and ``POST /sandboxes/{name}/exec`` on a server with it and on one without it
(``AGENTKERNEL_API_FASTPATH=0``) get the same status, the same headers that matter and the same body
(timings aside)."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from api_helpers import TOKENS, auth, start_server, unique, wait_pool_ready

# fuzz holds one named sandbox (its limit: every /run of it is a 429) and may run one command at a time
CONFIG = '[api]\n[[api.tenant]]\nname = "fuzz"\nmax_sandboxes = 1\nmax_runs = 1\n'
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    servers = []
    try:
        for fast in ("1", "0"):
            d = tmp_path_factory.mktemp(f"fastpath{fast}")
            (d / "agentkernel.toml").write_text(CONFIG)
            servers.append(start_server(str(d), tokens=TOKENS, pool_min=1, pool_max=3,
                                        extra_env={"AGENTKERNEL_API_FASTPATH": fast}))
        for s in servers:
            wait_pool_ready(s.url, TOKENS["ops"])
        yield servers
    finally:
        for s in servers:
            assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def sandboxes(pair):
    """One named sandbox of alice and one of fuzz, in the store both servers share."""
    names = {"alice": unique("fpa"), "fuzz": unique("fpf")}
    for tenant, name in names.items():
        r = httpx.post(pair[0].url + "/sandboxes", json={"name": name}, headers=auth(tenant), timeout=120)
        assert r.status_code == 201, r.text
    yield names
    for tenant, name in names.items():
        httpx.delete(f"{pair[0].url}/sandboxes/{name}", headers=auth(tenant), timeout=60)


def _normal(r: httpx.Response):
    """What must be identical: status, the headers that matter, the body (without the timings, which
    are measurements; the content length follows them)."""
    headers = {k: r.headers.get(k) for k in ("content-type", "www-authenticate", "retry-after")}
    try:
        body = json.loads(r.content)
    except ValueError:
        return r.status_code, headers, r.content
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, dict) and "timings" in data:
        assert set(data.pop("timings")) >= {"server_ms"}
    else:
        headers["content-length"] = r.headers.get("content-length")
    return r.status_code, headers, body


def _chunks(data: bytes):
    for i in range(0, len(data), 1 << 16):
        yield data[i:i + (1 << 16)]


def _cases(names: dict[str, str]) -> list[tuple[str, str, dict[str, str], bytes | None, int]]:
    """(label, path, headers, body, expected status)."""
    a = names["alice"]
    ok = json.dumps({"command": ["echo", "hello"]}).encode()
    big = b'{"command": ["true"], "stdin": "' + b"x" * (1 << 20) + b'"}'
    cases = []
    for path, mine in (("/run", "/run"), ("exec", f"/sandboxes/{a}/exec")):
        cases += [
            (f"{path} ok", mine, auth() | JSON, ok, 200),
            (f"{path} nonzero exit", mine, auth() | JSON, b'{"command": ["sh", "-c", "echo e >&2; exit 3"]}', 200),
            (f"{path} env list", mine, auth() | JSON,
             b'{"command": ["sh", "-c", "echo $A"], "env": ["A=1"], "timeout": 30}', 200),
            (f"{path} bad json", mine, auth() | JSON, b'{"command": [', 400),
            (f"{path} empty body", mine, auth() | JSON, b"", 400),
            (f"{path} not an object", mine, auth() | JSON, b'["echo"]', 400),
            (f"{path} unknown field", mine, auth() | JSON, b'{"command": ["true"], "bogus": 1}', 400),
            (f"{path} wrong type", mine, auth() | JSON, b'{"command": "echo hello"}', 400),
            (f"{path} empty command", mine, auth() | JSON, b'{"command": []}', 400),
            (f"{path} bad timeout", mine, auth() | JSON, b'{"command": ["true"], "timeout": -1}', 400),
            (f"{path} string timeout", mine, auth() | JSON, b'{"command": ["true"], "timeout": "2"}', 200),
            (f"{path} bad env", mine, auth() | JSON, b'{"command": ["true"], "env": ["NOEQUALS"]}', 400),
            (f"{path} NUL in argv", mine, auth() | JSON, b'{"command": ["echo", "a\\u0000b"]}', 400),
            (f"{path} bad cwd", mine, auth() | JSON, b'{"command": ["true"], "cwd": "relative"}', 400),
            (f"{path} text/plain", mine, auth() | {"Content-Type": "text/plain"}, ok, 400),
            (f"{path} no content type", mine, auth(), ok, 400),
            (f"{path} missing token", mine, JSON, ok, 401),
            (f"{path} wrong token", mine, {"Authorization": "Bearer not-a-token-0123456789"} | JSON, ok, 401),
            (f"{path} basic auth", mine, {"Authorization": "Basic YTpi"} | JSON, ok, 401),
            (f"{path} foreign origin", mine, auth() | JSON | {"Origin": "http://evil.example"}, ok, 403),
            (f"{path} oversize", mine, auth() | JSON, big, 413),
        ]
    cases += [
        ("/run 429", "/run", auth("fuzz") | JSON, ok, 429),
        ("/run forbidden profile", "/run", auth() | JSON, b'{"command": ["true"], "profile": "permissive"}', 403),
        ("/run unknown backend", "/run", auth() | JSON, b'{"command": ["true"], "backend": "nope"}', None),
        ("exec no such sandbox", "/sandboxes/nosuch-sb/exec", auth() | JSON, ok, 404),
        ("exec bad name", "/sandboxes/Bad_Name!/exec", auth() | JSON, ok, 400),
        ("exec another tenant's", f"/sandboxes/{a}/exec", auth("bob") | JSON, ok, 404),
        ("exec sudo", f"/sandboxes/{a}/exec", auth() | JSON, b'{"command": ["true"], "sudo": true}', 422),
        ("exec trailing slash", f"/sandboxes/{a}/exec/", auth() | JSON, ok, None),
    ]
    return cases


def test_fast_path_answers_as_the_routes_do(pair, sandboxes):
    fast, plain = pair
    for label, path, headers, body, want in _cases(sandboxes):
        got = []
        for srv in (fast, plain):
            r = httpx.post(srv.url + path, content=body, headers=headers, timeout=120)
            got.append(_normal(r))
        assert got[0] == got[1], f"{label}: fast path {got[0]} != routes {got[1]}"
        if want is not None:
            assert got[0][0] == want, f"{label}: {got[0]}"


def test_fast_path_streamed_oversize_body_and_metrics(pair, sandboxes):
    """A body without Content-Length is counted as it streams (413 beyond the limit) on both; the
    requests the fast path served are counted under the route's path, as the routes' are."""
    big = b'{"command": ["true"], "stdin": "' + b"x" * (1 << 20) + b'"}'
    got = []
    for srv in pair:
        r = httpx.post(srv.url + "/run", content=_chunks(big), headers=auth() | JSON, timeout=120)
        got.append((r.status_code, r.json()))
    assert got[0] == got[1] and got[0][0] == 413, got
    lines = []
    for srv in pair:
        text = httpx.get(srv.url + "/metrics", headers=auth("ops"), timeout=30).text
        lines.append(sorted(ln.rsplit(" ", 1)[0] for ln in text.splitlines()
                            if ln.startswith("agentkernel_http_requests_total{") and 'method="POST"' in ln
                            and ('"/run"' in ln or "/exec" in ln)))
    assert lines[0] and lines[0] == lines[1], lines


def test_fast_path_exec_429(pair, sandboxes):
    """An exec beyond the caller's concurrent runs: the same 429 (and Retry-After) on both."""
    path = f"/sandboxes/{sandboxes['fuzz']}/exec"
    got = []
    for srv in pair:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            busy = ex.submit(httpx.post, srv.url + path, json={"command": ["sleep", "3"]}, headers=auth("fuzz"),
                             timeout=60)
            time.sleep(1.0)
            r = httpx.post(srv.url + path, json={"command": ["true"]}, headers=auth("fuzz"), timeout=60)
            got.append(_normal(r))
            assert busy.result().status_code == 200
    assert got[0] == got[1] and got[0][0] == 429 and got[0][1]["retry-after"], got


def test_fast_path_takes_both_routes(monkeypatch):
    """``serve`` runs the fast path, and it recognises both routes (a route whose signature changes is
    left to FastAPI, which this would reveal)."""
    from agentkernel.api.app import Settings, serve_app
    from agentkernel.api.fastpath import FastPath

    monkeypatch.delenv("AGENTKERNEL_API_FASTPATH", raising=False)
    app = serve_app(Settings(mcp=False, with_daemon=False))
    assert isinstance(app, FastPath) and app.run is not None and app.exec is not None
    assert app.run.path == "/run" and app.exec.path == "/sandboxes/{name}/exec"
    monkeypatch.setenv("AGENTKERNEL_API_FASTPATH", "0")
    assert not isinstance(serve_app(Settings(mcp=False, with_daemon=False)), FastPath)


def test_bench_keepalive_client(server, sandbox):
    """The bench's raw HTTP/1.1 client (api_bench.KeepAlive): one connection for several requests, bodies
    read by Content-Length or chunked, errors returned as they come."""
    import asyncio

    from agentkernel.bench.api_bench import KeepAlive

    async def go():
        c = KeepAlive(server.url, auth())
        try:
            got = [await c.post("/run", b'{"command": ["echo", "hello"]}')]
            writer = c.writer
            got.append(await c.post(f"/sandboxes/{sandbox}/exec", b'{"command": ["echo", "hi"]}'))
            got.append(await c.post("/run", b'{"command": ['))
            got.append(await c.post(f"/sandboxes/{sandbox}/exec/stream", b'{"command": ["echo", "streamed"]}'))
            assert c.writer is writer  # the same connection throughout
            return got
        finally:
            await c.close()

    (s1, b1), (s2, b2), (s3, b3), (s4, b4) = asyncio.run(go())
    assert s1 == 200 and json.loads(b1)["data"]["stdout"] == "hello\n"
    assert s2 == 200 and json.loads(b2)["data"]["stdout"] == "hi\n"
    assert s3 == 400 and json.loads(b3)["success"] is False
    assert s4 == 200 and b"streamed" in b4 and b"event: done" in b4


@pytest.mark.parametrize("route", ["run", "exec"])
@pytest.mark.parametrize("which", [0, 1], ids=["fast", "routes"])
def test_client_disconnect_kills_the_command(pair, sandboxes, route, which):
    """A client that goes away while its /run or exec runs, on the fast path and on the routes: the
    command is killed (deps.unless_disconnected) and the disconnect counted."""
    import socket

    from api_helpers import host_processes, wait_until

    server = pair[which]
    marker = str(3031 + 2 * which + (4 if route == "exec" else 0))
    path = "/run" if route == "run" else f"/sandboxes/{sandboxes['alice']}/exec"
    body = json.dumps({"command": ["sh", "-c", f"exec sleep {marker}"]}).encode()
    host, port = server.url.split("://")[1].split(":")
    before = httpx.get(server.url + "/metrics", headers=auth("ops")).text
    s = socket.create_connection((host, int(port)))
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {auth()['Authorization']}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_until(lambda: host_processes(f"sleep {marker}"), 20), "the command is not running"
    finally:
        s.close()
    assert wait_until(lambda: not host_processes(f"sleep {marker}"), 20), host_processes(f"sleep {marker}")
    after = httpx.get(server.url + "/metrics", headers=auth("ops")).text

    def disconnects(text: str) -> int:
        return int(next(ln for ln in text.splitlines()
                        if ln.startswith("agentkernel_stream_disconnects_total")).rsplit(" ", 1)[1])

    assert disconnects(after) == disconnects(before) + 1
