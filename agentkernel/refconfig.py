"""The reference system's ``agentkernel.toml`` keys, read and mapped onto ours (see docs/migrating.md).

``config.load_config`` checks types; ``normalize`` (called by it) then turns every reference key into
what it means here, and ``refusals`` (called by ``config.resolve_spec``) lists the keys this build
understands but cannot honour, so that creating a sandbox from such a file fails closed with the reason
instead of silently running something weaker. Purely cosmetic keys warn once per file.

Standard library only: imported on the CLI's hot path when an agentkernel.toml is present.
"""

from __future__ import annotations

import os
import sys

from .errors import ConfigError, PolicyNotEnforceable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AGENTS = ("claude", "codex", "gemini", "opencode")
COMPAT_MODES = ("native", "claude", "claude-code", "codex", "gemini", "opencode")

# [sandbox] runtime -> image (the reference's runtime map). "base" is our default image.
RUNTIME_IMAGES = {
    "python": "python:3.12-alpine", "node": "node:22-alpine", "go": "golang:1.23-alpine",
    "rust": "rust:1.85-alpine", "ruby": "ruby:3.3-alpine", "java": "eclipse-temurin:21-alpine",
    "c": "gcc:14-bookworm", "dotnet": "mcr.microsoft.com/dotnet/sdk:8.0",
}

# [security] seccomp names of the reference -> ours. "moderate" and "ai-agent" are the engine default
# filter with every capability dropped (see agentkernel/seccomp.py).
SECCOMP_NAMES = {"default": "default", "moderate": "default", "ai-agent": "default", "restrictive": "restrictive"}

# pass_env = true: the reference's list minus PATH and HOME, which would break the image's own.
PASS_ENV_TRUE = ("USER", "LANG", "LC_ALL", "TERM")

# Sub-table keys (type-checked here; config.SCHEMA marks these keys "any").
SUBKEYS = {
    "security.commands": {"allow": "list", "block": "list", "allowlist_only": "bool"},
    "files": {"source": "str", "dest": "str", "mode": "mode"},
}


def nearest(word: str, known) -> str:
    """' (did you mean X?)' for the closest known key, or ''."""
    import difflib

    m = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "table":
        return isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values())
    if kind == "mode":
        return isinstance(value, str | int) and not isinstance(value, bool)
    raise AssertionError(kind)


def _check_table(path: str, where: str, body: Any) -> None:
    known = SUBKEYS[where]
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: [{where}] must be a table")
    for key, value in body.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} in [{where}]{nearest(key, known)} "
                              f"(known keys: {', '.join(known)})")
        if not _kind_ok(value, known[key]):
            raise ConfigError(f"{path}: [{where}] {key} has the wrong type: {value!r}")


def _mode(path: str, value: str | int) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(f"{path}: [[files]] mode must be an octal string such as \"0644\", got {value!r}") from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{path}: [[files]] mode {value!r} is out of range")
    return mode


def normalize(data: dict[str, Any], path: str) -> dict[str, Any]:
    """Reference keys -> ours, in place. Records what cannot be honoured in ``data['_refused']``."""
    from .spec import check_sandbox_path

    refused: list[str] = []
    base = os.path.dirname(os.path.abspath(path))
    sb = data.get("sandbox") or {}
    sec = data.get("security") or {}

    # [sandbox] base_image / runtime -> image ([build], images/dockerbuild.py, wins when present)
    if "base_image" in sb:
        img = sb.pop("base_image")
        if sb.get("image") not in (None, img):
            raise ConfigError(f"{path}: [sandbox] sets both image and base_image ({sb['image']!r} vs {img!r})")
        sb["image"] = img
    if "runtime" in sb:
        rt = sb.pop("runtime")
        if rt != "base" and rt not in RUNTIME_IMAGES:
            raise ConfigError(f"{path}: [sandbox] runtime {rt!r} is unknown{nearest(rt, ['base', *RUNTIME_IMAGES])} "
                              f"(known: base, {', '.join(RUNTIME_IMAGES)})")
        if rt != "base" and "image" not in sb:
            sb["image"] = RUNTIME_IMAGES[rt]

    # [agent]
    agent = data.get("agent") or {}
    pref = agent.get("preferred")
    if pref is not None and pref not in AGENTS:
        raise ConfigError(f"{path}: [agent] preferred {pref!r} is unknown{nearest(pref, AGENTS)} "
                          f"(known: {', '.join(AGENTS)})")
    mode = agent.get("compatibility_mode")
    if mode is not None:
        if mode not in COMPAT_MODES:
            raise ConfigError(f"{path}: [agent] compatibility_mode {mode!r} is unknown{nearest(mode, COMPAT_MODES)} "
                              f"(known: {', '.join(COMPAT_MODES)})")
        if mode != "native" and "seccomp" not in sec:
            sec["seccomp"] = "ai-agent"  # the reference's agent profile filter; network stays as configured

    # [security]
    if "pass_env" in sec and isinstance(sec["pass_env"], bool):
        sec["pass_env"] = list(PASS_ENV_TRUE) if sec["pass_env"] else []
    if "seccomp" in sec:
        name = sec["seccomp"]
        if name in SECCOMP_NAMES:
            sec["seccomp"] = SECCOMP_NAMES[name]
        elif "/" in name or name.endswith(".json"):
            refused.append(f"[security] seccomp = {name!r}: custom seccomp profile files are not supported "
                           "(use 'default', 'moderate', 'ai-agent' or 'restrictive')")
            sec.pop("seccomp")
        else:
            raise ConfigError(f"{path}: [security] seccomp {name!r} is unknown{nearest(name, SECCOMP_NAMES)} "
                              f"(known: {', '.join(SECCOMP_NAMES)}, or a path to a JSON profile)")
    if sec.pop("mount_home", False):
        refused.append("[security] mount_home = true: the host home directory (with its credentials) is never "
                       "mounted; copy what the sandbox needs in with [[files]]")
    if "commands" in sec:
        _check_table(path, "security.commands", sec["commands"])
    commands = sec.pop("commands", None) or {}
    if commands.get("allow") or commands.get("block"):
        refused.append("[security.commands]: filtering commands by name is not a security boundary "
                       "(`sh -c` or a renamed binary bypasses it), so it is not offered; use "
                       "profile = \"restrictive\" or read_only = true")

    # [network] vsock_cid: cosmetic here (every microVM gets its own CID)
    net = data.pop("network", None) or {}
    if "vsock_cid" in net:
        _warn_once(path, "network.vsock_cid", "[network] vsock_cid is ignored: each microVM is given its own CID")

    # [[files]]
    files = data.get("files")
    if files is not None:
        if not isinstance(files, list):
            raise ConfigError(f"{path}: files must be an array of tables: [[files]]")
        out = []
        for entry in files:
            _check_table(path, "files", entry)
            if "source" not in entry or "dest" not in entry:
                raise ConfigError(f"{path}: every [[files]] entry needs source and dest")
            src = os.path.join(base, entry["source"])
            if not os.path.isfile(src):
                raise ConfigError(f"{path}: [[files]] source {entry['source']!r} is not a file ({src})")
            try:
                check_sandbox_path(entry["dest"])
            except Exception as exc:
                raise ConfigError(f"{path}: [[files]] dest: {exc}") from None
            out.append({"source": src, "dest": entry["dest"], "mode": _mode(path, entry.get("mode", "0644"))})
        data["files"] = out

    # tables other parts give meaning to
    api = data.get("api") or {}
    key = api.pop("api_key", None)
    key_env = api.pop("api_key_env", None)
    if key_env and os.environ.get(key_env):
        key = os.environ[key_env]
    if key:
        api["tokens"] = [*api.get("tokens", []), key]
    if refused:
        data["_refused"] = refused
    return data


def refusals(cfg: dict[str, Any]) -> list[str]:
    return list(cfg.get("_refused", ()))


def check_honourable(cfg: dict[str, Any], backend: str) -> None:
    """Fail closed when the file asks for something this build cannot honour."""
    bad = refusals(cfg)
    if bad:
        raise PolicyNotEnforceable(
            f"agentkernel.toml asks for what backend {backend!r} cannot honour: " + "; ".join(bad),
            hint="remove or change those keys (docs/migrating.md lists every reference key)")


def _warn_once(path: str, key: str, message: str) -> None:
    """Print a warning the first time this file's key is seen (a marker under the state directory)."""
    import hashlib

    from . import paths

    digest = hashlib.sha256(f"{os.path.abspath(path)}\0{key}".encode()).hexdigest()[:16]
    d = os.path.join(paths.data_dir(), "warned")
    marker = os.path.join(d, digest)
    if os.path.exists(marker):
        return
    sys.stderr.write(f"agentkernel: warning: {path}: {message}\n")
    try:
        os.makedirs(d, exist_ok=True)
        open(marker, "w").close()
    except OSError:
        pass
