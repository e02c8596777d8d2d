"""Registry credentials from where users already keep them.

Looked up in order (first file that has the registry wins), as podman and docker do:
``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``. An entry is ``auths.HOST.auth`` (base64
``user:password``) or a credential helper (``credHelpers.HOST`` / ``credsStore``: ``docker-credential-NAME
get``). Credentials are only ever sent to the registry they are stored for.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


def auth_files() -> list[str]:
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    elif os.geteuid() == 0:
        out.append("/run/containers/0/auth.json")
    home = os.path.expanduser("~")
    out.append(os.path.join(home, ".config", "containers", "auth.json"))
    if os.environ.get("DOCKER_CONFIG"):
        out.append(os.path.join(os.environ["DOCKER_CONFIG"], "config.json"))
    out.append(os.path.join(home, ".docker", "config.json"))
    return out


def _keys_for(registry: str) -> list[str]:
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/"]


def _helper(name: str, registry: str) -> tuple[str, str] | None:
    try:
        r = subprocess.run([f"docker-credential-{name}", "get"], input=registry, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        d = json.loads(r.stdout)
        return d["Username"], d["Secret"]
    except (ValueError, KeyError, TypeError):
        return None


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` (``host[:port]``), or None."""
    for _, data in _auth_configs():
        auths = data.get("auths") or {}
        for key in _keys_for(registry):
            ent = auths.get(key)
            if isinstance(ent, dict) and ent.get("auth"):
                try:
                    user, _, pw = base64.b64decode(ent["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    continue
                return user, pw
            if isinstance(ent, dict) and ent.get("username"):
                return ent["username"], ent.get("password", "")
        helper = (data.get("credHelpers") or {}).get(registry) or (data.get("credsStore") if registry in auths
                                                                   or not auths else None)
        if helper:
            got = _helper(helper, registry)
            if got:
                return got
    return None


def first_auth_file_with(registry: str) -> str | None:
    """The auth file that holds ``registry``'s credentials (handed to podman with --authfile)."""
    for path, data in _auth_configs():
        if any(k in (data.get("auths") or {}) for k in _keys_for(registry)):
            return path
    return None


def _auth_configs() -> Iterator[tuple[str, dict]]:
    """(path, content) of each readable auth file holding a JSON object, in ``auth_files`` order."""
    for path in auth_files():
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield path, data
