"""agentkernel.toml + environment variables + command-line flags -> one SandboxSpec.

Precedence, highest first: flags, environment variables, agentkernel.toml, the profile's defaults,
built-in defaults. The profile is chosen first (flag > AGENTKERNEL_PROFILE > [security] profile >
"moderate"); its values are the base that explicit settings from any source override.

The file is ``--config PATH``, else ``$AGENTKERNEL_CONFIG``, else ``./agentkernel.toml`` if present.
Unknown tables and keys are rejected with the known ones named (the reference silently ignored them).

Schema::

    [sandbox]   name, image, backend, hostname, workdir, options = {key = "value"},
                pull = "missing" | "always" | "never"
    [images]    registry, insecure_registries = [...], setuid = "strip" | "keep"   (docs/images.md)
    [build]     dockerfile, context, target, args = {K = "v"}, no_cache, tag, engine  (docs/images.md)
    [resources] vcpus, memory_mb, pids, disk_mb
    [security]  profile, network (true | false | "none" | "allowlist" | "open"), network_allow = [...],
                read_only, mount_cwd, pass_env = [...], user, seccomp
    [security.domains]  allow = [...], block = [...], allowlist_only   (egress rules: docs/network.md)
    [secrets]   NAME = {host = "api.example.com", header = "Authorization"}  (bind stored secrets to hosts)
    [env]       KEY = "value" ...
    [pool]      min, max, max_age_s, max_concurrent_starts, wait_s   (daemon pool defaults)
    [[pool.warm]] backend, image, profile, ..., min, max         (pools the daemon keeps warm)
    [daemon]    socket                 (the daemon's unix socket: the daemon, serve and the CLI's run/daemon
                                        commands of a process that read this file use it)
    [api]       tokens = ["name=token", ...], token_file   (HTTP API bearer tokens; also
                AGENTKERNEL_API_TOKENS / AGENTKERNEL_API_KEY / AGENTKERNEL_API_TOKEN_FILE),
                allowed_origins = [...], admins = [...], server_max_sandboxes, server_max_runs,
                and the remote callers' policy: backends, profiles, network, max_memory_mb, max_vcpus,
                max_pids, max_disk_mb, max_sandboxes, max_runs, max_batch  (api/policy.py)
    [[api.tenant]] name (a token's name) + the policy keys above, for that token only
                allow_sudo_exec (sudo on exec: refops.check_sudo)
    [orchestrator]  the kubernetes and nomad backends (the reference's keys; see orchestrator_settings)

The reference system's other keys are read too and mapped by refconfig.py: [sandbox] base_image/runtime,
[agent], [[files]], [security] mount_home / pass_env = true|false / seccomp names /
[security.commands], [network] vsock_cid, [api] api_key(_env).
Keys understood but not honoured here make resolve_spec fail closed with the reason.

Environment: AGENTKERNEL_BACKEND, AGENTKERNEL_IMAGE, AGENTKERNEL_PROFILE, AGENTKERNEL_CONFIG.
"""

from __future__ import annotations

import os

from .errors import ConfigError, ValidationError
from .resolvedspec import note
from .spec import Policy, Resources, SandboxSpec, profile_defaults

TYPE_CHECKING = False  # typing costs ~2 ms at start-up; annotations here are never evaluated
if TYPE_CHECKING:
    from typing import Any

CONFIG_FILENAME = "agentkernel.toml"

SCHEMA: dict[str, dict[str, str]] = {
    "sandbox": {"name": "str", "image": "str", "backend": "str", "hostname": "str", "workdir": "str",
                "options": "table", "pull": "str", "base_image": "str", "runtime": "str"},
    "images": {"registry": "str", "insecure_registries": "list", "setuid": "str"},
    "build": {"dockerfile": "str", "context": "str", "target": "str", "args": "table", "no_cache": "bool",
              "tag": "str", "engine": "str"},
    "resources": {"vcpus": "number", "memory_mb": "int", "pids": "int", "disk_mb": "int|unlimited"},
    "security": {"profile": "str", "network": "network", "network_allow": "list", "read_only": "bool",
                 "mount_cwd": "bool", "pass_env": "list|bool", "user": "str", "seccomp": "str", "domains": "domains",
                 "tls_intercept": "bool",
                 # the reference's keys (refconfig.py)
                 "mount_home": "bool", "commands": "any"},
    "secrets": {},  # NAME = {host = "h" | hosts = [...], header = "H"}; backend = "file" | "keyring" (egress.secrets)
    "env": {},  # free-form KEY = "value"
    "pool": {"min": "int", "max": "int", "max_age_s": "number", "max_concurrent_starts": "int",
             "wait_s": "number", "warm": "tables"},
    "daemon": {"socket": "str"},
    # the reference's tables (refconfig.py maps them onto the above, or refuses with the reason)
    "agent": {"preferred": "str", "compatibility_mode": "str"},
    "network": {"vsock_cid": "int"},
    "files": {},  # [[files]] source, dest, mode
    "api": {"tokens": "list", "token_file": "str", "allowed_origins": "list", "admins": "list",
            "server_max_sandboxes": "int", "server_max_runs": "int", "tenant": "tables",
            # the policy of remote callers (api/policy.py POLICY_KEYS)
            "backends": "list", "profiles": "list", "network": "bool", "max_memory_mb": "int", "max_vcpus": "number",
            "max_pids": "int", "max_disk_mb": "int", "max_sandboxes": "int", "max_runs": "int", "max_batch": "int",
            "network_modes": "list", "allow_hosts": "list", "secrets": "list",
            # the reference's keys (refconfig.py)
            "api_key": "str", "api_key_env": "str", "allow_sudo_exec": "bool"},
    "orchestrator": {},  # filled in by the [orchestrator] block below
}
_FREE_TABLES = ("env", "files")  # keys checked elsewhere (or free-form)

# keys of a [[pool.warm]] entry: which spec to keep warm, and its pool sizes
WARM_KEYS = {"backend", "image", "profile", "network", "read_only", "memory_mb", "vcpus", "pids", "disk_mb",
             "min", "max", "max_age_s", "wait_s"}
# keys of an [[api.tenant]] entry: a token name and its policy (api/policy.py TENANT_KEYS)
TENANT_KEYS = {"name", "backends", "profiles", "network", "max_memory_mb", "max_vcpus", "max_pids", "max_disk_mb",
               "max_sandboxes", "max_runs", "max_batch", "network_modes", "allow_hosts", "secrets"}
TABLE_KEYS = {("pool", "warm"): WARM_KEYS, ("api", "tenant"): TENANT_KEYS}

# [security] key -> Policy field
_SECURITY_FIELDS = {"network": "network", "network_allow": "network_allow", "read_only": "read_only_root",
                    "mount_cwd": "mount_cwd", "pass_env": "pass_env", "user": "user", "seccomp": "seccomp",
                    "tls_intercept": "tls_intercept"}


# spellings of the explicit opt-out of a limit (`--disk unlimited`, `disk_mb = "unlimited"`)
UNLIMITED = ("unlimited", "unbounded")

def find_config(explicit: str | None, cwd: str) -> str | None:
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"config file {explicit!r} does not exist")
        return explicit
    env = os.environ.get("AGENTKERNEL_CONFIG")
    if env:
        if not os.path.isfile(env):
            raise ConfigError(f"AGENTKERNEL_CONFIG points at {env!r}, which does not exist")
        return env
    path = os.path.join(cwd, CONFIG_FILENAME)
    found = os.path.isfile(path)
    note(("isfile", path, found))
    return path if found else None


def load_config(path: str | None) -> dict[str, dict[str, Any]]:
    """Parse and schema-check a config file (empty dict when path is None)."""
    if path is None:
        return {}
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
        note(("file", path, raw))  # its whole content: an edit in place within one mtime tick keeps the stamp
        data = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    from . import refconfig

    for table, body in data.items():
        if table not in SCHEMA:
            raise ConfigError(f"{path}: unknown table [{table}]{refconfig.nearest(table, SCHEMA)} "
                              f"(known: {', '.join('[' + t + ']' for t in SCHEMA)})")
        if table == "files":
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {table} must be a table")
        known = SCHEMA[table]
        for key, value in body.items():
            if table == "env":
                if not isinstance(value, str):
                    raise ConfigError(f"{path}: [env] {key} must be a string")
                continue
            if table == "secrets":
                from .egress.config import check_secret_table

                check_secret_table(path, key, value)
                continue
            if table in _FREE_TABLES:
                continue
            if key not in known:
                raise ConfigError(
                    f"{path}: unknown key {key!r} in [{table}]{refconfig.nearest(key, known)} "
                    f"(known keys: {', '.join(known)})"
                )
            _check_type(path, table, key, value, known[key])
    sock = data.get("daemon", {}).get("socket")
    if sock is not None:
        sock = os.path.expanduser(sock)
        if not os.path.isabs(sock) or len(sock) > 107:
            raise ConfigError(f"{path}: [daemon] socket must be an absolute path of at most 107 bytes "
                              f"(a unix socket), got {data['daemon']['socket']!r}")
        from . import paths

        paths.configure_daemon_socket(sock)
    return refconfig.normalize(data, path)


def _check_type(path: str, table: str, key: str, value: Any, kind: str) -> None:
    if kind in ("network", "domains"):
        from .egress.config import check_network_key

        check_network_key(path, key, value)
        return
    ok = {
        "any": True,
        "list|bool": isinstance(value, bool) or (isinstance(value, list)
                                                 and all(isinstance(v, str) for v in value)),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "int|unlimited": (isinstance(value, int) and not isinstance(value, bool)) or value in UNLIMITED,
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "table": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "tables": isinstance(value, list) and all(isinstance(v, dict) for v in value),
    }[kind]
    if ok and kind == "tables":
        allowed = TABLE_KEYS[(table, key)]
        for entry in value:
            bad = set(entry) - allowed
            if bad:
                raise ConfigError(f"{path}: unknown key {sorted(bad)[0]!r} in [[{table}.{key}]] "
                                  f"(known keys: {', '.join(sorted(allowed))})")
    if not ok:
        want = {"list|bool": "true, false or a list of strings",
                "tables": "a list of tables", "str": "a string", "bool": "true or false", "int": "an integer",
                "int|unlimited": 'an integer or "unlimited"',
                "number": "a number",
                "list": "a list of strings", "table": "a table of strings"}[kind]
        raise ConfigError(f"{path}: [{table}] {key} must be {want}, got {value!r}")


def _env_choice(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v else None


def _backend_choice(named: str | None) -> str:
    """An explicit backend as named; unset or ``auto``: the one auto picks on this host (cached)."""
    if named and named != "auto":
        return named
    from .backends.auto import resolve

    return resolve(default_spec_for)


def default_spec_for(backend: str) -> SandboxSpec:
    """The built-in default spec (default profile, full policy) on ``backend``: what ``auto`` checks."""
    return resolve_spec({"backend": backend}, config={}, environ={})


def resolve_spec(
    flags: dict[str, Any] | None = None,
    *,
    config: dict[str, dict[str, Any]] | None = None,
    environ: dict[str, str] | None = None,
) -> SandboxSpec:
    """Merge every source into one validated SandboxSpec.

    ``flags`` keys (all optional): name, image, backend, profile, network (bool), read_only (bool),
    mount_cwd (bool), memory_mb, vcpus, pids, disk_mb, env (dict), workdir, options (dict), user,
    seccomp. ``environ`` supplies pass_env values (default: os.environ).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    cfg = config or {}
    sb, res_cfg, sec = cfg.get("sandbox", {}), cfg.get("resources", {}), cfg.get("security", {})
    environ = os.environ if environ is None else environ

    profile = flags.get("profile") or _env_choice("AGENTKERNEL_PROFILE") or sec.get("profile") or "moderate"
    try:
        pol, res = profile_defaults(profile)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.get("_refused"):
        from .refconfig import check_honourable

        check_honourable(cfg, flags.get("backend") or sb.get("backend") or "podman")

    for key, field in _SECURITY_FIELDS.items():
        if key in sec:
            pol[field] = sec[key]
    if "domains" in sec or isinstance(sec.get("network"), str) or cfg.get("secrets"):
        from .egress.config import apply_config

        apply_config(pol, sec, cfg.get("secrets", {}))
    res.update({k: res_cfg[k] for k in ("vcpus", "memory_mb", "pids", "disk_mb") if k in res_cfg})
    if res.get("disk_mb") in UNLIMITED:  # the explicit opt-out of the profile's storage cap
        res["disk_mb"] = None

    for flag, field in (("network", "network"), ("read_only", "read_only_root"), ("mount_cwd", "mount_cwd"),
                        ("user", "user"), ("seccomp", "seccomp"), ("network_allow", "network_allow")):
        if flag in flags and not (flag == "network" and isinstance(flags[flag], str)):
            pol[field] = flags[flag]
    if flags.get("tls_intercept"):
        pol["tls_intercept"] = True
    if "_mode" in pol or pol.get("tls_intercept") or isinstance(flags.get("network"), str) or any(
            k in flags for k in ("allow_host", "block_host", "secret")):
        from .egress.config import apply_flags, finalize

        apply_flags(pol, flags)
        finalize(pol)
    for k in ("vcpus", "memory_mb", "pids", "disk_mb"):
        if k in flags:
            res[k] = flags[k] if flags[k] not in UNLIMITED else None

    env: dict[str, str] = {}
    for name in pol.get("pass_env", ()):
        if name in environ:
            env[name] = environ[name]
    env.update(cfg.get("env", {}))
    env.update(flags.get("env", {}))

    options = dict(sb.get("options", {}))
    options.update(flags.get("options", {}))

    values: dict[str, Any] = {
        "backend": _backend_choice(flags.get("backend") or _env_choice("AGENTKERNEL_BACKEND") or sb.get("backend")),
        "resources": res,
        "policy": pol,
        "env": env,
        "options": options,
    }
    image = flags.get("image") or _env_choice("AGENTKERNEL_IMAGE") or sb.get("image")
    if image:
        values["image"] = image
    for key in ("name", "workdir", "hostname"):
        v = flags.get(key) or sb.get(key)
        if v:
            values[key] = v
    try:
        return SandboxSpec(
            **{k: v for k, v in values.items() if k not in ("resources", "policy")},
            resources=Resources.from_dict(values["resources"], "[resources]"),
            policy=Policy.from_dict(values["policy"], "[security]"),
        )
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None


# ---- [orchestrator]: the kubernetes and nomad backends ------------------------------------------------
# The reference's keys (provider .. max_sandboxes) plus what a real cluster needs beyond them. Every key
# is also a backend option (``[sandbox] options`` / ``--option``), which wins over this table. Environment:
# NOMAD_ADDR, NOMAD_TOKEN, NOMAD_REGION, NOMAD_NAMESPACE, NOMAD_CACERT, NOMAD_CLIENT_CERT,
# NOMAD_CLIENT_KEY (as the nomad CLI reads them) override the file; KUBECONFIG is used when
# ``kubeconfig`` is not set (then in-cluster service-account credentials when running in a pod).
ORCHESTRATOR_KEYS: dict[str, str] = {
    "provider": "str",            # "kubernetes" or "nomad": the backend `--backend cluster` resolves to
    "namespace": "str",           # Kubernetes namespace / Nomad namespace ("agentkernel")
    "kubeconfig": "str",
    "context": "str",
    "runtime_class": "str",       # RuntimeClass for sandbox pods (gvisor, kata)
    "service_account": "str",     # service account of sandbox pods (its token is never mounted)
    "node_selector": "table",
    "tolerations": "list",        # "key=value:Effect", "key:Effect" or "key=value" (Effect NoSchedule)
    "pod_pids_limit": "int",      # the cluster's kubelet podPidsLimit, if it sets one (see docs)
    "ready_timeout_s": "number",  # bound on waiting for a pod / allocation to run (120)
    "nomad_addr": "str",
    "nomad_token": "str",
    "nomad_driver": "str",        # docker (default) or exec
    "nomad_datacenter": "str",
    "nomad_region": "str",
    "nomad_ca_cert": "str",
    "nomad_client_cert": "str",
    "nomad_client_key": "str",
    "warm_pool_size": "int",      # pre-created sandboxes per spec (0 = none)
    "max_pool_size": "int",
    "warm_pool_images": "list",
    "max_sandboxes": "int",       # cap on live sandboxes this backend manages in the namespace
    "seccomp_localhost_profile": "str",  # node-installed profile used for seccomp = "restrictive"
    "agent_sandbox": "str",       # auto (use the agent-sandbox CRDs when installed), on, off
    "cluster_cidrs": "list",      # pod/service/node ranges open-mode pods never reach (default: private ranges)
    "cluster_dns_namespace": "str",  # where the cluster resolver runs (kube-system)
    "cluster_dns_labels": "table",   # its pods' labels (k8s-app=kube-dns)
    "egress_gateway_image": "str",   # image with python3 >= 3.11 for per-sandbox egress gateways (allowlist, secrets)
    "egress_gateway_dns": "str",     # IPv4[:PORT] the gateways resolve names with (default: the pod's resolver)
    "egress_gateway_ca_file": "str",  # extra CA certificates (PEM) the gateways trust for their own TLS
    "egress_gateway_cpu": "str",     # the gateway pod's CPU limit (250m)
    "egress_gateway_memory": "str",  # its memory limit (64Mi)
}
SCHEMA["orchestrator"] = ORCHESTRATOR_KEYS

ORCHESTRATOR_DEFAULTS: dict[str, Any] = {
    "provider": "kubernetes", "namespace": "agentkernel", "nomad_addr": "http://127.0.0.1:4646",
    "nomad_driver": "docker", "nomad_datacenter": "dc1", "warm_pool_size": 0, "max_pool_size": 50,
    "max_sandboxes": 200, "ready_timeout_s": 120, "node_selector": {}, "tolerations": [],
    "warm_pool_images": [], "agent_sandbox": "auto",
}
_ORCHESTRATOR_ENV = {"NOMAD_ADDR": "nomad_addr", "NOMAD_TOKEN": "nomad_token", "NOMAD_REGION": "nomad_region",
                     "NOMAD_CACERT": "nomad_ca_cert", "NOMAD_CLIENT_CERT": "nomad_client_cert",
                     "NOMAD_CLIENT_KEY": "nomad_client_key"}


def orchestrator_settings(options: dict[str, str] | None = None, *, config: dict[str, Any] | None = None,
                          environ: dict[str, str] | None = None, backend: str = "kubernetes") -> dict[str, Any]:
    """The effective [orchestrator] settings: backend options > environment > file > defaults.
    ``config`` defaults to the file found from the current directory (or $AGENTKERNEL_CONFIG)."""
    environ = os.environ if environ is None else environ
    if config is None:
        config = load_config(find_config(None, os.getcwd()))
    out = dict(ORCHESTRATOR_DEFAULTS)
    out.update(config.get("orchestrator", {}))
    for var, key in _ORCHESTRATOR_ENV.items():
        if environ.get(var):
            out[key] = environ[var]
    if backend == "nomad" and environ.get("NOMAD_NAMESPACE"):
        out["namespace"] = environ["NOMAD_NAMESPACE"]
    for key, raw in (options or {}).items():
        kind = ORCHESTRATOR_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"unknown orchestrator option {key!r} (known: {', '.join(ORCHESTRATOR_KEYS)})")
        out[key] = _option_value(key, raw, kind)
    if out["provider"] not in ("kubernetes", "nomad"):
        raise ConfigError(f"[orchestrator] provider must be 'kubernetes' or 'nomad', got {out['provider']!r}")
    if out["nomad_driver"] not in ("docker", "exec"):
        raise ConfigError(f"[orchestrator] nomad_driver must be 'docker' or 'exec', got {out['nomad_driver']!r}",
                          hint="raw_exec runs commands unisolated on the client node; agentkernel refuses it")
    if out["agent_sandbox"] not in ("auto", "on", "off"):
        raise ConfigError(f"[orchestrator] agent_sandbox must be auto, on or off, got {out['agent_sandbox']!r}")
    for key in ("warm_pool_size", "max_pool_size", "max_sandboxes"):
        if int(out[key]) < 0:
            raise ConfigError(f"[orchestrator] {key} must be >= 0, got {out[key]}")
    if out.get("cluster_cidrs") is not None:
        import ipaddress

        for c in out["cluster_cidrs"]:
            try:
                ipaddress.ip_network(c)
            except ValueError as exc:
                raise ConfigError(f"[orchestrator] cluster_cidrs: invalid network {c!r}: {exc}") from None
    if out.get("egress_gateway_dns"):
        _check_ip_port("egress_gateway_dns", str(out["egress_gateway_dns"]))
    if out["warm_pool_size"] > out["max_pool_size"]:
        raise ConfigError(f"[orchestrator] warm_pool_size ({out['warm_pool_size']}) exceeds max_pool_size "
                          f"({out['max_pool_size']})")
    return out


def _check_ip_port(key: str, text: str) -> None:
    """IPv4[:PORT] (what the egress gateway's upstream resolver setting accepts)."""
    import ipaddress

    host, sep, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    try:
        ipaddress.IPv4Address(host)
        if sep and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid port {port!r}")
    except ValueError as exc:
        raise ConfigError(f"[orchestrator] {key} must be IPv4[:PORT], got {text!r} ({exc})") from None


def _option_value(key: str, raw: Any, kind: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if kind == "int":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        raise ConfigError(f"option {key} must be a number, got {raw!r}") from None
    if kind == "table":  # "k=v,k2=v2"
        pairs = [p.partition("=") for p in raw.split(",") if p]
        if any(not sep for _, sep, _ in pairs):
            raise ConfigError(f"option {key} must be key=value[,key=value...], got {raw!r}")
        return {k: v for k, _, v in pairs}
    if kind == "list":
        return [p for p in raw.split(",") if p]
    return raw
