"""The coding agents the reference system knows (claude, codex, gemini, opencode): how to find each one
on this host, which key it needs, and which sandbox image serves it. Used by ``agentkernel agents``,
``create --agent``, ``init --agent`` and ``plugin install``."""

from __future__ import annotations

import os
import shutil


class Agent:
    __slots__ = ("command", "install", "keys", "name", "title")

    def __init__(self, name: str, title: str, command: str, keys: tuple[str, ...], install: str) -> None:
        self.name, self.title, self.command, self.keys, self.install = name, title, command, keys, install


AGENTS = {
    "claude": Agent("claude", "Claude Code", "claude", ("ANTHROPIC_API_KEY",),
                    "npm install -g @anthropic-ai/claude-code"),
    "codex": Agent("codex", "Codex", "codex", ("OPENAI_API_KEY",), "npm install -g @openai/codex"),
    "gemini": Agent("gemini", "Gemini CLI", "gemini", ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
                    "npm install -g @google/gemini-cli"),
    "opencode": Agent("opencode", "OpenCode", "opencode", ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
                      "npm install -g opencode-ai"),
}


def agent_image(name: str) -> str:
    """What ``agentkernel images build --agent`` tags (docs/images.md): claude's directory is claude-code."""
    return f"agentkernel/agent-{'claude-code' if name == 'claude' else name}"


def agent_status(agent: Agent, environ: dict[str, str] | None = None) -> dict:
    env = os.environ if environ is None else environ
    path = shutil.which(agent.command)
    key = next((k for k in agent.keys if env.get(k)), None)
    return {"agent": agent.name, "name": agent.title, "installed": path is not None, "path": path,
            "api_key": key, "api_key_names": list(agent.keys), "install": agent.install}


def agent_spec(spec, agent: str, *, explicit_image: bool):
    """``create --agent NAME``: the agent's image when it has been built here (unless an image was
    given), else the spec unchanged."""
    if agent not in AGENTS:
        from .errors import ValidationError

        raise ValidationError(f"unknown agent {agent!r} (known: {', '.join(AGENTS)})")
    if explicit_image:
        return spec
    from .imagesel import image_present, image_store

    engine = image_store(spec.backend, spec.options)
    if engine and image_present(engine, agent_image(agent)):
        return spec.replace(image=agent_image(agent))
    return spec
