"""Host-side network plumbing: the egress bridge, one network namespace per sandbox, its firewall.

Layout (one per runtime dir, i.e. per host installation)::

    root netns:  bridge akeg<h> = GW/20 (the egress gateway listens only there)
                 table inet agentkernel_egress_<h>: input from the bridge only to the gateway's ports,
                 forward bridge->bridge dropped; table ip agentkernel_egress_<h>: masquerade for the subnet
    sandbox:     netns ak-<id> (/run/netns), veth eth0 = 10.x.y.z/20, default route via GW,
                 bridge port isolated (no sandbox-to-sandbox frames),
                 table inet agentkernel (inside the netns): output only to the gateway's ports (and, in
                 open mode / for CIDR entries, routed destinations that are not always-blocked); denied
                 destinations are remembered in a dynamic set and logged at teardown.

The sandbox's processes have no capabilities in that namespace's owning user namespace, so they cannot
change its addresses, routes or rules. Everything we create carries our own names; nothing host-wide
is flushed or rewritten.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess

from .. import paths
from ..errors import BackendUnavailable, SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROXY_PORT = 3128
DNS_PORT = 53
GATEWAY_TCP_PORTS = (PROXY_PORT, 80, 443)
NETNS_DIR = "/run/netns"


def state_dir() -> str:
    d = os.path.join(paths.runtime_dir(), "egress")
    for sub in ("", "leases", "sb", "by-id"):
        os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
    return d


def _tag() -> str:
    return hashlib.sha256(os.path.realpath(paths.runtime_dir()).encode()).hexdigest()[:6]


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BackendUnavailable(f"{argv[0]} is not installed (needed for sandbox networking)",
                                 hint="apt-get install -y iproute2 nftables") from None
    if check and r.returncode != 0:
        raise SandboxError(f"network setup failed: {' '.join(argv[:4])}...: {r.stderr.strip()[-400:]}")
    return r


def host_interfaces() -> list[dict[str, Any]]:
    return json.loads(_run(["ip", "-j", "-d", "addr", "show"]).stdout or "[]")


HOST_NETS_TTL = 10.0  # seconds a computed host address list is reused by attach (one `ip` call saved)


def host_blocked_nets_cached() -> list[str]:
    import time

    path = os.path.join(state_dir(), "hostnets.json")
    try:
        if time.time() - os.stat(path).st_mtime < HOST_NETS_TTL:
            with open(path) as f:
                return json.load(f)
    except (OSError, ValueError):
        pass
    nets = host_blocked_nets()
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(nets, f)
    os.replace(tmp, path)
    return nets


def host_blocked_nets(ifaces: list[dict[str, Any]] | None = None) -> list[str]:
    """The host's own addresses (every interface) and the subnets of its bridges (other container
    networks, our egress bridge): never reachable from a sandbox."""
    out: list[str] = []
    for ifc in ifaces if ifaces is not None else host_interfaces():
        kind = ((ifc.get("linkinfo") or {}).get("info_kind")) or ""
        for a in ifc.get("addr_info", []):
            local = a.get("local")
            if not local:
                continue
            fam = a.get("family")
            out.append(f"{local}/{32 if fam == 'inet' else 128}")
            if kind == "bridge" and a.get("prefixlen") is not None:
                import ipaddress

                out.append(str(ipaddress.ip_network(f"{local}/{a['prefixlen']}", strict=False)))
    return sorted(set(out))


# ---- the bridge (once per installation) ----------------------------------------------------------------


def network() -> dict[str, Any]:
    """The egress bridge's name, subnet and gateway address, creating the bridge on first use."""
    import fcntl

    d = state_dir()
    path = os.path.join(d, "net.json")
    with open(os.path.join(d, "net.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                net = json.load(f)
        except (OSError, ValueError):
            net = None
        if net is not None and os.path.exists(f"/sys/class/net/{net['bridge']}"):
            return net
        net = _create_bridge(net)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(net, f)
        os.replace(tmp, path)
        return net


def _pick_subnet(ifaces: list[dict[str, Any]]) -> str:
    """A free /20 in 10.240.0.0/12, chosen from the runtime dir's hash, skipping subnets in use."""
    import ipaddress

    used = []
    for ifc in ifaces:
        for a in ifc.get("addr_info", []):
            if a.get("family") == "inet":
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for line in _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        dst = line.split()[0] if line.split() else ""
        if dst and dst[0].isdigit():
            try:
                used.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
            except ValueError:
                pass
    start = int(_tag(), 16) % 256
    for i in range(256):
        n = (start + i) % 256
        cand = ipaddress.ip_network(f"10.{240 + n // 16}.{(n % 16) * 16}.0/20")
        if not any(cand.overlaps(u) for u in used):
            return str(cand)
    raise SandboxError("no free /20 in 10.240.0.0/12 for the egress bridge")


def _create_bridge(old: dict[str, Any] | None) -> dict[str, Any]:
    import ipaddress

    ifaces = host_interfaces()
    tag = _tag()
    bridge = f"akeg{tag}"
    subnet = old["subnet"] if old else _pick_subnet(ifaces)
    net = ipaddress.ip_network(subnet)
    gw = str(net.network_address + 1)
    if not os.path.exists(f"/sys/class/net/{bridge}"):
        _run(["ip", "link", "add", bridge, "type", "bridge"])
    _run(["ip", "-batch", "-"], stdin=f"addr replace {gw}/{net.prefixlen} dev {bridge}\n"
                                       f"link set {bridge} up\n")
    _run(["nft", "-f", "-"], stdin=host_ruleset(tag, bridge, subnet, gw))
    out = {"bridge": bridge, "subnet": subnet, "gateway": gw, "tag": tag}
    register_installation(out)
    return out


def host_ruleset(tag: str, bridge: str, subnet: str, gw: str) -> str:
    t = f"agentkernel_egress_{tag}"
    tcp = ", ".join(str(p) for p in GATEWAY_TCP_PORTS)
    return f"""
table ip {t}
delete table ip {t}
table ip {t} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != "{bridge}" masquerade
  }}
}}
table inet {t}
delete table inet {t}
table inet {t} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{bridge}" ct state established,related accept
    iifname "{bridge}" ip daddr {gw} tcp dport {{ {tcp} }} accept
    iifname "{bridge}" ip daddr {gw} udp dport {DNS_PORT} accept
    iifname "{bridge}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{bridge}" oifname "{bridge}" drop
  }}
}}
"""


def remove_bridge() -> None:
    """Tear the bridge and our host tables down (tests and `gc --network`)."""
    path = os.path.join(state_dir(), "net.json")
    try:
        with open(path) as f:
            net = json.load(f)
    except (OSError, ValueError):
        return
    _run(["ip", "link", "del", net["bridge"]], check=False)
    t = f"agentkernel_egress_{net['tag']}"
    _run(["nft", "delete", "table", "ip", t], check=False)
    _run(["nft", "delete", "table", "inet", t], check=False)
    os.unlink(path)
    try:
        os.unlink(os.path.join(INSTALLATIONS, f"{net['tag']}.json"))
    except OSError:
        pass


INSTALLATIONS = "/run/agentkernel-egress"  # host-wide: one file per installation's bridge


def register_installation(net: dict) -> None:
    """Remember which runtime dir a bridge belongs to, so a gc elsewhere can tell when it is orphaned."""
    os.makedirs(INSTALLATIONS, mode=0o700, exist_ok=True)
    path = os.path.join(INSTALLATIONS, f"{net['tag']}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"tag": net["tag"], "bridge": net["bridge"], "runtime_dir": os.path.realpath(paths.runtime_dir())},
                  f)
    os.replace(tmp, path)


class Use:
    """``use.lock``: attach holds it shared while it makes sure of the bridge and leases an address; the
    sweep takes it exclusively (without waiting) before removing the bridge."""

    def __init__(self, exclusive: bool) -> None:
        self.exclusive, self.fd = exclusive, -1

    def __enter__(self) -> bool:
        self.fd = os.open(os.path.join(state_dir(), "use.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if self.exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def in_use() -> Use:
    return Use(exclusive=False)


# ---- per sandbox ------------------------------------------------------------------------------------


def short_id(sandbox_id: str) -> str:
    prefix, _, suffix = sandbox_id.rpartition("-")
    s = suffix if prefix and len(suffix) == 10 else hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]
    return s


def netns_name(sandbox_id: str) -> str:
    return f"ak-{short_id(sandbox_id)}"


def netns_path(sandbox_id: str) -> str:
    return os.path.join(NETNS_DIR, netns_name(sandbox_id))


def lease_ip(sandbox_id: str, subnet: str) -> str:
    import ipaddress
    import secrets

    net = ipaddress.ip_network(subnet)
    d = os.path.join(state_dir(), "leases")
    size = net.num_addresses - 3  # network, gateway, broadcast
    start = secrets.randbelow(size)
    for i in range(size):
        ip = str(net.network_address + 2 + (start + i) % size)
        try:
            fd = os.open(os.path.join(d, ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.write(fd, sandbox_id.encode())
        os.close(fd)
        return ip
    raise SandboxError(f"no free address left in the egress subnet {subnet}")


def sandbox_ruleset(mode: str, gw: str, allow_nets: list[Any], block_nets: list[str], always: list[str]) -> str:
    """The firewall inside a sandbox's namespace. ``allow_nets``: Entry objects with a network (CIDR
    entries of the allowlist); ``block_nets``/``always``: networks always dropped."""
    tcp = ", ".join(str(p) for p in GATEWAY_TCP_PORTS)
    v4 = [n for n in (*always, *block_nets) if ":" not in n]
    v6 = [n for n in (*always, *block_nets) if ":" in n]
    lines = [
        "table inet agentkernel {",
        "  set denied4 { type ipv4_addr . inet_service; flags dynamic; size 4096; }",
        "  set denied6 { type ipv6_addr . inet_service; flags dynamic; size 4096; }",
        f"  set blocked4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {', '.join(v4)} }} }}",
    ]
    if v6:
        lines.append("  set blocked6 { type ipv6_addr; flags interval; auto-merge; "
                     f"elements = {{ {', '.join(v6)} }} }}")
    lines += [
        "  chain output {",
        "    type filter hook output priority filter; policy drop;",
        "    oif lo accept",
        "    ct state established,related accept",
        f"    ip daddr {gw} tcp dport {{ {tcp} }} accept",
        f"    ip daddr {gw} udp dport {DNS_PORT} accept",
        "    ip daddr @blocked4 goto deny",
    ]
    if v6:
        lines.append("    ip6 daddr @blocked6 goto deny")
    if mode == "open":
        lines.append("    meta nfproto ipv4 accept")
    else:
        for e in allow_nets:
            fam = "ip" if e.net.version == 4 else "ip6"
            if e.port is None:
                lines.append(f"    {fam} daddr {e.net} accept")
            else:
                lines.append(f"    {fam} daddr {e.net} meta l4proto {{ tcp, udp }} th dport {e.port} accept")
    lines += [
        "    goto deny",
        "  }",
        "  chain deny {",
        "    meta nfproto ipv4 meta l4proto { tcp, udp } add @denied4 { ip daddr . th dport }",
        "    meta nfproto ipv6 meta l4proto { tcp, udp } add @denied6 { ip6 daddr . th dport }",
        "    meta l4proto tcp reject with tcp reset",
        "    reject with icmpx type admin-prohibited",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def create_netns(sandbox_id: str, ip: str, net: dict[str, Any], ruleset: str, pid: int | None = None) -> str:
    """The sandbox's namespace with its veth, address, route and firewall; returns its path. With
    ``pid``: the namespace of that (already running, still waiting) process, named the same way."""
    import ipaddress

    name = netns_name(sandbox_id)
    veth = f"akv{short_id(sandbox_id)}"
    prefix = ipaddress.ip_network(net["subnet"]).prefixlen
    ns_line = f"netns add {name}\n" if pid is None else f"netns attach {name} {pid}\n"
    try:
        _run(["ip", "-batch", "-"], stdin=(
            ns_line +
            f"link add {veth} type veth peer name eth0 netns {name}\n"
            f"link set {veth} master {net['bridge']}\n"
            f"link set {veth} type bridge_slave isolated on learning off\n"
            f"link set {veth} up\n"))
        # the firewall first, then the address and route: there is never a moment with a route and no rules
        _run(["nsenter", f"--net={NETNS_DIR}/{name}", "nft", "-f", "-"], stdin=ruleset)
        _run(["ip", "-n", name, "-batch", "-"], stdin=(
            "link set lo up\n"
            f"addr add {ip}/{prefix} dev eth0\n"
            "link set eth0 up\n"
            f"route add default via {net['gateway']} dev eth0\n"))
    except BaseException:
        delete_netns(sandbox_id)
        raise
    return os.path.join(NETNS_DIR, name)


def denied_in_netns(sandbox_id: str) -> list[tuple[str, int]]:
    """Destinations the namespace's firewall refused (address, port), from its dynamic sets."""
    path = netns_path(sandbox_id)
    if not os.path.exists(path):
        return []
    out: list[tuple[str, int]] = []
    r = _run(["nsenter", f"--net={path}", "nft", "-j", "list", "table", "inet", "agentkernel"], check=False)
    try:
        data = json.loads(r.stdout) if r.returncode == 0 else {}
    except ValueError:
        data = {}
    for item in data.get("nftables", []):
        st = item.get("set") or {}
        if st.get("name") in ("denied4", "denied6"):
            for el in st.get("elem", []) or []:
                val = el.get("elem", {}).get("val", el) if isinstance(el, dict) else el
                concat = val.get("concat") if isinstance(val, dict) else None
                if concat and len(concat) == 2:
                    out.append((str(concat[0]), int(concat[1])))
    return out


def delete_netns(sandbox_id: str) -> None:
    """Remove the sandbox's namespace name and its veth pair. The pair normally goes with the namespace,
    but a namespace still held by a process that is exiting (a stopped gVisor sandbox's Sentry) outlives
    its name for a moment, and a restart would then find the host end still there: it is deleted
    explicitly (deleting one end of a veth pair deletes both)."""
    name = netns_name(sandbox_id)
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        _run(["ip", "netns", "del", name], check=False)
    veth = f"akv{short_id(sandbox_id)}"
    if os.path.exists(f"/sys/class/net/{veth}"):
        _run(["ip", "link", "del", veth], check=False)
