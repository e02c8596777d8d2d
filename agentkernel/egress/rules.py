"""Egress rules: the syntax of allow/block entries and secret bindings, and how a destination matches.

An entry is one of:

- a host name: ``api.example.com`` (that name only) or ``*.example.com`` (example.com and every name
  under it), optionally with a port: ``api.example.com:8443``;
- an IPv4 network: ``203.0.113.0/24`` or an address ``203.0.113.7``, optionally ``:PORT``;
- an IPv6 network in brackets: ``[2001:db8::/32]`` or ``[2001:db8::1]:443``.

A host-name entry without a port allows ports 80 and 443; a network entry without a port allows every
port. Blocking always wins over allowing, and some destinations are never reachable whatever the
policy (``ALWAYS_BLOCKED_V4/V6``: cloud metadata, link-local, loopback, multicast, the unspecified
address; the host's own addresses and the sandbox subnets are added at run time).

Standard library only, imported lazily (never on the CLI's hot path unless a network policy is set).
"""

from __future__ import annotations

from ..errors import ValidationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PORTS = (80, 443)
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")

# Destinations no sandbox ever reaches, whatever its policy. Cloud metadata services: AWS/GCP/Azure/
# OpenStack/DigitalOcean/Oracle 169.254.169.254 (inside link-local 169.254.0.0/16), Azure's wireserver
# 168.63.129.16, Alibaba 100.100.100.200, AWS's IPv6 endpoint fd00:ec2::254, plus loopback, "this
# network", multicast/reserved and link-local ranges.
ALWAYS_BLOCKED_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "168.63.129.16/32", "100.100.100.200/32",
                     "224.0.0.0/4", "240.0.0.0/4")
ALWAYS_BLOCKED_V6 = ("::/128", "::1/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128", "::ffff:0:0/96")


class Entry:
    """One parsed allow/block entry: ``host`` (lower-case, no '*.'), ``wildcard``, or ``net``; ``port``."""

    __slots__ = ("host", "net", "port", "text", "wildcard")

    def __init__(self, text: str, host: str | None, wildcard: bool, net: Any, port: int | None) -> None:
        self.text, self.host, self.wildcard, self.net, self.port = text, host, wildcard, net, port

    def ports(self) -> tuple[int, ...] | None:
        """Allowed ports, None meaning every port."""
        if self.port is not None:
            return (self.port,)
        return DEFAULT_PORTS if self.host is not None else None

    def matches_host(self, name: str, port: int | None = None) -> bool:
        if self.host is None:
            return False
        name = name.lower().rstrip(".")
        hit = name == self.host or (self.wildcard and name.endswith("." + self.host))
        if not hit:
            return False
        if port is None:
            return True
        ports = self.ports()
        return ports is None or port in ports

    def matches_ip(self, addr: Any, port: int | None = None) -> bool:
        if self.net is None or addr.version != self.net.version or addr not in self.net:
            return False
        return port is None or self.port is None or port == self.port


def _port(text: str, entry: str, label: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValidationError(f"{label}: invalid port {text!r} in {entry!r} (use 1-65535)")
    return int(text)


def check_hostname(name: str, entry: str, label: str) -> str:
    name = name.lower()
    if not name or len(name) > 253 or name.endswith("."):
        raise ValidationError(f"{label}: invalid host name in {entry!r}")
    labels = name.split(".")
    for part in labels:
        if not part or len(part) > 63 or not set(part) <= _LABEL_CHARS or part[0] == "-" or part[-1] == "-":
            raise ValidationError(
                f"{label}: invalid host name {name!r} in {entry!r}: labels are 1-63 letters, digits, '-' "
                "(not at either end) separated by single dots; only a leading '*.' is a wildcard")
    if all(p.isdigit() for p in labels):
        raise ValidationError(f"{label}: {entry!r} looks like a malformed IPv4 address")
    return name


def parse_entry(text: str, label: str = "network entry") -> Entry:
    """Parse one allow/block entry or raise ValidationError naming what is wrong."""
    import ipaddress

    if not isinstance(text, str) or not text.strip():
        raise ValidationError(f"{label}: empty entry")
    s = text.strip()
    port: int | None = None
    if s.startswith("["):  # [v6net]:port
        end = s.find("]")
        if end < 0:
            raise ValidationError(f"{label}: unbalanced '[' in {text!r}")
        rest = s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValidationError(f"{label}: expected ':PORT' after ']' in {text!r}")
            port = _port(rest[1:], text, label)
        try:
            net = ipaddress.ip_network(s[1:end], strict=False)
        except ValueError as exc:
            raise ValidationError(f"{label}: invalid IPv6 network in {text!r}: {exc}") from None
        if net.version != 6:
            raise ValidationError(f"{label}: brackets are for IPv6 only, got {text!r}")
        return Entry(text, None, False, net, port)
    if s.count(":") > 1:
        raise ValidationError(f"{label}: write IPv6 networks in brackets, e.g. [2001:db8::/32]:443 (got {text!r})")
    host, sep, p = s.partition(":")
    if sep:
        port = _port(p, text, label)
    if host and (host[0].isdigit() and set(host) <= set("0123456789./")):
        try:
            net = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise ValidationError(f"{label}: invalid IPv4 network {host!r}: {exc}") from None
        return Entry(text, None, False, net, port)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise ValidationError(f"{label}: invalid pattern {text!r}: '*' is only allowed as a leading '*.'")
    host = check_hostname(host, text, label)
    if wildcard and "." not in host:
        raise ValidationError(f"{label}: {text!r} covers a whole top-level domain; name a registered domain")
    return Entry(text, host, wildcard, None, port)


def parse_entries(values: tuple[str, ...] | list[str], label: str) -> list[Entry]:
    return [parse_entry(v, label) for v in values]


class Binding:
    """A secret bound to destination hosts: ``NAME:HOST[:HEADER]`` (repeat the flag for more hosts)."""

    __slots__ = ("header", "host", "name")

    def __init__(self, name: str, host: str, header: str | None) -> None:
        self.name, self.host, self.header = name, host, header


def parse_binding(text: str, label: str = "--secret") -> Binding:
    from .._model import is_env_name

    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) not in (2, 3):
        raise ValidationError(f"{label}: expected NAME:HOST[:HEADER], got {text!r}")
    name, host = parts[0], parts[1].strip().lower()
    header = parts[2] if len(parts) == 3 else None
    if not is_env_name(name):
        raise ValidationError(f"{label}: invalid secret name {name!r} "
                              "(letters, digits, '_'; not starting with a digit)")
    if not host:
        raise ValidationError(f"{label}: secret {name} is bound to no host: name the destination it is for")
    if host in ("*", "*.*") or host.startswith("*"):
        raise ValidationError(
            f"{label}: secret {name} may not be bound to a wildcard ({host!r}): bind it to the exact host(s) "
            "that should receive it, so it can never be sent anywhere else")
    check_hostname(host, text, label)
    if header is not None and (not header or not set(header.lower()) <= _LABEL_CHARS):
        raise ValidationError(f"{label}: invalid header name {header!r} in {text!r}")
    return Binding(name, host, header)


def check_allow(values: tuple[str, ...], label: str) -> None:
    parse_entries(values, label)


def check_bindings(values: tuple[str, ...], label: str) -> None:
    for v in values:
        parse_binding(v, label)


class Rules:
    """A sandbox's compiled egress policy: mode, allow and block entries, secret bindings."""

    def __init__(self, mode: str, allow: list[Entry], block: list[Entry]) -> None:
        self.mode, self.allow, self.block = mode, allow, block

    @classmethod
    def from_lists(cls, mode: str, allow: list[str] | tuple[str, ...], block: list[str] | tuple[str, ...]) -> Rules:
        return cls(mode, parse_entries(allow, "allow"), parse_entries(block, "block"))

    def decide_host(self, name: str, port: int | None) -> tuple[bool, str]:
        """(allowed, rule) for a destination name (DNS query: port None)."""
        for e in self.block:
            if e.matches_host(name):
                return False, f"block {e.text}"
        if self.mode == "open":
            return True, "open"
        for e in self.allow:
            if e.matches_host(name, port):
                return True, f"allow {e.text}"
        if port is not None and any(e.matches_host(name) for e in self.allow):
            return False, f"port {port} not allowed for {name}"
        return False, "not in allowlist"

    def decide_ip(self, addr: Any, port: int | None) -> tuple[bool, str]:
        for e in self.block:
            if e.matches_ip(addr):
                return False, f"block {e.text}"
        if self.mode == "open":
            return True, "open"
        for e in self.allow:
            if e.matches_ip(addr, port):
                return True, f"allow {e.text}"
        return False, "not in allowlist"

    def networks(self, which: str) -> list[Entry]:
        return [e for e in (self.allow if which == "allow" else self.block) if e.net is not None]


def always_blocked(extra: list[str] | tuple[str, ...] = ()) -> list[Any]:
    import ipaddress

    return [ipaddress.ip_network(n, strict=False) for n in (*ALWAYS_BLOCKED_V4, *ALWAYS_BLOCKED_V6, *extra)]


def is_blocked(addr: Any, nets: list[Any]) -> bool:
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in nets)
