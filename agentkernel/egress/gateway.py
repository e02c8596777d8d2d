"""The egress gateway: the only thing a networked sandbox can talk to.

One asyncio process per installation, listening only on the egress bridge's address (GW):

- ``GW:3128`` forward proxy: ``CONNECT host:port`` (TLS passes through untouched) and absolute-form
  ``GET http://host/...`` (plain HTTP, where bound secrets are substituted into headers);
- ``GW:80`` / ``GW:443`` transparent entry points: in allowlist mode the resolver answers allowed names
  with GW itself, so programs that ignore proxy variables still reach allowed HTTP(S) destinations;
  the destination is the HTTP ``Host`` header or the TLS ClientHello's SNI (read, never decrypted);
- ``GW:53/udp`` resolver: answers only names the sandbox may reach (NXDOMAIN otherwise), never
  forwarding a denied query anywhere, so data encoded in names of unlisted domains goes nowhere.

A connection's sandbox is its source address (each sandbox has its own, and its firewall and the
isolated bridge port stop it from using another's). Every destination is checked against the
sandbox's rules and, after resolution, against the always-blocked networks (metadata, link-local,
loopback, the host's addresses, sandbox subnets), so an allowed name resolving to a blocked address is
refused too (DNS rebinding). Refusals and secret substitutions go to the audit log.

Upstream resolution: ``AGENTKERNEL_EGRESS_DNS=IP[:PORT]`` sends A queries to that server; otherwise
the host's resolver (``getaddrinfo``: /etc/hosts, then its DNS servers).
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
import socket
import struct
import sys
import time

from .. import audit
from . import netns
from .rules import Rules, always_blocked, is_blocked

IDLE_EXIT = 30.0  # seconds without any registered sandbox before the gateway exits
HEAD_MAX = 64 * 1024
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 256  # concurrent connections per sandbox (the gateway is shared by every sandbox)


class Sandbox:
    __slots__ = ("id", "ip", "mode", "mtime", "name", "rules", "secrets", "tls")

    def __init__(self, reg: dict, mtime: float) -> None:
        self.id, self.name, self.ip, self.mode = reg["id"], reg.get("name"), reg["ip"], reg["mode"]
        self.rules = Rules.from_lists(reg["mode"], reg.get("allow", ()), reg.get("block", ()))
        self.secrets = reg.get("secrets", [])
        self.tls = reg.get("tls")  # {"ca", "key"} with --tls-intercept
        self.mtime = mtime

    @property
    def label(self) -> str:
        return self.name or self.id


class Gateway:
    def __init__(self, state: str, listen: str) -> None:
        self.state, self.listen = state, listen
        self.advertise = listen  # the address allowed names resolve to in allowlist mode
        self.cache: dict[str, Sandbox] = {}
        self.tls_ctx = None
        self.leaves = None
        self.open_conns: dict[str, int] = {}
        self.blocked = always_blocked()
        up = os.environ.get("AGENTKERNEL_EGRESS_DNS")
        self.upstream: tuple[str, int] | None = None
        if up:
            host, _, port = up.rpartition(":") if up.count(":") == 1 else (up, "", "53")
            self.upstream = (host, int(port or 53))

    # -- registrations --
    def sandbox(self, ip: str) -> Sandbox | None:
        path = os.path.join(self.state, "sb", f"{ip}.json")
        try:
            st = os.stat(path)
        except OSError:
            self.cache.pop(ip, None)
            return None
        sb = self.cache.get(ip)
        if sb is None or sb.mtime != st.st_mtime:
            try:
                with open(path) as f:
                    sb = Sandbox(json.load(f), st.st_mtime)
            except (OSError, ValueError, KeyError):
                return None
            self.cache[ip] = sb
        return sb

    def audit(self, event: str, **fields: object) -> None:
        """Where refusals and substitutions are recorded (the host's audit log; a pod's stdout in-cluster)."""
        audit.log(event, **fields)

    def blocked_nets(self) -> list:
        return self.blocked

    def refresh_blocked(self) -> None:
        """The host's addresses and bridge subnets change rarely: re-read them every 2 s, off the event
        loop (idle_watch), so no request waits for `ip`. On failure the last good list stays."""
        try:
            extra = netns.host_blocked_nets()
            with open(os.path.join(self.state, "net.json")) as f:
                extra.append(json.load(f)["subnet"])
        except Exception:
            return
        self.blocked = always_blocked(extra)

    def deny(self, sb: Sandbox | None, dest: str, port: int | None, rule: str, via: str) -> None:
        self.audit("network.denied", id=sb.id if sb else None, sandbox=sb.label if sb else None, dest=dest, port=port,
                  rule=rule, via=via)

    # -- resolution --
    async def resolve(self, name: str) -> list[str]:
        try:
            ipaddress.ip_address(name)
            return [name]
        except ValueError:
            pass
        if self.upstream:
            return await self._query_upstream(name)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError:
            return []
        return list(dict.fromkeys(i[4][0] for i in infos))

    async def _query_upstream(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        qid = int.from_bytes(os.urandom(2), "big")
        q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack(">HH", 1, 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.upstream)
            await loop.sock_sendall(sock, q)
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3.0)
        except (OSError, TimeoutError):
            return []
        finally:
            sock.close()
        return parse_a_answers(data, qid)

    async def pick_address(self, sb: Sandbox, host: str, port: int) -> tuple[str | None, str]:
        """(address to connect to, or None and the reason)."""
        addrs = await self.resolve(host)
        if not addrs:
            return None, "name does not resolve"
        blocked = self.blocked_nets()
        for a in addrs:
            addr = ipaddress.ip_address(a)
            if is_blocked(addr, blocked):
                continue
            if any(e.matches_ip(addr) for e in sb.rules.block):
                continue
            return a, ""
        return None, f"resolves only to blocked addresses ({', '.join(addrs[:3])})"

    def decide(self, sb: Sandbox, host: str, port: int) -> tuple[bool, str]:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return sb.rules.decide_host(host, port)
        if is_blocked(addr, self.blocked_nets()):
            return False, "always blocked (metadata, link-local, loopback, host or sandbox address)"
        return sb.rules.decide_ip(addr, port)

    def tls_context(self):
        """Verifying client context for gateway-originated TLS (system CAs, plus
        AGENTKERNEL_EGRESS_CA_FILE when set, e.g. a corporate CA)."""
        import ssl

        if self.tls_ctx is None:
            ctx = ssl.create_default_context()
            extra = os.environ.get("AGENTKERNEL_EGRESS_CA_FILE")
            if extra:
                ctx.load_verify_locations(cafile=extra)
            self.tls_ctx = ctx
        return self.tls_ctx

    # -- TCP entry points --
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, entry: int) -> None:
        peer = writer.get_extra_info("peername")[0]
        sb = self.sandbox(peer)
        self.open_conns[peer] = self.open_conns.get(peer, 0) + 1
        try:
            if sb is None:
                self.deny(None, peer, None, "unknown source address", "gateway")
                return
            if self.open_conns[peer] > MAX_CONNECTIONS:
                self.deny(sb, "(gateway)", entry, f"more than {MAX_CONNECTIONS} concurrent connections", "gateway")
                return
            if entry == 443:
                await self._tls(sb, reader, writer)
            else:
                await self._http(sb, reader, writer, transparent=entry == 80)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            pass
        finally:
            self.open_conns[peer] -= 1
            if not self.open_conns[peer]:
                del self.open_conns[peer]
            writer.close()

    async def _tls(self, sb: Sandbox, reader, writer) -> None:
        head = await asyncio.wait_for(read_client_hello(reader), 10.0)
        host = parse_sni(head)
        if not host:
            self.deny(sb, "(no SNI)", 443, "TLS without server name", "gateway")
            return
        await self._forward(sb, host, 443, head, reader, writer, via="tls")

    async def _http(self, sb: Sandbox, reader, writer, transparent: bool) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30.0)
        if len(head) > HEAD_MAX:
            return
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
        headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
        if method == "CONNECT" and not transparent:
            host, port = split_hostport(target, 443)
            if sb.tls and port == 443 and any(s["host"] == host.lower().rstrip(".") for s in sb.secrets):
                await self._intercept(sb, host.lower().rstrip("."), reader, writer)
                return
            ok = await self._forward(sb, host, port, b"", reader, writer, via="connect", connect_reply=True)
            if ok is False:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        if target.startswith("http://"):
            rest = target[7:]
            hostport, slash, path = rest.partition("/")
            path = slash + path or "/"
        elif transparent and target.startswith("/"):
            hostport = next((v.strip() for k, v in headers if k.strip().lower() == "host"), "")
            path = target
        else:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        host, port = split_hostport(hostport, 80)
        # the Host header is the name that was checked (no second, unchecked name for a shared server)
        headers = [(k, v) for k, v in headers if k.strip().lower() not in (
            "proxy-connection", "proxy-authorization", "connection", "keep-alive", "host")]
        headers.insert(0, ("Host", " " + hostport.strip()))
        headers = self._substitute(sb, host, headers)
        out = f"{method} {path} {version}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in headers)
        out += "Connection: close\r\n\r\n"
        # plain HTTP addressed to port 443 through the proxy: the gateway speaks TLS to the destination
        # itself (verifying its certificate), so bound secrets can be substituted for HTTPS APIs without
        # intercepting any TLS the sandbox makes
        ok = await self._forward(sb, host, port, out.encode("latin-1"), reader, writer, via="http",
                                 tls_upstream=port == 443 and not transparent)
        if ok is False:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nX-Agentkernel: egress denied\r\n\r\n")

    async def _intercept(self, sb: Sandbox, host: str, reader, writer) -> None:
        """--tls-intercept, CONNECT to a secret-bound host: TLS with the sandbox's CA toward the sandbox,
        the request's headers substituted, verified TLS toward the host."""
        ok, rule = self.decide(sb, host, 443)
        if not ok:
            self.deny(sb, host, 443, rule, "connect")
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        from .tls import LeafCache

        if self.leaves is None:
            self.leaves = LeafCache()
        ctx = self.leaves.context(sb.id, sb.tls["ca"], sb.tls["key"], host)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await writer.start_tls(ctx)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30.0)
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
        headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
        headers = [(k, v) for k, v in headers if k.strip().lower() not in ("connection", "keep-alive")]
        headers = self._substitute(sb, host, headers)
        out = f"{method} {target} {version}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in headers)
        out += "Connection: close\r\n\r\n"
        self.audit("network.tls_intercepted", id=sb.id, sandbox=sb.label, host=host)
        ok2 = await self._forward(sb, host, 443, out.encode("latin-1"), reader, writer, via="tls-intercept",
                                  tls_upstream=True)
        if ok2 is False:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    def _substitute(self, sb: Sandbox, host: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        host = host.lower().rstrip(".")
        out = list(headers)
        for s in sb.secrets:
            ph = s["placeholder"]
            carries = any(ph in v for _, v in out)
            if s["host"] != host:
                if carries:
                    self.audit("network.secret_withheld", id=sb.id, sandbox=sb.label, host=host, secret=s["name"],
                              reason="host not bound to this secret; the placeholder was sent unchanged")
                continue
            hdr = (s.get("header") or "").lower()
            done = False
            for i, (k, v) in enumerate(out):
                if ph in v and (not hdr or k.strip().lower() == hdr):
                    out[i] = (k, v.replace(ph, s["value"]))
                    done = True
            if hdr and not any(k.strip().lower() == hdr for k, _ in out):
                out.append((s["header"], " " + s["value"]))
                done = True
            if done:
                self.audit("network.secret", id=sb.id, sandbox=sb.label, host=host, secret=s["name"],
                          header=s.get("header"))
        return out

    async def _forward(self, sb: Sandbox, host: str, port: int, first: bytes, reader, writer, *, via: str,
                       connect_reply: bool = False, tls_upstream: bool = False) -> bool | None:
        host = host.lower().rstrip(".")
        ok, rule = self.decide(sb, host, port)
        if not ok:
            self.deny(sb, host, port, rule, via)
            return False
        addr, why = await self.pick_address(sb, host, port)
        if addr is None:
            self.deny(sb, host, port, why, via)
            return False
        tls = self.tls_context() if tls_upstream else None
        try:
            ur, uw = await asyncio.wait_for(
                asyncio.open_connection(addr, port, ssl=tls, server_hostname=host if tls else None), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            if connect_reply or tls:
                if tls:
                    self.deny(sb, host, port, f"TLS to the destination failed: {exc}", "https-origin")
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return None
        if connect_reply:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if first:
            uw.write(first)
        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        return True

    async def serve(self, ready_fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for port in netns.GATEWAY_TCP_PORTS:
            servers.append(await asyncio.start_server(
                lambda r, w, p=port: self.handle(r, w, p), self.listen, port, reuse_address=True, backlog=512))
        await asyncio.to_thread(self.refresh_blocked)
        transport, _ = await loop.create_datagram_endpoint(lambda: DNSProtocol(self),
                                                           local_addr=(self.listen, netns.DNS_PORT))
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
        try:
            await self.idle_watch()
        finally:
            transport.close()
            for s in servers:
                s.close()

    async def idle_watch(self) -> None:
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(self.refresh_blocked)
            if os.listdir(os.path.join(self.state, "sb")):
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since < IDLE_EXIT:
                continue
            with open(os.path.join(self.state, "reg.lock"), "w") as reg:
                fcntl.flock(reg, fcntl.LOCK_EX)
                if not os.listdir(os.path.join(self.state, "sb")):
                    os._exit(0)  # the flock on gateway.lock goes with the process
            idle_since = time.monotonic()


class DNSProtocol(asyncio.DatagramProtocol):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        asyncio.get_running_loop().create_task(self._answer(data, addr))

    async def _answer(self, data: bytes, addr) -> None:
        try:
            qid, flags = struct.unpack(">HH", data[:4])
            name, qtype, end = parse_question(data)
        except (ValueError, struct.error, IndexError):
            return
        question = data[12:end]
        sb = self.gw.sandbox(addr[0])
        rcode, answers = 5, []  # REFUSED
        if sb is None:
            self.gw.deny(None, name, None, "unknown source address", "dns")
        else:
            ok, rule = sb.rules.decide_host(name, None) if name else (False, "empty name")
            if not ok:
                rcode = 3  # NXDOMAIN: the query goes nowhere
                self.gw.deny(sb, name[:300], None, rule, "dns")
            else:
                rcode = 0
                if qtype == 1:
                    if sb.mode == "allowlist":
                        answers = [self.gw.advertise]  # reach it through the gateway (SNI/Host checked there)
                    else:
                        blocked = self.gw.blocked_nets()
                        answers = [a for a in await self.gw.resolve(name)
                                   if not is_blocked(ipaddress.ip_address(a), blocked)]
                        if not answers:
                            rcode = 3
        resp = struct.pack(">HHHHHH", qid, 0x8180 | rcode | (flags & 0x0100), 1, len(answers), 0, 0) + question
        for a in answers:
            resp += struct.pack(">HHHLH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(a)
        if self.transport is not None:
            self.transport.sendto(resp, addr)


# ---- wire helpers ----------------------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        b = label.encode("idna") if not label.isascii() else label.encode()
        out += bytes([len(b)]) + b
    return out + b"\0"


def parse_question(data: bytes) -> tuple[str, int, int]:
    i, labels = 12, []
    while True:
        n = data[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed name in question")
        labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
        if i > 512:
            raise ValueError("name too long")
    qtype = struct.unpack(">H", data[i:i + 2])[0]
    return ".".join(labels).lower(), qtype, i + 4


def _skip_name(data: bytes, i: int) -> int:
    while True:
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0:
            return i + 2
        i += 1 + n


def parse_a_answers(data: bytes, qid: int) -> list[str]:
    try:
        rid, _fl, qd, an = struct.unpack(">HHHH", data[:8])
        if rid != qid:
            return []
        i = 12
        for _ in range(qd):
            i = _skip_name(data, i) + 4
        out = []
        for _ in range(an):
            i = _skip_name(data, i)
            rtype, _cls, _ttl, rdlen = struct.unpack(">HHLH", data[i:i + 10])
            i += 10
            if rtype == 1 and rdlen == 4:
                out.append(socket.inet_ntoa(data[i:i + 4]))
            i += rdlen
        return out
    except (struct.error, IndexError):
        return []


def split_hostport(text: str, default: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return text, default


async def read_client_hello(reader: asyncio.StreamReader) -> bytes:
    hdr = await reader.readexactly(5)
    if hdr[0] != 0x16:
        raise ValueError("not a TLS handshake")
    n = int.from_bytes(hdr[3:5], "big")
    return hdr + await reader.readexactly(n)


def parse_sni(rec: bytes) -> str | None:
    try:
        p = 5
        if rec[p] != 1:
            return None
        p += 4 + 2 + 32
        p += 1 + rec[p]  # session id
        p += 2 + int.from_bytes(rec[p:p + 2], "big")  # cipher suites
        p += 1 + rec[p]  # compression
        end = p + 2 + int.from_bytes(rec[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype, elen = int.from_bytes(rec[p:p + 2], "big"), int.from_bytes(rec[p + 2:p + 4], "big")
            p += 4
            if etype == 0:
                q = p + 2
                if rec[q] == 0:
                    n = int.from_bytes(rec[q + 1:q + 3], "big")
                    return rec[q + 3:q + 3 + n].decode("ascii")
            p += elen
    except (IndexError, UnicodeDecodeError):
        return None
    return None


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="agentkernel-egress-gateway")
    ap.add_argument("--state", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--ready-fd", type=int)
    a = ap.parse_args(argv)
    lock = os.open(os.path.join(a.state, "gateway.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if a.ready_fd is not None:
            os.write(a.ready_fd, b"busy: another gateway runs\n")
        return 0
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    gw = Gateway(a.state, a.listen)
    try:
        asyncio.run(gw.serve(a.ready_fd))
    except OSError as exc:
        if a.ready_fd is not None:
            try:
                os.write(a.ready_fd, f"error: {exc}\n".encode())
            except OSError:
                pass
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
