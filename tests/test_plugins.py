"""`agentkernel plugin install|list`: each agent's own configuration format, idempotent, never clobbering
a user's edits without --force, refusing non-project directories; the written `.mcp.json` is loaded by
the official MCP client, which starts our server from it and lists its tools; every agent's file is read
by that agent's own CLI (Claude Code, Codex, Gemini CLI, OpenCode: `mcp list`)."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib

import pytest

from tests.conftest import ak


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


# ---- each agent's own loader ------------------------------------------------------------------------------
# No JSON schema for these files ships in the agents' packages; their CLIs' `mcp list` load the files with
# the agents' own configuration loaders (and try the server). setup --reference-clients installs them.

AGENT_CLIS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "agentclis")


def _agent_cli(name: str) -> str:
    exe = os.path.join(AGENT_CLIS, "node_modules", ".bin", name)
    if not os.access(exe, os.X_OK):
        why = f"{name} CLI not installed under {AGENT_CLIS} (agentkernel setup --reference-clients)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"required for CI: {why}")
        pytest.skip(why)
    return exe


@pytest.fixture
def agent_env(project, tmp_path_factory):
    """A home of its own, and `agentkernel` on PATH = this checkout's code (what the written entries run)."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("home")
    bindir = tmp_path_factory.mktemp("bin")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shim = bindir / "agentkernel"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={repo} exec {sys.executable} -m agentkernel \"$@\"\n")
    shim.chmod(0o755)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_", "GEMINI_", "GOOGLE_"))}
    env.update(HOME=str(home), PATH=f"{bindir}:{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
               AGENTKERNEL_LOG_LEVEL="WARNING", NO_COLOR="1", MCP_TIMEOUT="120000")
    p = ak("plugin", "install", "all", cwd=str(project), env=env)
    assert p.returncode == 0, p.stderr
    return env, home


def _run(argv, project, env, timeout=240):
    import subprocess

    p = subprocess.run(argv, cwd=str(project), env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


# Each test asserts what the agent's loader read (scope, command, args, transport) and that the agent then
# tried to start the server ("- <status>"); whether it connected within the agent's own start-up timeout
# depends on the machine's load (our server answers MCP through the official client:
# test_mcp_json_is_loaded_by_the_official_mcp_client). A broken file is refused by the same loader.


def test_claude_code_loads_mcp_json(project, agent_env):
    env, _ = agent_env
    claude = _agent_cli("claude")
    rc, out = _run([claude, "mcp", "get", "agentkernel"], project, env)
    assert rc == 0 and "Scope: Project config (shared via .mcp.json)" in out and "Pending approval" in out, out
    # a project's servers wait for the user's approval; approve ours as a user would, then it is started
    (project / ".claude" / "settings.local.json").write_text('{"enabledMcpjsonServers": ["agentkernel"]}\n')
    rc, out = _run([claude, "mcp", "list"], project, env)
    assert "agentkernel: agentkernel mcp-server - " in out, out


def test_codex_loads_its_config_toml(project, agent_env):
    env, home = agent_env
    codex = _agent_cli("codex")
    # codex reads a project's .codex/config.toml once the project is trusted
    (home / ".codex").mkdir()
    (home / ".codex" / "config.toml").write_text(f'[projects."{project}"]\ntrust_level = "trusted"\n')
    rc, out = _run([codex, "mcp", "list", "--json"], project, env)
    assert rc == 0, out
    listed, _ = json.JSONDecoder().raw_decode(out[out.index("["):])
    (entry,) = [e for e in listed if e["name"] == "agentkernel"]
    assert entry["enabled"] and entry["transport"] == {**entry["transport"], "type": "stdio",
                                                       "command": "agentkernel", "args": ["mcp-server"]}
    (project / ".codex" / "config.toml").write_text("[mcp_servers.agentkernel]\ncommand = 3\n")
    rc, out = _run([codex, "mcp", "list", "--json"], project, env)
    assert rc != 0 or "agentkernel" not in out, out


def test_gemini_cli_loads_its_settings(project, agent_env):
    env, home = agent_env
    gemini = _agent_cli("gemini")
    (home / ".gemini").mkdir()
    (home / ".gemini" / "trustedFolders.json").write_text(json.dumps({str(project): "TRUST_FOLDER"}))
    rc, out = _run([gemini, "mcp", "list"], project, env)
    assert rc == 0 and "agentkernel: agentkernel mcp-server (stdio) - " in out, out


def test_opencode_loads_opencode_json(project, agent_env):
    env, _ = agent_env
    opencode = _agent_cli("opencode")
    rc, out = _run([opencode, "mcp", "list"], project, env)
    assert rc == 0 and "agentkernel" in out and "agentkernel mcp-server" in out, out
    doc = json.loads((project / "opencode.json").read_text())
    doc["mcp"]["agentkernel"]["type"] = "nope"
    (project / "opencode.json").write_text(json.dumps(doc))
    rc, out = _run([opencode, "mcp", "list"], project, env)
    assert rc != 0 or "invalid" in out.lower() or "agentkernel" not in out, out  # refused or dropped
