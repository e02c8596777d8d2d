"""``agentkernel mcp`` over stdio answers the handshake before its heavy imports (api/mcp_stdio.py), with
the same identity and tool list as the SDK server (api/mcp_identity.py), driven by the official client."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

HEAVY = ("pydantic", "mcp", "mcp_types", "anyio", "agentkernel.api.mcp", "agentkernel.api.service",
         "agentkernel.manager")

# the real CLI entry point, with a spy on the fast path's writer: the module set at the moment the
# initialize answer is written goes to a file
SPY = """import json, sys
from agentkernel.api import mcp_stdio
_emit = mcp_stdio._emit
def spy(wire, obj):
    if isinstance(obj.get("result"), dict) and "serverInfo" in obj["result"]:
        with open({out!r}, "w") as f:
            json.dump(sorted(sys.modules), f)
    _emit(wire, obj)
mcp_stdio._emit = spy
from agentkernel.cli import main
sys.exit(main(["mcp", "--pool-min", "1", "--pool-max", "2"]))
"""


def test_initialize_answers_before_the_heavy_imports_then_the_sdk_server_takes_over(tmp_path):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    out = tmp_path / "modules.json"
    spy = tmp_path / "spy.py"
    spy.write_text(SPY.format(out=str(out)))
    env = dict(os.environ, AGENTKERNEL_LOG_LEVEL="WARNING", AGENTKERNEL_RUNTIME_DIR=str(tmp_path / "run"),
               AGENTKERNEL_HOME=str(tmp_path / "home"))
    params = StdioServerParameters(command=sys.executable, args=["-P", str(spy)], env=env, cwd=str(tmp_path))

    async def go():
        with open(tmp_path / "mcp.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.server_info.name == "agentkernel"
                modules = set(json.loads(out.read_text()))
                tools = {t.name: t for t in (await session.list_tools()).tools}
                assert "sandbox_run" in tools and "command" in tools["sandbox_run"].input_schema["properties"]
                # the first call needs the real server: it waits for the load, then the session is handed over
                r = await session.call_tool("sandbox_run", {"command": ["echo", "hello"], "backend": "wasm"})
                assert not r.is_error, r.content
                assert r.structured_content["exit_code"] == 0 and r.structured_content["stdout"] == "hello\n"
                # and the SDK server answers list_tools the same as the fast path did
                again = {t.name: t.input_schema for t in (await session.list_tools()).tools}
                assert again == {n: t.input_schema for n, t in tools.items()}
                r = await session.call_tool("sandbox_run", {"command": ["true"], "bogus": 1})
                assert r.is_error
                return modules

    modules = asyncio.run(asyncio.wait_for(go(), 200))
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert not loaded, f"imported before the initialize answer: {loaded}"
    err = (tmp_path / "mcp.err").read_text()
    assert "Traceback" not in err and "differs" not in err, err


def test_handshake_identity_matches_the_sdk_server():
    """The fast path's initialize result for each revision, and its tool list, are the SDK server's."""
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

    from agentkernel.api import mcp_identity, mcp_toolgen
    from agentkernel.api.mcp import build_server, tool_list

    assert tuple(HANDSHAKE_PROTOCOL_VERSIONS) == mcp_identity.HANDSHAKE_VERSIONS
    assert mcp_identity.tools() == mcp_toolgen.generate(), \
        "api/mcp_tools.json is out of date: python -m agentkernel.api.mcp_toolgen --write"
    wire = [t.model_dump(by_alias=True, exclude_unset=True, mode="json") for t in tool_list()]
    assert wire == mcp_identity.tools()
    server = build_server(svc=None)
    opts = server.create_initialization_options()
    assert (opts.server_name, opts.server_version, opts.instructions) == (
        mcp_identity.NAME, mcp_identity.version(), mcp_identity.INSTRUCTIONS)
    caps = opts.capabilities.model_dump(by_alias=True, exclude_none=True, mode="json")
    # (an empty extensions map is left off the wire; the raw-wire test below compares whole answers)
    assert {k: v for k, v in caps.items() if v != {}} == mcp_identity.CAPABILITIES
    assert mcp_identity.negotiate("1999-01-01") == HANDSHAKE_PROTOCOL_VERSIONS[-1]
    for v in HANDSHAKE_PROTOCOL_VERSIONS:
        assert mcp_identity.initialize_result(v)["protocolVersion"] == v


@pytest.mark.parametrize("version", ["2024-11-05", "2025-11-25", "1999-01-01"])
def test_raw_initialize_is_the_sdk_servers_answer(tmp_path, version):
    """Over the raw wire: the fast answer; then a ping and a call after the hand-over (the SDK server,
    fed the replayed initialize, accepts the session) - a call sent before notifications/initialized too."""
    import subprocess

    env = dict(os.environ, AGENTKERNEL_RUNTIME_DIR=str(tmp_path / "run"), AGENTKERNEL_HOME=str(tmp_path / "home"))
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "mcp", "--pool-min", "0"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))

    def send(obj):
        p.stdin.write((json.dumps(obj) + "\n").encode())
        p.stdin.flush()

    def recv():
        return json.loads(p.stdout.readline())

    try:
        send({"jsonrpc": "2.0", "id": 7, "method": "initialize",
              "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
        r = recv()
        from agentkernel.api import mcp_identity

        assert r == {"jsonrpc": "2.0", "id": 7, "result": mcp_identity.initialize_result(version)}
        send({"jsonrpc": "2.0", "id": "c", "method": "tools/call",
              "params": {"name": "sandbox_run", "arguments": {"command": ["echo", "raw"], "backend": "wasm"}}})
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": "p", "method": "ping"})
        got = {m["id"]: m for m in (recv(), recv())}
        assert got["p"]["result"] == {}
        assert got["c"]["result"]["structuredContent"]["stdout"] == "raw\n", got["c"]
    finally:
        p.stdin.close()
        assert p.wait(60) == 0
    err = p.stderr.read().decode()
    assert "Traceback" not in err and "differs" not in err, err
