"""Bearer-token authentication and per-token tenancy.

Tokens come from ``AGENTKERNEL_API_TOKENS`` (comma-separated; each ``NAME=TOKEN`` or a bare ``TOKEN``),
``AGENTKERNEL_API_KEY`` (one token, the reference system's variable), a token file (one token per
line, same forms, ``#`` comments: ``AGENTKERNEL_API_TOKEN_FILE`` or ``[api] token_file``) and
``[api] tokens`` in agentkernel.toml. Each token maps to a tenant: ``api:NAME`` for a named token, else
``api:`` plus a hash prefix of the token (the token itself is never stored or logged). A tenant sees
and touches only its own sandboxes (the store's tenant column); another tenant's sandbox is a 404.

Tokens are never kept where a sandbox can be pointed: a token file, or a config file holding
``[api] tokens``, inside the server's working directory (the directory ``mount_cwd`` binds) is refused
at start-up, and so is a token file that other users can read.

Without any token the server only accepts a loopback-only bind, and every request is the local user
(tenant ``local``, the same owner the CLI uses, so ``agentkernel create`` and the API see one list).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable

from ..errors import ConfigError

LOCAL_TENANT = "local"
MIN_TOKEN_LEN = 16


class Token:
    __slots__ = ("digest", "tenant")

    def __init__(self, token: str, name: str | None = None) -> None:
        self.digest = hashlib.sha256(token.encode()).digest()
        self.tenant = f"api:{name}" if name else "api:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenSet:
    def __init__(self, tokens: Iterable[Token] = ()) -> None:
        self.tokens = list(tokens)

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def tenant_for(self, presented: str | None) -> str | None:
        """The tenant of a presented token, or None. Constant time in the token's content: every
        configured token is compared (on digests, so lengths do not leak either)."""
        if presented is None:
            return None
        d = hashlib.sha256(presented.encode(errors="surrogateescape")).digest()
        found = None
        for t in self.tokens:
            if hmac.compare_digest(d, t.digest) and found is None:
                found = t.tenant
        return found


def parse_tokens(items: Iterable[str], source: str) -> list[Token]:
    out = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        name, sep, tok = item.partition("=")
        if not sep:
            name, tok = "", item
        name, tok = name.strip(), tok.strip()
        if name and not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{source}: token name {name!r} must be letters, digits, '-' or '_'")
        if len(tok) < MIN_TOKEN_LEN:
            raise ConfigError(f"{source}: a token must be at least {MIN_TOKEN_LEN} characters",
                              hint="python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        out.append(Token(tok, name or None))
    return out


def load_tokens(environ: dict[str, str] | None = None, config: dict | None = None, *,
                config_path: str | None = None, cwd: str | None = None) -> TokenSet:
    env = os.environ if environ is None else environ
    cwd = os.path.realpath(cwd or os.getcwd())
    tokens: list[Token] = []
    if env.get("AGENTKERNEL_API_TOKENS"):
        tokens += parse_tokens(env["AGENTKERNEL_API_TOKENS"].split(","), "AGENTKERNEL_API_TOKENS")
    if env.get("AGENTKERNEL_API_KEY"):
        tokens += parse_tokens([env["AGENTKERNEL_API_KEY"]], "AGENTKERNEL_API_KEY")
    api_cfg = (config or {}).get("api") or {}
    token_file = env.get("AGENTKERNEL_API_TOKEN_FILE") or api_cfg.get("token_file")
    if token_file:
        tokens += _read_token_file(token_file, cwd)
    if api_cfg.get("tokens"):
        if config_path is None or _inside(config_path, cwd):
            where = config_path or "the configuration"
            raise ConfigError(
                f"{where} holds [api] tokens and is inside the server's working directory {cwd}, which a "
                "sandbox can be given (mount_cwd): the tokens would be readable from inside sandboxes",
                hint="move them to a token file outside it ([api] token_file or AGENTKERNEL_API_TOKEN_FILE, "
                "mode 0600) or to AGENTKERNEL_API_TOKENS, or start the server from another directory")
        tokens += parse_tokens(api_cfg["tokens"], "agentkernel.toml [api] tokens")
    return TokenSet(tokens)


def _inside(path: str, directory: str) -> bool:
    p = os.path.realpath(path)
    return p == directory or p.startswith(directory.rstrip("/") + "/")


def _read_token_file(path: str, cwd: str) -> list[Token]:
    if _inside(path, cwd):
        raise ConfigError(f"token file {path} is inside the server's working directory {cwd}, which a sandbox "
                          "can be given (mount_cwd)", hint="keep it elsewhere, e.g. /etc/agentkernel/tokens")
    try:
        st = os.stat(path)
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot read: {exc.strerror}") from None
    if st.st_mode & 0o007:
        raise ConfigError(f"token file {path} is accessible to other users (mode {st.st_mode & 0o777:o})",
                          hint=f"chmod 600 {path}")
    return parse_tokens([ln for ln in lines if not ln.lstrip().startswith("#")], f"token file {path}")


def admin_names(environ: dict[str, str] | None = None) -> list[str]:
    """Token names from ``AGENTKERNEL_API_ADMINS`` (comma-separated) that see the whole server's metrics
    (``[api] admins`` in the config file too)."""
    env = os.environ if environ is None else environ
    return [n.strip() for n in (env.get("AGENTKERNEL_API_ADMINS") or "").split(",") if n.strip()]


def tenants(tokens: TokenSet) -> set[str]:
    return {t.tenant for t in tokens.tokens}


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: TokenSet) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not is_loopback(host) and not tokens:
        raise ConfigError(
            f"refusing to listen on {host}: no API token is configured, and only a loopback bind "
            "(127.0.0.1, ::1) may run without one",
            hint="set AGENTKERNEL_API_TOKENS=name=<token>[,...] (or AGENTKERNEL_API_KEY), or bind 127.0.0.1",
        )


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
