"""Network policy and secret bindings over the HTTP API and MCP (issue 17): a real `agentkernel serve`
with per-token policies, sandboxes on podman, test hosts in a network namespace this module makes
(tests/egress/conftest.py). Enforcement is the egress gateway's (tests/egress); these tests prove the
API hands it exactly what the caller asked for, within the caller's policy, and refuses the rest."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from api_helpers import TOKENS, auth, start_server, unique

from tests.conftest import ak

pytestmark = pytest.mark.engine("podman")

IMAGE = "agentkernel/debian"
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "egress", "client_prog.py")) as _f:
    CLIENT = _f.read()

CONFIG = """
[[api.tenant]]
name = "alice"
network_modes = ["none", "allowlist"]
allow_hosts = ["allowed.test", "bound.test", "unbound.test"]
secrets = ["API_TOK"]
"""


@pytest.fixture(scope="module")
def testnet():
    from tests.egress.conftest import make_testnet

    yield from make_testnet()


@pytest.fixture(scope="module")
def secret_value(testnet):
    value = "api-secret-" + os.urandom(6).hex()
    for name, v in (("API_TOK", value), ("OTHER_TOK", "other-" + value)):
        r = ak("secret", "set", name, input=v.encode())
        assert r.returncode == 0, r.stderr
    return value


@pytest.fixture(scope="module")
def srv(testnet, secret_value, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-egress")
    (d / "agentkernel.toml").write_text(CONFIG)
    s = start_server(str(d), tokens=TOKENS, pool_min=0)
    try:
        yield s
    finally:
        h = auth("alice")
        for sb in httpx.get(s.url + "/sandboxes", headers=h, timeout=30).json().get("data") or []:
            httpx.delete(f"{s.url}/sandboxes/{sb['name']}", headers=h, timeout=60)
        assert s.stop() == 0, s.log()
        assert "Traceback" not in s.log(), s.log()


def _run(srv, who: str, **body):
    body = {"image": IMAGE, "fast": False, **body}
    return httpx.post(srv.url + "/run", json=body, headers=auth(who), timeout=180)


def _probe_cmd(*probes: str, script_prefix: str = "") -> list[str]:
    script = script_prefix + 'exec python3 -c "$0" ' + " ".join(f'"{p}"' for p in probes)
    return ["sh", "-c", script, CLIENT]


def test_run_with_allowlist_is_enforced(srv, testnet):
    r = _run(srv, "alice", allow_hosts=["allowed.test"],
             command=_probe_cmd("get:http://allowed.test/api", "get:http://other.test/", f"tcp:{testnet.addr}:80",
                                "dns:other.test"))
    assert r.status_code == 200, r.text
    out = r.json()["data"]["stdout"]
    assert "GET-OK get:http://allowed.test/api" in out, out
    assert "GET-FAIL get:http://other.test/" in out, out
    assert f"CLOSED tcp:{testnet.addr}:80" in out and "NXDOMAIN dns:other.test" in out, out


def test_secret_binding_by_name_value_never_over_the_api(srv, testnet, secret_value):
    testnet.clear()
    r = _run(srv, "alice", network="allowlist", allow_hosts=["bound.test", "unbound.test"],
             secrets=["API_TOK:bound.test:Authorization"],
             command=_probe_cmd("env:API_TOK", "get:http://bound.test/api-a|H=Authorization=Bearer $T",
                                "get:http://unbound.test/api-b|H=Authorization=Bearer $T",
                                script_prefix='T="$API_TOK"; '))
    assert r.status_code == 200, r.text
    assert secret_value not in r.text, r.text
    assert "ENV env:API_TOK AGENTKERNEL_SECRET_PLACEHOLDER_API_TOK_" in r.json()["data"]["stdout"], r.text
    heads = {e["head"].split(" ")[1]: e["head"] for e in testnet.events() if e["kind"] == "http"}
    assert f"Bearer {secret_value}" in heads["/api-a"], heads
    assert secret_value not in heads["/api-b"], heads


def test_named_sandbox_with_allowlist_and_secret(srv, testnet, secret_value):
    name = unique("egr")
    h = auth("alice")
    r = httpx.post(srv.url + "/sandboxes", headers=h, timeout=180,
                   json={"name": name, "image": IMAGE, "allow_hosts": ["allowed.test", "bound.test"],
                         "secrets": ["API_TOK:bound.test"]})
    assert r.status_code == 201, r.text
    try:
        assert secret_value not in r.text
        r = httpx.post(f"{srv.url}/sandboxes/{name}/exec", headers=h, timeout=120,
                       json={"command": _probe_cmd("get:http://allowed.test/named", "get:http://other.test/",
                                                   "env:API_TOK")})
        out = r.json()["data"]["stdout"]
        assert "GET-OK get:http://allowed.test/named" in out and "GET-FAIL get:http://other.test/" in out, out
        assert secret_value not in r.text and "PLACEHOLDER_API_TOK" in out, out
        assert secret_value not in httpx.get(f"{srv.url}/sandboxes/{name}", headers=h, timeout=30).text
    finally:
        assert httpx.delete(f"{srv.url}/sandboxes/{name}", headers=h, timeout=120).status_code == 200


@pytest.mark.parametrize("who,body,why", [
    ("alice", {"network": "open"}, "network mode 'open' is not allowed for this caller"),
    ("alice", {"network": True}, "network mode 'open' is not allowed"),
    ("alice", {"allow_hosts": ["other.test"]}, "allow_hosts: 'other.test' is not within"),
    ("alice", {"allow_hosts": ["allowed.test:8080"]}, "allow_hosts: 'allowed.test:8080' is not within"),
    ("alice", {"allow_hosts": ["bound.test"], "secrets": ["OTHER_TOK:bound.test"]},
     "secrets: this caller may not bind secret 'OTHER_TOK'"),
    ("bob", {"allow_hosts": ["allowed.test"]}, "network access is not allowed"),
    ("bob", {"network": "allowlist", "allow_hosts": ["allowed.test"]}, "network access is not allowed"),
    ("bob", {"allow_hosts": ["bound.test"], "secrets": ["API_TOK:bound.test"]}, "network access is not allowed"),
])
def test_server_policy_refuses(srv, who, body, why):
    r = _run(srv, who, command=["true"], **body)
    assert r.status_code == 403 and why in r.json()["error"], r.text
    r = httpx.post(srv.url + "/sandboxes", headers=auth(who), timeout=60, json={"name": unique("p"), **body})
    assert r.status_code == 403 and why in r.json()["error"], r.text


@pytest.mark.parametrize("body,field", [
    ({"network": "bogus"}, "network: must be"),
    ({"network": 3}, "network"),
    ({"allow_hosts": ["bad..name"]}, "allow_hosts[0]: invalid host name"),
    ({"allow_hosts": ["allowed.test", "*.test"]}, "allow_hosts[1]"),
    ({"allow_hosts": ["10.0.0.1/33"]}, "allow_hosts[0]: invalid IPv4 network"),
    ({"allow_hosts": ["a.test:70000"]}, "allow_hosts[0]: invalid port"),
    ({"block_hosts": ["10.0.0.1/8"]}, "block_hosts[0]"),
    ({"network": False, "allow_hosts": ["allowed.test"]}, "allow_hosts: contradicts"),
    ({"network": "allowlist"}, "network: network mode allowlist needs at least one allowed destination"),
    ({"allow_hosts": ["allowed.test"], "secrets": ["API_TOK:*"]}, "secrets[0]"),
    ({"allow_hosts": ["allowed.test"], "secrets": ["API_TOK"]}, "secrets[0]: expected NAME:HOST[:HEADER]"),
    ({"allow_hosts": ["allowed.test"], "secrets": ["API_TOK:bound.test"]}, "secrets: secret API_TOK is bound to"),
    ({"allow_hosts": ["allowed.test"], "secrets": ["NOPE_TOK:allowed.test"]}, "secrets[0]: no secret named"),
    ({"secrets": ["API_TOK:bound.test"]}, "secrets: secrets need network"),
])
def test_bad_network_input_is_422_naming_the_field(srv, body, field):
    r = _run(srv, "alice", command=["true"], **body)
    assert r.status_code in (400, 422) and field in r.json()["error"], r.text
    if body.get("network") != 3:  # a wrong JSON type is the body schema's 400; values are 422
        assert r.status_code == 422, r.text


def test_mcp_over_http_network_policy_and_secrets(srv, testnet, secret_value):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def go():
        async with (httpx.AsyncClient(headers=auth("alice"), timeout=180) as http,
                    streamable_http_client(srv.url + "/mcp/", http_client=http) as streams,
                    ClientSession(streams[0], streams[1]) as session):
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            props = tools["sandbox_run"].input_schema["properties"]
            assert {"network", "allow_hosts", "block_hosts", "secrets"} <= set(props)
            r = await session.call_tool("sandbox_run", {
                "command": _probe_cmd("get:http://allowed.test/mcp", "get:http://other.test/", "env:API_TOK"),
                "image": IMAGE, "fast": False, "allow_hosts": ["allowed.test", "bound.test"],
                "secrets": ["API_TOK:bound.test"], "timeout_ms": 120_000})
            assert not r.is_error, r.content
            out = r.structured_content["stdout"]
            assert "GET-OK get:http://allowed.test/mcp" in out and "GET-FAIL get:http://other.test/" in out, out
            assert secret_value not in str(r.content) and "PLACEHOLDER_API_TOK" in out
            r = await session.call_tool("sandbox_run", {"command": ["true"], "allow_hosts": ["bad..name"]})
            assert r.is_error and "allow_hosts[0]" in r.content[0].text, r.content
            r = await session.call_tool("sandbox_run", {"command": ["true"], "network": "open"})
            assert r.is_error and "network mode 'open' is not allowed" in r.content[0].text, r.content
            r = await session.call_tool("sandbox_create", {"name": unique("m"), "allow_hosts": ["other.test"]})
            assert r.is_error and "allow_hosts" in r.content[0].text, r.content

    asyncio.run(go())
