"""Network-mode and secret settings from agentkernel.toml and flags, folded into the policy fields.

Config keys (the reference's and ours)::

    [security]
    network = true | false | "none" | "allowlist" | "open"   # true = open, false = none
    [security.domains]
    allow = ["api.example.com", "*.pypi.example", "203.0.113.0/24:5432"]
    block = ["bad.example.com"]
    allowlist_only = true        # the reference's switch: same as network = "allowlist"
    [secrets]
    GITHUB_TOKEN = {host = "api.example.com", header = "Authorization"}   # or hosts = [...]

Flags: ``--network [MODE]``, ``--no-network``, ``--allow-host HOST[:PORT]``, ``--block-host HOST``,
``--secret NAME:HOST[:HEADER]``. A non-empty allow list means allowlist mode. Every inconsistency is
an error naming the keys involved; nothing is silently dropped.
"""

from __future__ import annotations

from ..errors import ConfigError, ValidationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_MODES = ("none", "allowlist", "open")
_DOMAIN_KEYS = ("allow", "block", "allowlist_only")


def check_network_key(path: str, key: str, value: Any) -> None:
    if key == "network":
        if isinstance(value, bool) or value in _MODES:
            return
        raise ConfigError(f"{path}: [security] network must be true, false, \"none\", \"allowlist\" or \"open\", "
                          f"got {value!r}")
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [security.domains] must be a table")
    for k, v in value.items():
        if k not in _DOMAIN_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} in [security.domains] "
                              f"(known keys: {', '.join(_DOMAIN_KEYS)})")
        if k == "allowlist_only":
            if not isinstance(v, bool):
                raise ConfigError(f"{path}: [security.domains] allowlist_only must be true or false, got {v!r}")
            continue
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ConfigError(f"{path}: [security.domains] {k} must be a list of strings")
        from .rules import parse_entries

        try:
            parse_entries(v, f"{path}: [security.domains] {k}")
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None


def check_secret_table(path: str, key: str, value: Any) -> None:
    if key == "backend":
        if value not in ("auto", "file", "keyring"):
            raise ConfigError(f"{path}: [secrets] backend must be \"auto\", \"file\" or \"keyring\", got {value!r}")
        return
    try:
        _bindings_of(key, value, f"{path}: [secrets] {key}")
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None


def _bindings_of(name: str, value: Any, label: str) -> list[str]:
    from .rules import parse_binding

    if not isinstance(value, dict):
        raise ValidationError(f"{label} must be a table like "
                              "{host = \"api.example.com\", header = \"Authorization\"}")
    bad = set(value) - {"host", "hosts", "header"}
    if bad:
        raise ValidationError(f"{label}: unknown key {sorted(bad)[0]!r} (known: host, hosts, header)")
    hosts = value.get("hosts", [])
    if "host" in value:
        hosts = [value["host"], *hosts]
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ValidationError(f"{label}: host must be a string and hosts a list of strings")
    if not hosts:
        raise ValidationError(f"{label}: secret {name} is bound to no host: set host = \"...\"")
    header = value.get("header")
    if header is not None and not isinstance(header, str):
        raise ValidationError(f"{label}: header must be a string")
    out = []
    for h in hosts:
        text = f"{name}:{h}" + (f":{header}" if header else "")
        parse_binding(text, label)
        out.append(text)
    return out


def apply_config(pol: dict[str, Any], sec: dict[str, Any], secrets: dict[str, Any]) -> None:
    net = sec.get("network")
    mode = None
    if isinstance(net, str):
        mode = net
        pol["network"] = net != "none"
    elif isinstance(net, bool):
        mode = "open" if net else "none"
    dom = sec.get("domains", {})
    if dom.get("allow"):
        pol["network_allow"] = list(dom["allow"])
    if dom.get("block"):
        pol["network_block"] = list(dom["block"])
    if dom.get("allowlist_only"):
        if mode in ("none", "open") and net is not None and not isinstance(net, bool):
            raise ConfigError(f"[security] network = {net!r} contradicts [security.domains] allowlist_only = true")
        mode = "allowlist"
    if mode == "none" and dom.get("allow"):
        raise ConfigError("[security] network = false contradicts [security.domains] allow (an allowlist needs "
                          "network): set network = \"allowlist\" or remove the allow list")
    if mode == "open" and dom.get("allow") and isinstance(net, str):
        raise ConfigError("[security] network = \"open\" with [security.domains] allow: open mode has no allowlist; "
                          "use network = \"allowlist\", or block = [...] to refuse some destinations")
    if mode is None and dom.get("allow"):
        mode = "allowlist"
    bindings: list[str] = []
    for name, value in secrets.items():
        if name != "backend":
            try:
                bindings += _bindings_of(name, value, f"[secrets] {name}")
            except ValidationError as exc:
                raise ConfigError(str(exc)) from None
    if bindings:
        pol["secrets"] = bindings
    pol["_mode"] = mode


def apply_flags(pol: dict[str, Any], flags: dict[str, Any]) -> None:
    mode = pol.get("_mode")
    net = flags.get("network")
    if isinstance(net, str):
        if net not in _MODES:
            raise ConfigError(f"invalid network mode {net!r} (choose none, allowlist or open)")
        mode = net
        pol["network"] = net != "none"
        if net != "allowlist":
            pol["network_allow"] = []
    elif isinstance(net, bool):
        mode = "open" if net else "none"
        if not net:
            pol["network_allow"] = []
    if flags.get("allow_host"):
        if mode in ("none", "open") and isinstance(net, str | bool):
            raise ConfigError(f"--allow-host contradicts --network {'none' if mode == 'none' else mode} "
                              "(--allow-host means allowlist mode)")
        pol["network_allow"] = [*pol.get("network_allow", ()), *flags["allow_host"]]
        mode = "allowlist"
    if flags.get("block_host"):
        pol["network_block"] = [*pol.get("network_block", ()), *flags["block_host"]]
    if flags.get("secret"):
        pol["secrets"] = [*pol.get("secrets", ()), *flags["secret"]]
    pol["_mode"] = mode


def finalize(pol: dict[str, Any]) -> None:
    """Make the fields agree with the requested mode, or raise naming the conflict."""
    mode = pol.pop("_mode", None)
    allow = list(pol.get("network_allow") or ())
    if mode == "allowlist":
        if not allow:
            raise ConfigError("network mode allowlist needs at least one allowed destination",
                              hint="--allow-host HOST[:PORT] or [security.domains] allow = [...]")
        pol["network"] = True
    elif mode == "none":
        pol["network"], pol["network_allow"] = False, []
    elif mode == "open":
        pol["network"], pol["network_allow"] = True, []
    if allow and mode not in ("none", "open"):
        pol["network"] = True
    secrets = list(pol.get("secrets") or ())
    if pol.get("tls_intercept") and not secrets:
        raise ConfigError("tls_intercept without a secret binding: only secret-bound hosts are ever intercepted",
                          hint="add --secret NAME:HOST, or drop --tls-intercept")
    if secrets:
        from .rules import Rules, parse_binding

        bindings = [parse_binding(t) for t in secrets]
        if not pol.get("network"):
            raise ConfigError("secrets need network (they are substituted by the egress gateway)",
                              hint="add --allow-host for each bound host, or --network open")
        rules = Rules.from_lists("allowlist" if pol.get("network_allow") else "open",
                                 pol.get("network_allow") or (), pol.get("network_block") or ())
        for b in bindings:
            ok, why = rules.decide_host(b.host, None)
            if not ok:
                raise ConfigError(f"secret {b.name} is bound to {b.host}, which this sandbox may not reach ({why})",
                                  hint=f"--allow-host {b.host}")
