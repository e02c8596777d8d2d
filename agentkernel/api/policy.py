"""What remote callers may ask for: the server-side policy of ``agentkernel serve`` and the MCP server.

A caller (one API token, or the local user over loopback when no token is configured) never gets more
than its ``CallerPolicy`` allows, whatever the request says:

- ``backends``: the backends it may name (default: every registered one);
- ``profiles``: the security profiles it may ask for (default ``moderate`` and ``restrictive``: never
  ``permissive``);
- ``network``: whether it may turn network access on (default false); ``network_modes``: exactly which
  modes (``none``, ``allowlist``, ``open``; default ``["none"]``, or all three with ``network = true``);
- ``allow_hosts``: the destinations its allowlists may name (entries as in ``[security.domains]``; a
  requested entry must be covered by one of them: the same or a narrower name, wildcard, network or
  port); unset: any;
- ``secrets``: the secret names it may bind (``NAME:HOST[:HEADER]`` bindings; default none). Values
  never travel over the API: the server's secret store holds them (``agentkernel secret set``);
- ``max_memory_mb``/``max_vcpus``/``max_pids``/``max_disk_mb``: the most it may get; a value the caller
  asks for above it is refused, an unlimited or larger value coming from a profile or the server's
  config is lowered to it;
- ``max_sandboxes``/``max_runs``/``max_batch``: live sandboxes, concurrent runs+execs, commands in one
  batch (beyond them: 429 with Retry-After).

Host mounts are never made on behalf of a remote caller: ``mount_cwd`` (the *server's* working
directory) is always off, and backend options that name host paths (wasm ``preopen``) are refused. The
server's token variables (``AGENTKERNEL_API_*``) are never passed into a sandbox through ``pass_env``.

Configured in agentkernel.toml::

    [api]
    tokens = [...]                 # or token_file = "/etc/agentkernel/tokens", or AGENTKERNEL_API_TOKENS
    allowed_origins = ["https://app.example"]   # browser origins allowed to change state
    admins = ["ops"]               # token names that see every tenant's /metrics
    backends = ["podman", "oci"]   # the default policy of every caller (keys as in [[api.tenant]])
    profiles = ["moderate", "restrictive"]
    network = false
    max_memory_mb = 2048
    max_sandboxes = 8
    server_max_sandboxes = 64      # the whole server: named sandboxes + one-shot runs in flight
    server_max_runs = 32           # the whole server: runs + execs in flight

    [[api.tenant]]                 # one token name's own policy (its token stays in the token source)
    name = "ci"
    profiles = ["moderate", "restrictive", "permissive"]
    network = true
    max_runs = 16

    [[api.tenant]]
    name = "agent"
    network_modes = ["none", "allowlist"]
    allow_hosts = ["*.pypi.example", "api.example.com:443"]
    secrets = ["API_TOKEN"]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError, NotPermitted
from ..spec import PROFILES

# [api] / [[api.tenant]] keys of a caller policy, with their config types (config.py checks them)
POLICY_KEYS: dict[str, str] = {
    "backends": "list", "profiles": "list", "network": "bool", "max_memory_mb": "int", "max_vcpus": "number",
    "max_pids": "int", "max_disk_mb": "int", "max_sandboxes": "int", "max_runs": "int", "max_batch": "int",
    "network_modes": "list", "allow_hosts": "list", "secrets": "list",
}
NETWORK_MODES = ("none", "allowlist", "open")
TENANT_KEYS = {"name", *POLICY_KEYS}

_RESOURCES = (("memory_mb", "max_memory_mb"), ("vcpus", "max_vcpus"), ("pids", "max_pids"), ("disk_mb", "max_disk_mb"))
HOST_PATH_OPTIONS = ("preopen",)  # backend options that hand a host path to the sandbox
SERVER_SECRET_PREFIX = "AGENTKERNEL_API_"  # the server's token variables: never passed into a sandbox


@dataclass(frozen=True)
class CallerPolicy:
    backends: frozenset[str] | None = None  # None: every registered backend
    profiles: frozenset[str] = frozenset({"moderate", "restrictive"})
    network: bool = False
    max_memory_mb: int | None = 2048
    max_vcpus: float | None = 2.0
    max_pids: int | None = 1024
    max_disk_mb: int | None = None
    max_sandboxes: int = 8
    max_runs: int = 8
    max_batch: int = 16
    network_modes: frozenset[str] | None = None  # None: from ``network`` (false: none only; true: all)
    allow_hosts: tuple[str, ...] | None = None  # None: any destination its modes allow
    secrets: frozenset[str] = frozenset()

    def modes(self) -> frozenset[str]:
        if self.network_modes is not None:
            return self.network_modes
        return frozenset(NETWORK_MODES) if self.network else frozenset({"none"})

    @classmethod
    def from_table(cls, table: dict[str, Any], source: str, base: CallerPolicy | None = None) -> CallerPolicy:
        base = base or cls()
        kw: dict[str, Any] = {}
        for key in POLICY_KEYS:
            if key not in table:
                continue
            v = table[key]
            if key == "backends":
                from ..backends import canonical, names

                bad = [b for b in v if canonical(b) not in names()]
                if bad:
                    raise ConfigError(f"{source}: unknown backend {bad[0]!r} in backends (known: {', '.join(names())})")
                v = frozenset(canonical(b) for b in v)
            elif key == "profiles":
                bad = [p for p in v if p not in PROFILES]
                if bad:
                    raise ConfigError(f"{source}: unknown profile {bad[0]!r} in profiles "
                                      f"(known: {', '.join(PROFILES)})")
                v = frozenset(v)
            elif key == "network_modes":
                bad = [m for m in v if m not in NETWORK_MODES]
                if bad:
                    raise ConfigError(f"{source}: unknown network mode {bad[0]!r} in network_modes "
                                      f"(known: {', '.join(NETWORK_MODES)})")
                v = frozenset(v)
            elif key == "allow_hosts":
                from ..egress.rules import parse_entries
                from ..errors import ValidationError

                try:
                    parse_entries(v, f"{source} allow_hosts")
                except ValidationError as exc:
                    raise ConfigError(str(exc)) from None
                v = tuple(v)
            elif key == "secrets":
                from .._model import is_env_name

                bad = [n for n in v if not is_env_name(n)]
                if bad:
                    raise ConfigError(f"{source}: invalid secret name {bad[0]!r} in secrets")
                v = frozenset(v)
            elif key != "network" and v is not None and v <= 0:
                raise ConfigError(f"{source}: {key} must be positive, got {v!r}")
            kw[key] = v
        return replace(base, **kw)

    # -- checks --
    def check_request(self, *, backend: str | None, profile: str | None, network: bool | None,
                      resources: dict[str, Any],
                      mode: str | None = None, allow: tuple[str, ...] = (), secrets: tuple[str, ...] = ()) -> None:
        """Refuse what the caller explicitly asked for beyond this policy (403, naming the limit).
        ``mode``/``allow``/``secrets``: the network mode, allowlist and secret bindings it asked for."""
        if backend is not None and self.backends is not None and backend not in self.backends:
            raise NotPermitted(f"backend {backend!r} is not allowed for this caller "
                               f"(allowed: {', '.join(sorted(self.backends)) or 'none'})")
        if profile is not None and profile not in self.profiles:
            raise NotPermitted(f"profile {profile!r} is not allowed for this caller "
                               f"(allowed: {', '.join(sorted(self.profiles))})")
        modes = self.modes()
        if mode not in (None, "none") and modes == {"none"}:
            raise NotPermitted("network access is not allowed for this caller")
        if mode is not None and mode not in modes:
            raise NotPermitted(f"network mode {mode!r} is not allowed for this caller "
                               f"(allowed: {', '.join(m for m in NETWORK_MODES if m in modes)})")
        if mode is None and network and not (modes - {"none"}):
            raise NotPermitted("network access is not allowed for this caller")
        if allow and self.allow_hosts is not None:
            from ..egress.rules import parse_entries

            mine = parse_entries(self.allow_hosts, "allow_hosts")
            for e in parse_entries(allow, "allow_hosts"):
                if not any(covers(p, e) for p in mine):
                    raise NotPermitted(f"allow_hosts: {e.text!r} is not within this caller's allowed destinations "
                                       f"({', '.join(self.allow_hosts) or 'none'})")
        for text in secrets:
            name = text.split(":", 1)[0]
            if name not in self.secrets:
                raise NotPermitted(f"secrets: this caller may not bind secret {name!r}"
                                   + (f" (allowed: {', '.join(sorted(self.secrets))})" if self.secrets else ""))
        for res, key in _RESOURCES:
            ceiling, asked = getattr(self, key), resources.get(res)
            if ceiling is not None and asked is not None and asked > ceiling:
                raise NotPermitted(f"{res} {asked} is above this caller's limit of {ceiling}")

    def confine(self, spec):
        """The spec a remote caller gets: no host mounts, network only if allowed, resources within the
        ceilings (an unlimited or larger value from a profile or the server's config is lowered)."""
        if any(k in spec.options for k in HOST_PATH_OPTIONS):
            raise NotPermitted(f"backend options {', '.join(k for k in HOST_PATH_OPTIONS if k in spec.options)} "
                               "hand host paths to the sandbox: not allowed for remote callers")
        pol = spec.policy.to_dict()
        pol["mount_cwd"] = False
        from ..spec import network_mode

        if network_mode(spec.policy) not in self.modes():  # a profile's or the server config's: lowered
            pol["network"] = False
            pol["network_allow"] = []
        # bindings from the server's config that this caller may not use are dropped
        pol["secrets"] = [b for b in pol.get("secrets") or () if b.split(":", 1)[0] in self.secrets]
        if not pol["network"]:
            pol["secrets"], pol["tls_intercept"] = [], False
        res = spec.resources.to_dict()
        for r, key in _RESOURCES:
            ceiling = getattr(self, key)
            if ceiling is not None and (res.get(r) is None or res[r] > ceiling):
                res[r] = ceiling
        # the server's own credentials never ride along on pass_env
        env = {k: v for k, v in spec.env.items() if not (k in pol["pass_env"] and k.startswith(SERVER_SECRET_PREFIX))}
        from ..spec import Policy, Resources

        return spec.replace(policy=Policy.from_dict(pol, "policy"), resources=Resources.from_dict(res, "resources"),
                            env=env)


def covers(mine: Any, asked: Any) -> bool:
    """Whether the policy entry ``mine`` allows everything the requested entry ``asked`` allows."""
    if asked.host is not None:
        if mine.host is None:
            return False
        if asked.wildcard:
            if not mine.wildcard or not (asked.host == mine.host or asked.host.endswith("." + mine.host)):
                return False
        elif not mine.matches_host(asked.host):
            return False
    else:
        if mine.net is None or asked.net.version != mine.net.version or not asked.net.subnet_of(mine.net):
            return False
    mp, ap = mine.ports(), asked.ports()
    return mp is None or (ap is not None and set(ap) <= set(mp))


@dataclass
class ServerPolicy:
    """Every caller's policy, the server-wide limits, the browser origins allowed to change state and the
    admin tenants (who see every tenant's metrics)."""

    default: CallerPolicy = field(default_factory=CallerPolicy)
    tenants: dict[str, CallerPolicy] = field(default_factory=dict)
    allowed_origins: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()
    server_max_sandboxes: int = 64
    server_max_runs: int = 32

    def for_tenant(self, tenant: str) -> CallerPolicy:
        return self.tenants.get(tenant, self.default)

    def is_admin(self, tenant: str) -> bool:
        return tenant in self.admins

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, token_tenants: set[str] | None = None,
                    admin_names: list[str] | None = None, local_tenant: str | None = None) -> ServerPolicy:
        api = cfg.get("api") or {}
        default = CallerPolicy.from_table(api, "[api]")
        tenants: dict[str, CallerPolicy] = {}
        for i, t in enumerate(api.get("tenant") or []):
            name = t.get("name")
            src = f"[[api.tenant]] #{i + 1}"
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{src}: needs name = \"<token name>\"")
            tenant = f"api:{name}"
            if token_tenants is not None and tenant not in token_tenants:
                raise ConfigError(f"{src}: no configured token is named {name!r}",
                                  hint="name tokens NAME=TOKEN in AGENTKERNEL_API_TOKENS or the token file")
            tenants[tenant] = CallerPolicy.from_table(t, src, default)
        origins = frozenset(o.rstrip("/").lower() for o in api.get("allowed_origins") or [])
        if "null" in origins:
            raise ConfigError("[api] allowed_origins: 'null' cannot be allowed (any sandboxed page sends it)")
        admins = {f"api:{n}" for n in [*(api.get("admins") or []), *(admin_names or [])]}
        if local_tenant:
            admins.add(local_tenant)
        out = cls(default=default, tenants=tenants, allowed_origins=origins, admins=frozenset(admins))
        for key in ("server_max_sandboxes", "server_max_runs"):
            if key in api:
                if api[key] <= 0:
                    raise ConfigError(f"[api] {key} must be positive, got {api[key]!r}")
                setattr(out, key, api[key])
        return out


def check_origin(origin: str | None, allowed: frozenset[str]) -> str | None:
    """None when a state-changing request with this Origin header may proceed, else why not. No header
    (curl, the SDKs, MCP clients) passes; ``null`` and every origin not listed are refused."""
    if origin is None:
        return None
    o = origin.strip().rstrip("/").lower()
    if o == "null":
        return "Origin: null is refused (sandboxed frames and data: pages send it)"
    if o in allowed:
        return None
    return f"origin {origin!r} is not allowed (configure [api] allowed_origins)"

