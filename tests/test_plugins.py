"""`agentkernel plugin install|list`: each agent's own configuration format, idempotent, never clobbering
a user's edits without --force, refusing non-project directories; the written `.mcp.json` is loaded by
the official MCP client, which starts our server from it and lists its tools."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib

import pytest
from conftest import ak


@pytest.fixture
def project(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    return tmp_path


def test_install_all_writes_each_agents_format(project):
    p = ak("plugin", "install", "all", cwd=str(project))
    assert p.returncode == 0, p.stderr
    skill = (project / ".claude" / "skills" / "agentkernel" / "SKILL.md").read_text()
    assert skill.startswith("---\nname: agentkernel\ndescription:")
    assert "$ARGUMENTS" in (project / ".claude" / "commands" / "sandbox.md").read_text()
    mcp = json.loads((project / ".mcp.json").read_text())["mcpServers"]["agentkernel"]
    assert mcp["args"][-1] == "mcp-server"
    codex = tomllib.loads((project / ".codex" / "config.toml").read_text())["mcp_servers"]["agentkernel"]
    assert codex == mcp
    gemini = json.loads((project / ".gemini" / "settings.json").read_text())["mcpServers"]["agentkernel"]
    assert gemini == mcp
    oc = json.loads((project / "opencode.json").read_text())["mcp"]["agentkernel"]
    assert oc["type"] == "local" and oc["command"] == [mcp["command"], *mcp["args"]] and oc["enabled"] is True
    again = ak("plugin", "install", "all", cwd=str(project))
    assert again.returncode == 0 and again.stdout.decode().count("unchanged") == 6
    listing = ak("plugin", "list", "--json", cwd=str(project))
    states = {(r["target"], r["scope"]): r["state"] for r in json.loads(listing.stdout)}
    assert all(states[(t, "project")] == "installed" for t in ("claude", "codex", "gemini", "opencode", "mcp"))


def test_user_edits_are_kept_unless_forced(project):
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"},
                                                                  "agentkernel": {"command": "mine"}}}))
    (project / ".codex").mkdir()
    (project / ".codex" / "config.toml").write_text('model = "m"\n\n[mcp_servers.agentkernel]\ncommand = "mine"\n')
    p = ak("plugin", "install", "mcp", cwd=str(project))
    assert p.returncode == 1 and b"skipped" in p.stdout and b"--force" in p.stdout
    assert json.loads((project / ".mcp.json").read_text())["mcpServers"]["agentkernel"] == {"command": "mine"}
    p = ak("plugin", "install", "mcp", "--force", "--dry-run", cwd=str(project))
    assert p.returncode == 0 and b"would update" in p.stdout
    assert json.loads((project / ".mcp.json").read_text())["mcpServers"]["agentkernel"] == {"command": "mine"}
    assert ak("plugin", "install", "mcp", "--force", cwd=str(project)).returncode == 0
    servers = json.loads((project / ".mcp.json").read_text())["mcpServers"]
    assert servers["other"] == {"command": "x"} and servers["agentkernel"]["args"][-1] == "mcp-server"
    assert ak("plugin", "install", "codex", cwd=str(project)).returncode == 1
    assert ak("plugin", "install", "codex", "--force", cwd=str(project)).returncode == 0
    doc = tomllib.loads((project / ".codex" / "config.toml").read_text())
    assert doc["model"] == "m" and doc["mcp_servers"]["agentkernel"]["args"][-1] == "mcp-server"
    (project / ".claude" / "skills" / "agentkernel").mkdir(parents=True)
    (project / ".claude" / "skills" / "agentkernel" / "SKILL.md").write_text("my own skill\n")
    p = ak("plugin", "install", "claude", cwd=str(project))
    assert p.returncode == 1 and (project / ".claude/skills/agentkernel/SKILL.md").read_text() == "my own skill\n"


def test_refuses_a_directory_that_is_not_a_project(tmp_path):
    p = ak("plugin", "install", "claude", cwd=str(tmp_path))
    assert p.returncode == 125 and b"does not look like a project" in p.stderr
    assert os.listdir(tmp_path) == []
    assert ak("plugin", "install", "mcp", "--global", cwd=str(tmp_path)).returncode == 125


def test_global_install_goes_under_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    p = ak("plugin", "install", "gemini", "--global", env={"HOME": str(home)}, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "agentkernel" in json.loads((home / ".gemini" / "settings.json").read_text())["mcpServers"]


@pytest.mark.engine("podman")
def test_mcp_json_is_loaded_by_the_official_mcp_client(project):
    """The client starts our server exactly as .mcp.json says and sees its tools (Claude Code's loader
    does the same with this file)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    # no `agentkernel` on PATH (an installed one may be another checkout's): the file names this interpreter
    assert ak("plugin", "install", "mcp", cwd=str(project), env={"PATH": "/usr/bin:/bin"}).returncode == 0
    entry = json.loads((project / ".mcp.json").read_text())["mcpServers"]["agentkernel"]
    params = StdioServerParameters(command=entry["command"], args=entry["args"], cwd=str(project),
                                   env=dict(os.environ, AGENTKERNEL_LOG_LEVEL="WARNING"))

    async def go():
        with open(project / "mcp.err", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (r, w), ClientSession(r, w) as session:
                await session.initialize()
                names = {t.name for t in (await session.list_tools()).tools}
                res = await session.call_tool("sandbox_run", {"command": ["echo", "via-plugin"],
                                                              "compatibility_mode": "claude"})
                return names, res

    names, res = asyncio.run(asyncio.wait_for(go(), 120))
    assert {"sandbox_run", "sandbox_exec_detach", "snapshot_take"} <= names
    assert res.structured_content["stdout"] == "via-plugin\n"
