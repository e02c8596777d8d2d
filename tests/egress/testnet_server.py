"""A test host for the egress tests, run inside a network namespace the test created.

Serves HTTP on :80 and :8080, HTTPS on :443 (self-signed), and DNS on :53/udp answering every A query
for a name in NAMES with this host's address. Every HTTP request's head and every DNS query name is
appended to LOG (one JSON object per line), so tests can see exactly what left the gateway.
"""

import asyncio
import json
import socket
import ssl
import struct
import sys

ADDR, LOG, CERT, KEY, NAMES = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5].split(",")


def record(obj):
    with open(LOG, "a") as f:
        f.write(json.dumps(obj) + "\n")


async def http(reader, writer, port):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except Exception:
        writer.close()
        return
    text = head.decode("latin-1")
    record({"kind": "http", "port": port, "head": text})
    body = f"hello from test host on {port}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()


class DNS(asyncio.DatagramProtocol):
    def connection_made(self, t):
        self.t = t

    def datagram_received(self, data, addr):
        qid = struct.unpack(">H", data[:2])[0]
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace"))
            i += 1 + data[i]
        qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
        name = ".".join(labels).lower()
        record({"kind": "dns", "name": name, "qtype": qtype})
        q = data[12:i + 5]
        if name in NAMES and qtype == 1:
            ans = struct.pack(">HHHLH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(ADDR)
            resp = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q + ans
        else:
            resp = struct.pack(">HHHHHH", qid, 0x8183, 1, 0, 0, 0) + q
        self.t.sendto(resp, addr)


async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(CERT, KEY)
    for port in (80, 8080):
        await asyncio.start_server(lambda r, w, p=port: http(r, w, p), ADDR, port)
    await asyncio.start_server(lambda r, w: http(r, w, 443), ADDR, 443, ssl=ctx)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(DNS, local_addr=(ADDR, 53))
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
