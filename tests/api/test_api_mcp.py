"""The MCP server driven by the official MCP client: over stdio (`agentkernel mcp` as a subprocess) and
over streamable HTTP (mounted at /mcp in `agentkernel serve`, behind the bearer token)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from api_helpers import TOKENS, unique

pytestmark = pytest.mark.engine("podman")

EXPECTED_TOOLS = {"sandbox_run", "sandbox_create", "sandbox_exec", "sandbox_list", "sandbox_remove",
                  "sandbox_file_write", "sandbox_file_read", "sandbox_start", "sandbox_stop",
                  # the reference's later tools (api/reftools.py)
                  "sandbox_extend_ttl", "sandbox_write_files", "sandbox_exec_detach", "sandbox_exec_status",
                  "sandbox_exec_logs", "sandbox_exec_kill", "sandbox_exec_list", "snapshot_list", "snapshot_take",
                  "snapshot_get", "snapshot_delete", "snapshot_restore"}


def text_of(result) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def exercise(session, name: str) -> None:
    await session.initialize()
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == EXPECTED_TOOLS
    run_props = tools["sandbox_run"].input_schema["properties"]
    assert {"command", "cwd", "env", "timeout_ms", "image", "profile", "fast"} <= set(run_props)

    r = await session.call_tool("sandbox_run", {"command": ["sh", "-c", "echo $GREETING; pwd; echo e >&2; exit 3"],
                                                "env": {"GREETING": "hi"}, "cwd": "/tmp"})
    assert not r.is_error, text_of(r)
    assert r.structured_content["exit_code"] == 3
    assert r.structured_content["stdout"] == "hi\n/tmp\n" and r.structured_content["stderr"] == "e\n"
    assert "exit_code: 3" in text_of(r)

    r = await session.call_tool("sandbox_run", {"command": ["sleep", "20"], "timeout_ms": 800})
    assert r.structured_content["timed_out"] is True and r.structured_content["exit_code"] == 124

    r = await session.call_tool("sandbox_run", {"command": ["sh", "-c", "seq 1 20000"]})
    sc = r.structured_content
    assert sc["truncated"] is True and sc["output_cap_bytes"] == 16000 and sc["stdout_bytes"] > 100000
    assert sc["stdout"].startswith("1\n2\n3\n") and sc["stdout"].endswith("19999\n20000\n")
    assert "bytes truncated" in sc["stdout"] and "capped at 16000 bytes" in text_of(r)

    r = await session.call_tool("sandbox_run", {"command": ["true"], "bogus": 1})
    assert r.is_error and "bogus" in text_of(r)

    r = await session.call_tool("sandbox_create", {"name": name})
    assert not r.is_error, text_of(r)
    r = await session.call_tool("sandbox_list", {})
    assert name in text_of(r)
    r = await session.call_tool("sandbox_file_write", {"name": name, "path": "/tmp/m.txt", "content": "mcp data"})
    assert not r.is_error, text_of(r)
    r = await session.call_tool("sandbox_file_read", {"name": name, "path": "/tmp/m.txt"})
    assert text_of(r) == "mcp data"
    r = await session.call_tool("sandbox_exec", {"name": name, "command": ["sh", "-c", "echo $V; pwd"],
                                                 "env": ["V=1"], "workdir": "/tmp", "timeout_ms": 5000})
    assert r.structured_content["stdout"] == "1\n/tmp\n"
    r = await session.call_tool("sandbox_exec", {"name": name, "command": ["id"], "sudo": True})
    assert r.is_error and "sudo" in text_of(r)
    r = await session.call_tool("sandbox_write_files", {"name": name, "files": {"/tmp/w/a": "A", "/tmp/w/b": "B"}})
    assert not r.is_error and r.structured_content["written"] == 2, text_of(r)
    r = await session.call_tool("sandbox_exec_detach", {"name": name, "command": ["sh", "-c", "cat /tmp/w/a /tmp/w/b"]})
    cmd_id = r.structured_content["id"]
    for _ in range(100):
        r = await session.call_tool("sandbox_exec_status", {"name": name, "id": cmd_id})
        if r.structured_content["status"] != "running":
            break
        await asyncio.sleep(0.1)
    assert r.structured_content["exit_code"] == 0
    r = await session.call_tool("sandbox_exec_logs", {"name": name, "id": cmd_id})
    assert r.structured_content["stdout"] == "AB"
    r = await session.call_tool("sandbox_extend_ttl", {"name": name, "by": "1h"})
    assert not r.is_error and r.structured_content["expires_at"].endswith("Z")
    r = await session.call_tool("sandbox_file_read", {"name": name, "path": "/../etc/passwd"})
    assert r.is_error
    r = await session.call_tool("sandbox_stop", {"name": name})
    assert "stopped" in text_of(r)
    r = await session.call_tool("sandbox_exec", {"name": name, "command": ["true"]})
    assert r.is_error and "not running" in text_of(r)
    r = await session.call_tool("sandbox_start", {"name": name})
    assert "running" in text_of(r)
    r = await session.call_tool("sandbox_remove", {"name": name})
    assert not r.is_error
    r = await session.call_tool("sandbox_exec", {"name": name, "command": ["true"]})
    assert r.is_error and "no sandbox named" in text_of(r)


def test_mcp_stdio_with_official_client(tmp_path):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    env = dict(os.environ, AGENTKERNEL_LOG_LEVEL="WARNING")
    params = StdioServerParameters(command=sys.executable, args=["-m", "agentkernel", "mcp", "--pool-min", "1",
                                                                 "--pool-max", "2"], env=env, cwd=str(tmp_path))

    async def go():
        with open(tmp_path / "mcp.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await exercise(session, unique("mcp"))

    asyncio.run(asyncio.wait_for(go(), 240))
    assert "Traceback" not in (tmp_path / "mcp.err").read_text()


def test_mcp_streamable_http_in_serve(server):
    import httpx
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def go():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKENS['bob']}"}, timeout=120) as http:
            async with streamable_http_client(server.url + "/mcp/", http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    r = await session.call_tool("sandbox_run", {"command": ["echo", "over-http"]})
                    assert r.structured_content["stdout"] == "over-http\n"
                    name = unique("mcph")
                    assert not (await session.call_tool("sandbox_create", {"name": name})).is_error
            # bob's sandbox is bob's: alice does not see it through the REST API
            alice = httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKENS['alice']}"})
            names = [s["name"] for s in (await alice.get(server.url + "/sandboxes")).json()["data"]]
            assert name not in names
            bobs = [s["name"] for s in (await http.get(server.url + "/sandboxes")).json()["data"]]
            assert name in bobs
            await http.delete(f"{server.url}/sandboxes/{name}")
            await alice.aclose()

    asyncio.run(asyncio.wait_for(go(), 120))
