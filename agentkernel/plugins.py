"""``agentkernel plugin install``: make a coding agent use agentkernel's MCP server, in that agent's own
configuration format.

- claude: a skill (``.claude/skills/agentkernel/SKILL.md``), a ``/sandbox`` command
  (``.claude/commands/sandbox.md``) and the ``agentkernel`` entry of ``.mcp.json`` (``~/.claude.json``
  with --global);
- codex: ``[mcp_servers.agentkernel]`` in ``.codex/config.toml`` (``~/.codex/config.toml``);
- gemini: ``mcpServers.agentkernel`` in ``.gemini/settings.json`` (``~/.gemini/settings.json``);
- opencode: ``mcp.agentkernel`` in ``opencode.json`` (``~/.config/opencode/opencode.json``);
- mcp: the ``.mcp.json`` entry only (any MCP client reading that file).

Only our own entry is touched in a shared file; everything else in it is kept. Re-running is idempotent,
and a file or entry changed since it was installed is left alone unless ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from .errors import ValidationError

TARGETS = ("claude", "codex", "gemini", "opencode", "mcp")
PROJECT_MARKERS = (".git", "agentkernel.toml", "package.json", "pyproject.toml", "setup.py", "requirements.txt",
                   "Cargo.toml", "go.mod", "Gemfile", "pom.xml", "build.gradle", "composer.json", "mix.exs",
                   "Makefile", "CMakeLists.txt", ".claude", ".mcp.json", ".gemini", ".codex", "opencode.json")

SKILL_MD = """\
---
name: agentkernel
description: Run untrusted or risky commands (builds, tests, scripts from the internet, generated code) in an
  isolated agentkernel sandbox instead of on this machine. Use the agentkernel MCP tools.
---

# Running commands in an agentkernel sandbox

Use the `agentkernel` MCP server's tools whenever a command could damage this machine, leak secrets, or
comes from an untrusted source:

- `sandbox_run`: one command in a fresh sandbox that is destroyed afterwards. Pass `command` as a list
  (`["python3", "-c", "print(1)"]`), optionally `image`, `profile` (`restrictive` for untrusted code),
  `network` (off by default), `timeout_ms`.
- `sandbox_create` / `sandbox_exec` / `sandbox_file_write` / `sandbox_file_read` / `sandbox_remove`:
  a named sandbox that keeps its files between commands. Remove it when done.

Results carry the exit code, stdout and stderr separately; a non-zero exit code is the command's own
failure, not agentkernel's. Never copy credentials into a sandbox unless the user asks for it.
"""

SANDBOX_COMMAND_MD = """\
---
description: Run a command in an isolated agentkernel sandbox
argument-hint: <command>
---

Run this command in an agentkernel sandbox (not on this machine) with the agentkernel MCP server's
`sandbox_run` tool, split into an argument list, then report its exit code and output:

$ARGUMENTS
"""


def server_entry() -> tuple[str, list[str]]:
    """The command that starts our MCP server on stdio."""
    exe = shutil.which("agentkernel")
    if exe:
        return "agentkernel", ["mcp-server"]
    return sys.executable, ["-m", "agentkernel", "mcp-server"]


def _home() -> str:
    return os.path.expanduser("~")


def is_project(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, m)) for m in PROJECT_MARKERS)


# ---- one file each ----------------------------------------------------------------------------------------


def _owned_file(path: str, content: str, force: bool, dry_run: bool) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if f.read() == content:
                return {"path": path, "action": "unchanged"}
        if not force:
            return {"path": path, "action": "skipped", "why": "edited since installed; --force overwrites it"}
        action = "overwrote"
    else:
        action = "created"
    if not dry_run:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    return {"path": path, "action": action}


def _json_entry(path: str, keys: tuple[str, ...], value: dict, force: bool, dry_run: bool) -> dict:
    """Set ``doc[keys[0]]...[keys[-1]] = value`` in a JSON file, keeping everything else."""
    doc: dict = {}
    existed = os.path.exists(path)
    if existed:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            return {"path": path, "action": "skipped", "why": f"not valid JSON ({exc}); fix or remove it"}
        if not isinstance(doc, dict):
            return {"path": path, "action": "skipped", "why": "not a JSON object"}
    node = doc
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            return {"path": path, "action": "skipped", "why": f"{k} is not an object"}
    old = node.get(keys[-1])
    if old == value:
        return {"path": path, "action": "unchanged"}
    if old is not None and not force:
        return {"path": path, "action": "skipped", "why": f"{'.'.join(keys)} was edited; --force replaces it"}
    node[keys[-1]] = value
    if not dry_run:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    return {"path": path, "action": "updated" if existed else "created"}


def _toml_table(path: str, table: str, values: dict, force: bool, dry_run: bool) -> dict:
    """Our ``[table]`` in a TOML file: appended when absent; replaced (with force) when different."""
    import tomllib

    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            return {"path": path, "action": "skipped", "why": f"not valid TOML ({exc})"}
        node = doc
        for k in table.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node == values:
            return {"path": path, "action": "unchanged"}
        if node is not None and not force:
            return {"path": path, "action": "skipped", "why": f"[{table}] was edited; --force replaces it"}
        if node is not None:
            text = _drop_table(text, table)
    block = f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    if not dry_run:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(new)
    return {"path": path, "action": "updated" if text else "created"}


def _drop_table(text: str, table: str) -> str:
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if s.startswith("["):
            skipping = s == f"[{table}]"
        if not skipping:
            out.append(line)
    return "".join(out)


# ---- targets ------------------------------------------------------------------------------------------


def _plan(target: str, base: str, global_: bool) -> list[tuple]:
    """(kind, path, ...) steps for one target."""
    cmd, args = server_entry()
    stdio = {"command": cmd, "args": args}
    if target == "claude":
        claude = os.path.join(base, ".claude")
        mcp = os.path.join(_home(), ".claude.json") if global_ else os.path.join(base, ".mcp.json")
        return [("file", os.path.join(claude, "skills", "agentkernel", "SKILL.md"), SKILL_MD),
                ("file", os.path.join(claude, "commands", "sandbox.md"), SANDBOX_COMMAND_MD),
                ("json", mcp, ("mcpServers", "agentkernel"), stdio)]
    if target == "mcp":
        if global_:
            raise ValidationError("plugin install mcp --global: .mcp.json is a per-project file",
                                  hint="run it in the project, or install an agent's plugin with --global")
        return [("json", os.path.join(base, ".mcp.json"), ("mcpServers", "agentkernel"), stdio)]
    if target == "codex":
        return [("toml", os.path.join(base, ".codex", "config.toml"), "mcp_servers.agentkernel", stdio)]
    if target == "gemini":
        return [("json", os.path.join(base, ".gemini", "settings.json"), ("mcpServers", "agentkernel"), stdio)]
    if target == "opencode":
        path = (os.path.join(_home(), ".config", "opencode", "opencode.json") if global_
                else os.path.join(base, "opencode.json"))
        return [("json", path, ("mcp", "agentkernel"), {"type": "local", "command": [cmd, *args], "enabled": True})]
    raise ValidationError(f"unknown plugin target {target!r} (known: {', '.join(TARGETS)}, all)")


def install(target: str, directory: str, *, global_: bool = False, force: bool = False,
            dry_run: bool = False) -> list[dict]:
    if global_:
        base = _home()
    else:
        if not os.path.isdir(directory):
            raise ValidationError(f"{directory} is not a directory")
        if not is_project(directory):
            raise ValidationError(
                f"{directory} does not look like a project (no .git, agentkernel.toml, package.json, "
                "pyproject.toml, ...): refusing to write agent configuration there",
                hint="run it in your project's directory, `agentkernel init` first, or use --global")
        base = directory
    targets = TARGETS if target == "all" else (target,)
    changes: list[dict] = []
    seen: set[tuple] = set()
    for t in targets:
        for step in _plan(t, base, global_):
            key = (step[0], step[1], str(step[2]))
            if key in seen:
                continue
            seen.add(key)
            if step[0] == "file":
                changes.append({"target": t, **_owned_file(step[1], step[2], force, dry_run)})
            elif step[0] == "json":
                changes.append({"target": t, **_json_entry(step[1], step[2], step[3], force, dry_run)})
            else:
                changes.append({"target": t, **_toml_table(step[1], step[2], step[3], force, dry_run)})
    return changes


def status(directory: str) -> list[dict]:
    rows = []
    for t in TARGETS:
        for where, base, glob in (("project", directory, False), ("global", _home(), True)):
            try:
                steps = _plan(t, base, glob)
            except ValidationError:
                continue
            got = [c["action"] for c in (
                _owned_file(s[1], s[2], False, True) if s[0] == "file" else
                _json_entry(s[1], s[2], s[3], False, True) if s[0] == "json" else
                _toml_table(s[1], s[2], s[3], False, True) for s in steps)]
            state = ("installed" if all(a == "unchanged" for a in got) else
                     "modified" if any(a == "skipped" for a in got) else
                     "partial" if any(a == "unchanged" for a in got) else "absent")
            rows.append({"target": t, "scope": where, "state": state, "files": [s[1] for s in steps]})
    return rows
