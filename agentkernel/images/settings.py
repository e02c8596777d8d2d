"""Image settings in one place: the pull policy, the registry for short names, insecure registries.

Precedence: command-line flag > environment > agentkernel.toml > default.

- pull policy: ``--pull`` > ``AGENTKERNEL_PULL`` > ``[sandbox] pull`` > ``missing``
- registry for short names (``python:3.12-alpine``) on the oci backend and for auto-selected public
  images on every backend: ``AGENTKERNEL_REGISTRY`` > ``[images] registry``; otherwise the oci backend
  uses the first of ``unqualified-search-registries`` in /etc/containers/registries.conf, and podman and
  docker resolve short names their own way.
- insecure registries (TLS not verified, or plain HTTP): ``AGENTKERNEL_INSECURE_REGISTRIES``
  (comma-separated) + ``[images] insecure_registries``. Nothing else is ever insecure: a self-signed
  registry is trusted by putting its CA in /etc/containers/certs.d/HOST:PORT/ca.crt (or
  /etc/docker/certs.d/), which podman, docker and agentkernel's own client all read.
- setuid/setgid bits in layers unpacked by the oci backend: ``[images] setuid = "strip" | "keep"``
  (default strip: sandboxes run with no_new_privs, so the bits could only matter outside one).
"""

from __future__ import annotations

import os

from ..errors import ConfigError

POLICIES = ("missing", "always", "never")
DEFAULT_POLICY = "missing"


def pull_policy(flag: str | None = None, config: dict | None = None) -> str:
    value = flag or os.environ.get("AGENTKERNEL_PULL") or ((config or {}).get("sandbox") or {}).get("pull")
    value = value or DEFAULT_POLICY
    if value not in POLICIES:
        raise ConfigError(f"pull policy {value!r} is not one of {', '.join(POLICIES)}")
    return value


def _images_table(config: dict | None) -> dict:
    return (config or {}).get("images") or {}


def configured_registry(config: dict | None = None) -> str | None:
    """The registry the user configured for short names (a mirror, or their own), if any."""
    return os.environ.get("AGENTKERNEL_REGISTRY") or _images_table(config).get("registry") or None


def registries_conf_search(path: str = "/etc/containers/registries.conf") -> list[str]:
    try:
        import tomllib

        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError):
        return []
    regs = data.get("unqualified-search-registries") or []
    return [r for r in regs if isinstance(r, str)]


def default_registry(config: dict | None = None) -> str | None:
    reg = configured_registry(config)
    if reg:
        return reg
    search = registries_conf_search()
    return search[0] if search else None


def insecure_registries(config: dict | None = None) -> set[str]:
    out = {h.strip() for h in os.environ.get("AGENTKERNEL_INSECURE_REGISTRIES", "").split(",") if h.strip()}
    out.update(h for h in _images_table(config).get("insecure_registries") or [] if isinstance(h, str))
    return out


def keep_setuid(config: dict | None = None) -> bool:
    v = _images_table(config).get("setuid", "strip")
    if v not in ("strip", "keep"):
        raise ConfigError(f"[images] setuid must be \"strip\" or \"keep\", got {v!r}")
    return v == "keep"


def load_user_config() -> dict:
    """agentkernel.toml as the CLI finds it (used by code paths that were not handed a config)."""
    from .. import config as cfgmod

    try:
        return cfgmod.load_config(cfgmod.find_config(None, os.getcwd()))
    except Exception:
        return {}
