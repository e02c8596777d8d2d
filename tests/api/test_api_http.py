"""The HTTP API through real HTTP against `agentkernel serve` on loopback, podman underneath: every route,
SSE order and real streaming, the auth matrix, per-token ownership, traversal attempts, bad input,
client disconnects (the command is killed, the sandbox destroyed), metrics, restart."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time

import httpx
import pytest
from api_helpers import TOKENS, auth, containers, host_processes, start_server, unique, wait_until

pytestmark = pytest.mark.engine("podman")


def sse_events(resp: httpx.Response):
    """(event, data, arrival time) for each SSE event of a streaming response."""
    event, data = "message", []
    for line in resp.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data)), time.monotonic()
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


# ---- basics ----------------------------------------------------------------------------------------------


def test_health_needs_no_token(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    assert r.json()["success"] is True and r.json()["data"] == "ok"


def test_run_exact_result(alice):
    r = alice.post("/run", json={"command": ["sh", "-c", "echo out; echo err >&2; exit 42"],
                                 "image": None, "profile": None, "fast": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    d = body["data"]
    assert d["exit_code"] == 42
    assert d["stdout"] == "out\n" and d["stderr"] == "err\n"
    assert d["output"] == "out\nerr\n"  # the reference's field, kept
    assert d["timings"]["pooled"] == 1.0 and d["timings"]["server_ms"] > 0
    assert d["truncated"] is False and d["timed_out"] is False


def test_run_env_cwd_stdin_timeout_signal(alice):
    d = alice.post("/run", json={"command": ["sh", "-c", "echo $A $B; pwd; cat"], "env": {"A": "1"},
                                 "cwd": "/tmp", "stdin": "piped"}).json()["data"]
    assert d["stdout"] == "1\n/tmp\npiped"
    d = alice.post("/run", json={"command": ["sh", "-c", "echo $A"], "env": ["A=x=y"]}).json()["data"]
    assert d["stdout"] == "x=y\n"
    t = time.monotonic()
    d = alice.post("/run", json={"command": ["sleep", "30"], "timeout": 1}).json()["data"]
    assert d["exit_code"] == 124 and d["timed_out"] is True
    assert time.monotonic() - t < 15
    d = alice.post("/run", json={"command": ["sh", "-c", "kill -9 $$"]}).json()["data"]
    assert d["exit_code"] == 137 and d["signal"] == 9


def test_run_cold_and_binary_output(alice):
    d = alice.post("/run", json={"command": ["sh", "-c", "printf 'a\\377b'"], "fast": False}).json()["data"]
    assert d["exit_code"] == 0
    import base64

    assert base64.b64decode(d["stdout_base64"]) == b"a\xffb"
    assert "pooled" not in d["timings"] and "create_ms" in d["timings"]


def test_run_output_limit_truncates(alice):
    d = alice.post("/run", json={"command": ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"],
                                 "output_limit": 1000}).json()["data"]
    assert d["truncated"] is True and len(d["stdout"]) == 1000


def test_batch_run(alice):
    r = alice.post("/batch/run", json={"commands": [{"command": ["echo", "a"]}, {"command": ["sh", "-c", "exit 3"]},
                                                    {"command": ["echo", "c"]}]})
    assert r.status_code == 200, r.text
    res = r.json()["data"]["results"]
    assert [x["output"] for x in res] == ["a\n", "", "c\n"]
    assert [x["exit_code"] for x in res] == [0, 3, 0]
    assert all(x["error"] is None for x in res)


# ---- SSE -------------------------------------------------------------------------------------------------


def test_run_stream_order_and_real_streaming(alice):
    body = {"command": ["sh", "-c", "echo one; sleep 1; echo two >&2; exit 5"]}
    with alice.stream("POST", "/run/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    names = [e for e, _, _ in events]
    assert names[0] == "started"
    assert names[-2:] == ["exit", "done"]
    native = [e for e in names if e in ("stdout", "stderr")]
    assert native == ["stdout", "stderr"]
    assert names.count("output") == 2  # reference-compatible duplicates
    by = {e: (d, t) for e, d, t in events}
    assert by["stdout"][0] == {"data": "one\n", "stream": "stdout"}
    assert by["stderr"][0] == {"data": "two\n", "stream": "stderr"}
    assert by["exit"][0]["exit_code"] == 5
    assert by["done"][0]["success"] is False and by["done"][0]["exit_code"] == 5
    # really streamed: "one" arrived about a second before the exit
    assert by["exit"][1] - by["stdout"][1] > 0.7


def test_run_stream_native_only_and_base64(alice):
    with alice.stream("POST", "/run/stream", params={"compat": "false", "encoding": "base64"},
                      json={"command": ["sh", "-c", "printf '\\377'"]}) as r:
        events = list(sse_events(r))
    names = [e for e, _, _ in events]
    assert "output" not in names and "done" in names
    out = [d for e, d, _ in events if e == "stdout"]
    assert out == [{"data": "/w==", "stream": "stdout", "encoding": "base64"}]


def test_run_stream_errors_before_streaming_are_http_errors(alice):
    r = alice.post("/run/stream", json={"command": []})
    assert r.status_code == 400
    r = alice.post("/run/stream", json={"command": ["echo"], "image": "no-such-image-here"})
    assert r.status_code == 404 and r.json()["success"] is False


def _container_running(marker: str) -> str | None:
    for name in containers():
        r = subprocess.run(["podman", "top", name, "args"], capture_output=True, text=True)
        if marker in r.stdout:
            return name
    return None


def test_run_stream_disconnect_kills_command_and_destroys_sandbox(server, alice):
    marker = "3017"
    body = {"command": ["sh", "-c", f"echo started; exec sleep {marker}"]}
    with alice.stream("POST", "/run/stream", json=body) as r:
        events = sse_events(r)  # keep a reference: a closed iterator would close the connection
        while next(events)[0] != "stdout":
            pass
        assert wait_until(lambda: host_processes(f"sleep {marker}"), 10), "the command is not running"
        cname = _container_running(marker)
        assert cname, "no container runs the command"
    # the response is closed: the client went away mid-stream
    assert wait_until(lambda: not host_processes(f"sleep {marker}"), 20), host_processes(f"sleep {marker}")
    assert wait_until(lambda: cname not in containers(), 30), f"{cname} was not destroyed"
    m = httpx.get(server.url + "/metrics", headers=auth("ops")).text
    assert "agentkernel_stream_disconnects_total 0" not in m


def test_exec_stream_and_disconnect(alice, sandbox):
    with alice.stream("POST", f"/sandboxes/{sandbox}/exec/stream",
                      json={"command": ["sh", "-c", "echo x; sleep 0.3; echo y"]}) as r:
        evs = [(e, d) for e, d, _ in sse_events(r)]
    assert [d["data"] for e, d in evs if e == "stdout"] == ["x\n", "y\n"]
    assert evs[-1][0] == "done"
    marker = "3023"
    with alice.stream("POST", f"/sandboxes/{sandbox}/exec/stream",
                      json={"command": ["sh", "-c", f"echo go; exec sleep {marker}"]}) as r:
        events = sse_events(r)
        while next(events)[0] != "stdout":
            pass
        assert wait_until(lambda: host_processes(f"sleep {marker}"), 10)
    assert wait_until(lambda: not host_processes(f"sleep {marker}"), 20)
    # the named sandbox itself lives on
    d = alice.post(f"/sandboxes/{sandbox}/exec", json={"command": ["echo", "alive"]}).json()["data"]
    assert d["stdout"] == "alive\n"


# ---- named sandboxes -------------------------------------------------------------------------------------


def test_sandbox_lifecycle(alice):
    name = unique("life")
    r = alice.post("/sandboxes", json={"name": name, "memory_mb": 256, "vcpus": 0.5, "env": ["K=v"]})
    assert r.status_code == 201, r.text
    info = r.json()["data"]
    assert info["name"] == name and info["status"] == "running" and info["state"] == "running"
    assert info["memory_mb"] == 256 and info["cpus"] == 0.5 and info["vcpus"] == 1 and info["backend"] == "podman"
    assert info["created_at"].endswith("Z")
    assert name in [s["name"] for s in alice.get("/sandboxes").json()["data"]]
    assert alice.get(f"/sandboxes/{name}").json()["data"]["uuid"] == info["uuid"]
    d = alice.post(f"/sandboxes/{name}/exec", json={"command": ["sh", "-c", "echo $K; pwd; exit 7"],
                                                    "env": ["X=1"], "workdir": "/tmp"}).json()["data"]
    assert (d["exit_code"], d["stdout"]) == (7, "v\n/tmp\n")
    assert alice.post(f"/sandboxes/{name}", json={}).status_code == 405
    r = alice.post("/sandboxes", json={"name": name})
    assert r.status_code == 409
    assert alice.post(f"/sandboxes/{name}/stop").json()["data"]["status"] == "stopped"
    r = alice.post(f"/sandboxes/{name}/exec", json={"command": ["true"]})
    assert r.status_code == 409, r.text
    assert alice.post(f"/sandboxes/{name}/start").json()["data"]["state"] == "running"
    assert alice.post(f"/sandboxes/{name}/exec", json={"command": ["true"]}).json()["data"]["exit_code"] == 0
    logs = alice.get(f"/sandboxes/{name}/logs").json()["data"]
    kinds = [e["event"] for e in logs]
    assert kinds[0] == "sandbox_created" and "command_executed" in kinds and "sandbox_stopped" in kinds
    assert len(alice.get(f"/sandboxes/{name}/logs", params={"last": 2}).json()["data"]) == 2
    assert alice.delete(f"/sandboxes/{name}").json()["success"] is True
    assert alice.get(f"/sandboxes/{name}").status_code == 404
    assert alice.delete(f"/sandboxes/{name}").status_code == 404


def test_exec_sudo_and_unsupported_fields_fail_closed(alice, sandbox):
    r = alice.post(f"/sandboxes/{sandbox}/exec", json={"command": ["id"], "sudo": True})
    assert r.status_code == 422 and "sudo" in r.json()["error"]
    r = alice.post(f"/sandboxes/{sandbox}/exec", json={"command": ["id", "-u"], "sudo": False})
    assert r.json()["data"]["stdout"] == "1000\n"
    r = alice.post("/sandboxes", json={"name": unique("v"), "volumes": ["x:/y"]})
    assert r.status_code == 404 and "no such volume: x" in r.json()["error"]
    r = alice.post("/sandboxes", json={"name": unique("v"), "secrets": ["K:host"]})
    assert r.status_code == 422 and "secrets" in r.json()["error"]


# ---- files -----------------------------------------------------------------------------------------------


def test_files_json_and_raw_streamed(alice, sandbox):
    base = f"/sandboxes/{sandbox}/files"
    assert alice.put(f"{base}/tmp/a.txt", json={"content": "héllo", "encoding": "utf8"}).json()["data"]["size"] == 6
    assert alice.get(f"{base}/tmp/a.txt").json()["data"] == {"content": "héllo", "encoding": "utf8", "size": 6}
    assert alice.get(f"{base}//tmp/a.txt").json()["data"]["content"] == "héllo"  # leading slash form
    import base64

    r = alice.put(f"{base}/tmp/b.bin", json={"content": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"})
    assert r.status_code == 200
    assert alice.get(f"{base}/tmp/b.bin").json()["data"] == {"content": "AP8=", "encoding": "base64", "size": 2}
    # 24 MiB streamed up and down as raw bytes
    blob = os.urandom(1 << 20) * 24

    def chunks():
        for i in range(0, len(blob), 1 << 18):
            yield blob[i:i + (1 << 18)]

    r = alice.put(f"{base}/tmp/big.bin", content=chunks(), headers={"Content-Type": "application/octet-stream"},
                  params={"mode": 0o600})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["size"] == len(blob)
    h = hashlib.sha256()
    n = 0
    with alice.stream("GET", f"{base}/tmp/big.bin", headers={"Accept": "application/octet-stream"}) as resp:
        assert resp.headers["content-type"] == "application/octet-stream"
        for c in resp.iter_bytes():
            h.update(c)
            n += len(c)
    assert n == len(blob) and h.hexdigest() == hashlib.sha256(blob).hexdigest()
    d = alice.post(f"/sandboxes/{sandbox}/exec", json={"command": ["stat", "-c", "%a", "/tmp/big.bin"]}).json()
    assert d["data"]["stdout"] == "600\n"
    r = alice.get(f"{base}/tmp/big.bin")  # too big for a JSON body
    assert r.status_code == 413 and "raw" in r.json()["error"]
    assert alice.delete(f"{base}/tmp/a.txt").json()["success"] is True
    assert alice.get(f"{base}/tmp/a.txt").status_code == 404
    assert alice.delete(f"{base}/tmp/a.txt").status_code == 404
    assert alice.get(f"{base}/nonexistent").status_code == 404


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_path_traversal_is_refused_or_stays_inside(server, alice, sandbox):
    tok = TOKENS["alice"].encode()
    for raw_path in (b"/../../etc/passwd", b"/tmp/../../etc/shadow", b"/%2e%2e/%2e%2e/etc/passwd",
                     b"/tmp/%2E%2E/etc/passwd", b"/a/..%2f..%2fetc/passwd", b"/tmp/x%00y"):
        req = (b"GET /sandboxes/" + sandbox.encode() + b"/files" + raw_path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer " + tok + b"\r\nConnection: close\r\n\r\n")
        resp = _raw_request(server.port, req)
        status = int(resp.split(b" ", 2)[1])
        assert status in (400, 404), (raw_path, resp[:300])
        assert b"root:x:0:0" not in resp
    for bad in ("../etc/passwd", "tmp/../../etc/passwd"):
        r = alice.put(f"/sandboxes/{sandbox}/files/{bad}", content=b"x",
                      headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (400, 404)
    # an absolute path is the sandbox's own /etc/passwd, never the host's
    with open("/etc/passwd") as f:
        host = f.read()
    inside = alice.get(f"/sandboxes/{sandbox}/files/etc/passwd").json()["data"]["content"]
    assert "sandbox:x:1000" in inside and inside != host
    # a symlink inside the sandbox is resolved inside the sandbox's own root
    d = alice.post(f"/sandboxes/{sandbox}/exec",
                   json={"command": ["ln", "-s", "/etc/passwd", "/tmp/link"]}).json()["data"]
    assert d["exit_code"] == 0, d
    via_link = alice.get(f"/sandboxes/{sandbox}/files/tmp/link").json()["data"]["content"]
    assert via_link == inside and via_link != host
    d = alice.post(f"/sandboxes/{sandbox}/exec",
                   json={"command": ["ln", "-s", "/proc/1/root/../../../etc", "/tmp/up"]}).json()["data"]
    got = alice.get(f"/sandboxes/{sandbox}/files/tmp/up/passwd")
    assert got.status_code != 200 or got.json()["data"]["content"] != host


# ---- auth and ownership ----------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/metrics", None), ("POST", "/run", {"command": ["true"]}), ("POST", "/run/stream", {"command": ["true"]}),
    ("POST", "/batch/run", {"commands": [{"command": ["true"]}]}), ("GET", "/sandboxes", None),
    ("POST", "/sandboxes", {"name": "authx"}), ("GET", "/sandboxes/x", None), ("DELETE", "/sandboxes/x", None),
    ("POST", "/sandboxes/x/start", None), ("POST", "/sandboxes/x/stop", None),
    ("POST", "/sandboxes/x/exec", {"command": ["true"]}), ("POST", "/sandboxes/x/exec/stream", {"command": ["true"]}),
    ("GET", "/sandboxes/x/files/tmp/f", None), ("PUT", "/sandboxes/x/files/tmp/f", {"content": "a"}),
    ("DELETE", "/sandboxes/x/files/tmp/f", None), ("GET", "/sandboxes/x/logs", None),
    ("POST", "/mcp/", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": "Basic " + TOKENS["alice"]},
                                     {"Authorization": "Bearer"}, {"Authorization": "Bearer " + TOKENS["alice"] + "x"}],
                         ids=["none", "wrong", "basic", "empty", "suffix"])
def test_auth_matrix_401_without_detail(server, headers):
    for method, path, body in ROUTES:
        r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json() == {"success": False, "error": "unauthorized"}, (method, path)


def test_ownership_isolation(alice, bob, sandbox):
    assert sandbox in [s["name"] for s in alice.get("/sandboxes").json()["data"]]
    assert sandbox not in [s["name"] for s in bob.get("/sandboxes").json()["data"]]
    for method, path, body in [("GET", f"/sandboxes/{sandbox}", None), ("DELETE", f"/sandboxes/{sandbox}", None),
                               ("POST", f"/sandboxes/{sandbox}/exec", {"command": ["true"]}),
                               ("POST", f"/sandboxes/{sandbox}/exec/stream", {"command": ["true"]}),
                               ("POST", f"/sandboxes/{sandbox}/stop", None),
                               ("POST", f"/sandboxes/{sandbox}/start", None),
                               ("GET", f"/sandboxes/{sandbox}/files/etc/hostname", None),
                               ("PUT", f"/sandboxes/{sandbox}/files/tmp/x", {"content": "pwned"}),
                               ("DELETE", f"/sandboxes/{sandbox}/files/etc/hostname", None),
                               ("GET", f"/sandboxes/{sandbox}/logs", None)]:
        r = bob.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert sandbox in r.json()["error"] and "alice" not in r.text
    r = bob.put(f"/sandboxes/{sandbox}/files/tmp/x", content=b"pwned",
                headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 404
    # alice's sandbox is untouched
    assert alice.get(f"/sandboxes/{sandbox}").json()["data"]["state"] == "running"
    assert alice.get(f"/sandboxes/{sandbox}/files/tmp/x").status_code == 404


# ---- bad input -------------------------------------------------------------------------------------------


def test_bad_input(server, alice):
    cases = [
        (b"{not json", "malformed JSON"),
        (b'{"command": ["echo"], "bogus": 1}', "unknown field 'bogus'"),
        (b'{"command": "echo hi"}', "command"),
        (b'{"command": []}', "command"),
        (b'{"command": ["echo"], "timeout": -1}', "timeout"),
        (b'{"command": ["echo"], "profile": "yolo"}', "profile"),
        (b'{"command": ["echo", "a\\u0000b"]}', None),
        (b'[]', None),
        (b'', None),
    ]
    for raw, expect in cases:
        r = alice.post("/run", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (raw, r.status_code, r.text)
        body = r.json()
        assert body["success"] is False and "Traceback" not in r.text
        if expect:
            assert expect in body["error"], (raw, body)
    r = alice.post("/run", json={"command": ["echo"], "env": {"BAD-NAME": "x"}})
    assert r.status_code == 400
    r = alice.post("/run", json={"command": ["echo"], "cwd": "../x"})
    assert r.status_code == 400
    for name in ("a;rm -rf /", "../x", "$(id)", "a b", "x" * 64, "-x", "a--b"):
        r = alice.post("/sandboxes", json={"name": name})
        assert r.status_code == 400, (name, r.text)
    for name in ("a;b", "$(id)", "a%20b"):
        assert alice.get(f"/sandboxes/{name}").status_code in (400, 404)
    # huge bodies: refused by Content-Length before reading, and while streaming a chunked body
    big = b'{"command": ["echo", "' + b"a" * (2 << 20) + b'"]}'
    r = alice.post("/run", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    def gen():
        for _ in range(40):
            yield b"a" * 65536

    r = alice.post("/run", content=gen(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert alice.get("/nope").status_code == 404 and alice.get("/nope").json()["success"] is False
    assert alice.put("/run", json={}).status_code == 405


def test_missing_image_and_backend(alice):
    r = alice.post("/run", json={"command": ["echo"], "image": "does-not-exist:1"})
    assert r.status_code == 404 and "does-not-exist" in r.json()["error"]
    r = alice.post("/run", json={"command": ["echo"], "backend": "nosuchbackend"})
    assert r.status_code in (400, 404)


# ---- metrics ---------------------------------------------------------------------------------------------


def test_metrics(server, alice, sandbox):
    alice.post("/run", json={"command": ["true"]})
    mine = alice.get("/metrics").text  # a tenant sees its own runs and sandboxes
    assert 'agentkernel_run_duration_seconds_bucket{backend="podman",kind="run",le="+Inf",pooled="true"}' in mine
    assert 'agentkernel_sandboxes{backend="podman",state="running"}' in mine
    r = httpx.get(server.url + "/metrics", headers=auth("ops"))  # an admin sees the whole server
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    t = r.text
    for needle in ("agentkernel_pool_ready{", "agentkernel_pool_hits_total{", "agentkernel_pool_misses_total{",
                   'agentkernel_run_duration_seconds_bucket{backend="podman",kind="run",le="+Inf",pooled="true"}',
                   "agentkernel_run_duration_seconds_count", 'agentkernel_sandboxes{backend="podman",state="running"}',
                   'agentkernel_http_requests_total{method="POST",route="/run",status="200"}',
                   "agentkernel_auth_failures_total"):
        assert needle in t, needle


# ---- server configurations -------------------------------------------------------------------------------


def test_no_token_loopback_only(tmp_path):
    srv = start_server(str(tmp_path), tokens=None, pool_min=0)
    try:
        r = httpx.get(srv.url + "/sandboxes")
        assert r.status_code == 200 and r.json()["success"] is True
        # DNS rebinding / cross-site requests are refused without a token
        r = httpx.get(srv.url + "/sandboxes", headers={"Host": "evil.example:80"})
        assert r.status_code == 403
        r = httpx.post(srv.url + "/run", json={"command": ["true"]}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert httpx.get(srv.url + "/health", headers={"Origin": "http://localhost:3000"}).status_code == 200
    finally:
        assert srv.stop() == 0
    # a non-loopback bind without a token is refused with a clear error
    env = dict(os.environ, AGENTKERNEL_API_TOKENS="")
    env.pop("AGENTKERNEL_API_KEY", None)
    p = subprocess.run([os.sys.executable, "-m", "agentkernel", "serve", "--host", "0.0.0.0", "--port", "1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 125
    assert "refusing to listen on 0.0.0.0" in p.stderr and "AGENTKERNEL_API_TOKENS" in p.stderr


def test_restart_keeps_named_sandboxes(tmp_path):
    tokens = {"alice": TOKENS["alice"]}
    srv = start_server(str(tmp_path), tokens=tokens, pool_min=0)
    name = unique("persist")
    h = auth("alice")
    try:
        assert httpx.post(srv.url + "/sandboxes", json={"name": name}, headers=h, timeout=60).status_code == 201
        r = httpx.put(f"{srv.url}/sandboxes/{name}/files/tmp/state", json={"content": "kept"}, headers=h)
        assert r.status_code == 200
        port = srv.port
        assert srv.stop() == 0
        srv = start_server(str(tmp_path), tokens=tokens, pool_min=0, port=port)
        listed = httpx.get(srv.url + "/sandboxes", headers=h).json()["data"]
        assert [s["name"] for s in listed] == [name] and listed[0]["state"] == "running"
        d = httpx.post(f"{srv.url}/sandboxes/{name}/exec", json={"command": ["cat", "/tmp/state"]}, headers=h).json()
        assert d["data"]["stdout"] == "kept"
    finally:
        httpx.delete(f"{srv.url}/sandboxes/{name}", headers=h, timeout=60)
        srv.stop()


def test_plain_run_and_exec_killed_when_client_goes_away(server, alice, sandbox):
    for path, marker in (("/run", "3031"), (f"/sandboxes/{sandbox}/exec", "3037")):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + path, json={"command": ["sleep", marker]}, headers=auth(), timeout=2.5)
        assert wait_until(lambda m=marker: not host_processes(f"sleep {m}"), 20), (path, host_processes(marker))
    assert alice.post(f"/sandboxes/{sandbox}/exec", json={"command": ["true"]}).json()["data"]["exit_code"] == 0
