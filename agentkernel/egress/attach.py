"""Attach a sandbox to the egress gateway (before its engine starts it) and detach it (after removal).

``attach(spec, sandbox_id)`` for network modes allowlist and open: leases an address, creates the
sandbox's network namespace and firewall (``netns``), registers its policy and secret bindings with
the gateway (a 0600 file in the runtime dir, keyed by the sandbox's address; the sandbox cannot see
it), makes sure the gateway runs, and returns what the engine needs: the namespace path, the resolver
address and the environment (proxy variables, secret placeholders). ``release(sandbox_id)`` logs what
the namespace's firewall refused to the audit log and removes all of it; it is cheap when there is
nothing (one stat), so every removal path calls it.
"""

from __future__ import annotations

import json
import os

from .. import audit
from . import netns

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..spec import SandboxSpec

PLACEHOLDER_PREFIX = "AGENTKERNEL_SECRET_PLACEHOLDER"


class Attachment:
    """``netns``: the namespace path to join (None when deferred: the engine makes the namespace and
    ``complete`` moves the network into it); ``resolv``: a resolv.conf naming the gateway."""

    __slots__ = ("binds", "dns", "env", "gateway", "ip", "netns", "resolv")

    def __init__(self, netns_path: str | None, ip: str, gateway: str, env: dict[str, str], resolv: str,
                 binds: list[tuple[str, str, bool]] | None = None) -> None:
        self.netns, self.ip, self.gateway, self.env, self.resolv = netns_path, ip, gateway, env, resolv
        self.dns = gateway
        self.binds = binds or []  # (host path, sandbox path, read-only): the interception CA

    def to_dict(self) -> dict[str, Any]:
        return {"netns": self.netns, "ip": self.ip, "gateway": self.gateway}


def needed(spec: SandboxSpec) -> bool:
    from ..spec import network_mode

    return network_mode(spec.policy) != "none"


def placeholder(name: str, sandbox_id: str) -> str:
    import hashlib

    return f"{PLACEHOLDER_PREFIX}_{name}_{hashlib.sha256(sandbox_id.encode()).hexdigest()[:12]}"


def _secret_entries(spec: SandboxSpec, sandbox_id: str) -> list[dict[str, Any]]:
    from . import secrets as store
    from .rules import parse_binding

    out = []
    values: dict[str, str] = {}
    for text in spec.policy.secrets:
        b = parse_binding(text)
        if b.name not in values:
            values[b.name] = store.get(b.name)  # NotFound names the missing secret
        out.append({"name": b.name, "host": b.host, "header": b.header,
                    "placeholder": placeholder(b.name, sandbox_id), "value": values[b.name]})
    return out


def attach(spec: SandboxSpec, sandbox_id: str, *, deferred: bool = False) -> Attachment:
    from ..spec import network_mode
    from . import gateway_ctl
    from .rules import ALWAYS_BLOCKED_V4, ALWAYS_BLOCKED_V6, Rules

    mode = network_mode(spec.policy)
    rules = Rules.from_lists(mode, spec.policy.network_allow, spec.policy.network_block)
    if mode == "open" or rules.networks("allow"):
        _check_forwarding()
    secrets = _secret_entries(spec, sandbox_id)
    with netns.in_use():  # gc never removes the bridge between these two steps
        net = netns.network()
        ip = netns.lease_ip(sandbox_id, net["subnet"])
    d = netns.state_dir()
    reg = {"id": sandbox_id, "name": spec.name, "ip": ip, "mode": mode, "allow": list(spec.policy.network_allow),
           "block": list(spec.policy.network_block), "secrets": secrets, "netns": netns.netns_path(sandbox_id)}
    binds: list[tuple[str, str, bool]] = []
    tls_env: dict[str, str] = {}
    if spec.policy.tls_intercept:
        from . import tls

        ca_pem, key_pem = tls.make_ca(sandbox_id, sorted({s["host"] for s in secrets}))
        reg["tls"] = {"ca": ca_pem, "key": key_pem}
        ca, bundle = tls.write_ca_files(os.path.join(d, "ca", netns.short_id(sandbox_id)), ca_pem)
        binds = [(ca, tls.CA_IN, True), (bundle, tls.BUNDLE_IN, True)]
        tls_env = tls.env()
    try:
        always = [*ALWAYS_BLOCKED_V4, *ALWAYS_BLOCKED_V6, *netns.host_blocked_nets_cached(), net["subnet"]]
        ruleset = netns.sandbox_ruleset(mode, net["gateway"], rules.networks("allow"),
                                        [str(e.net) for e in rules.networks("block")], always)
        path = None if deferred else netns.create_netns(sandbox_id, ip, net, ruleset)
        _write_private(os.path.join(d, "sb", f"{ip}.json"), json.dumps(reg))
        _write_private(os.path.join(d, "by-id", netns.short_id(sandbox_id)),
                       json.dumps({"id": sandbox_id, "ip": ip, "backend": spec.backend,
                                   "ruleset": ruleset if deferred else None}))
        resolv = os.path.join(d, "resolv", netns.short_id(sandbox_id))
        os.makedirs(os.path.dirname(resolv), mode=0o755, exist_ok=True)
        with open(resolv, "w") as f:
            f.write(f"nameserver {net['gateway']}\n")
        os.chmod(resolv, 0o644)
        gateway_ctl.ensure(net)
    except BaseException:
        release(sandbox_id, ip=ip)
        raise
    gw = net["gateway"]
    env: dict[str, str] = {}
    if mode == "allowlist" or secrets:
        proxy = f"http://{gw}:{netns.PROXY_PORT}"
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[k] = proxy
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    for s in secrets:
        env[s["name"]] = s["placeholder"]
    env.update(tls_env)
    audit.log("network.attach", id=sandbox_id, sandbox=spec.name or sandbox_id, mode=mode, ip=ip,
              allow=list(spec.policy.network_allow), block=list(spec.policy.network_block),
              secrets=sorted({s["name"] for s in secrets}))
    return Attachment(path, ip, gw, env, resolv, binds)


def is_deferred(sandbox_id: str) -> bool:
    from .. import paths

    try:
        with open(os.path.join(paths.runtime_dir(), "egress", "by-id", netns.short_id(sandbox_id))) as f:
            return bool(json.load(f).get("ruleset"))
    except (OSError, ValueError):
        return False


def complete(sandbox_id: str, pid: int, ready_file: str | None) -> None:
    """A deferred attachment: give the running (waiting) process ``pid``'s namespace its veth, address,
    route and firewall, then create ``ready_file`` so the sandbox's init goes on. Called after every
    start (a restarted container has a fresh namespace)."""
    from .. import paths

    idfile = os.path.join(paths.runtime_dir(), "egress", "by-id", netns.short_id(sandbox_id))
    with open(idfile) as f:
        info = json.load(f)
    _check_own_namespace(pid)
    netns.delete_netns(sandbox_id)
    netns.create_netns(sandbox_id, info["ip"], netns.network(), info["ruleset"], pid=pid)
    if ready_file:
        fd = os.open(ready_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        os.close(fd)


def _check_own_namespace(pid: int) -> None:
    """Refuse to wire a process that shares our network namespace: the sandbox's firewall and route would
    land in the host's namespace (a runtime that ignored the spec's empty namespace, e.g. runsc with
    --network=host and no network namespace in the spec, would otherwise be silently unconfined)."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat("/proc/self/ns/net")
    except OSError as exc:
        from ..errors import SandboxError

        raise SandboxError(f"cannot read the network namespace of the sandbox's process {pid}: {exc}") from None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        from ..errors import SandboxError

        raise SandboxError(f"the sandbox's process {pid} runs in the host's network namespace: refusing to attach "
                           "it to the egress network (its engine did not give it a namespace of its own)")


def _check_forwarding() -> None:
    """Routed destinations (open mode, CIDR entries) need the host to forward IPv4; we never turn that
    host-wide switch on ourselves."""
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            on = f.read().strip() == "1"
    except OSError:
        on = True
    if not on:
        from ..errors import BackendUnavailable

        raise BackendUnavailable("network mode open (and CIDR allow entries) need IPv4 forwarding on this host",
                                 hint="sysctl -w net.ipv4.ip_forward=1, or allow names only (allowlist)")


def _write_private(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def release(sandbox_id: str, ip: str | None = None) -> None:
    """Log the firewall's refusals, then remove the namespace, the registration and the lease."""
    from .. import paths

    base = os.path.join(paths.runtime_dir(), "egress")
    idfile = os.path.join(base, "by-id", netns.short_id(sandbox_id))
    name = None
    if ip is None:
        try:
            with open(idfile) as f:
                ip = json.load(f)["ip"]
        except (OSError, ValueError, KeyError):
            if not os.path.exists(netns.netns_path(sandbox_id)):
                return
    if ip:
        try:
            with open(os.path.join(base, "sb", f"{ip}.json")) as f:
                name = json.load(f).get("name")
        except (OSError, ValueError):
            pass
    try:
        for addr, port in netns.denied_in_netns(sandbox_id):
            audit.log("network.denied", id=sandbox_id, sandbox=name or sandbox_id, dest=addr, port=port,
                      via="firewall", rule="direct connection outside the gateway or to a blocked address")
    except Exception:
        pass
    netns.delete_netns(sandbox_id)
    resolv = os.path.join(base, "resolv", netns.short_id(sandbox_id))
    ca_dir = os.path.join(base, "ca", netns.short_id(sandbox_id))
    if os.path.isdir(ca_dir):
        import shutil

        shutil.rmtree(ca_dir, ignore_errors=True)
    for path in ([os.path.join(base, "sb", f"{ip}.json"), os.path.join(base, "leases", ip)] if ip else []) + [
            idfile, resolv]:
        try:
            os.unlink(path)
        except OSError:
            pass
