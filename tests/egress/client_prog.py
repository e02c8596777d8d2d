"""Runs inside the sandbox (python3 of the debian image). Each argument is one probe; one line per probe:
  get:URL[:noproxy][:H=Name=Value]  -> GET-OK <status> <body> | GET-FAIL <reason>
  tcp:HOST:PORT                     -> OPEN | CLOSED  (a direct connection, no proxy)
  sni:ALLOWED|OTHER                 -> GET-OK | GET-FAIL   (TLS to ALLOWED's address with SNI OTHER)
  dns:NAME                          -> RESOLVED <addrs> | NXDOMAIN
  dnsac:NAME                        -> the same with AI_ADDRCONFIG (needs an IPv4 interface the sandbox sees)
  env:NAME                          -> ENV <value>
"""
import socket
import ssl
import sys
import urllib.request

for probe in sys.argv[1:]:
    kind, _, rest = probe.partition(":")
    tag = probe[:80]
    try:
        if kind in ("get", "getv"):  # getv: verify the server's certificate (default trust, SSL_CERT_FILE)
            parts = rest.split("|")
            url, opts = parts[0], parts[1:]
            ctx = ssl.create_default_context() if kind == "getv" else ssl._create_unverified_context()
            handlers = [urllib.request.HTTPSHandler(context=ctx)]
            if "noproxy" in opts:
                handlers.append(urllib.request.ProxyHandler({}))
            req = urllib.request.Request(url)
            for o in opts:
                if o.startswith("H="):
                    k, v = o[2:].split("=", 1)
                    req.add_header(k, v)
            with urllib.request.build_opener(*handlers).open(req, timeout=5) as r:
                print(f"GET-OK {tag} {r.status} {r.read().decode().strip()}", flush=True)
        elif kind == "tcp":
            host, port = rest.rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=3)
            s.close()
            print(f"OPEN {tag}", flush=True)
        elif kind == "sni":  # TLS to the address an allowed name resolved to, naming another server
            via, name = rest.split("|")
            ip = socket.getaddrinfo(via, 443, socket.AF_INET)[0][4][0]
            raw = socket.create_connection((ip, 443), timeout=5)
            tls = ssl._create_unverified_context().wrap_socket(raw, server_hostname=name)
            tls.sendall(f"GET /sni HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
            print(f"GET-OK {tag} {tls.recv(100)!r}", flush=True)
        elif kind in ("dns", "dnsac"):
            flags = socket.AI_ADDRCONFIG if kind == "dnsac" else 0
            addrs = sorted({a[4][0] for a in socket.getaddrinfo(rest, 80, socket.AF_INET, 0, 0, flags)})
            print(f"RESOLVED {tag} {addrs}", flush=True)
        elif kind == "file":
            with open(rest) as f:
                print(f"FILE {tag} {f.read().count('BEGIN CERTIFICATE')}", flush=True)
        elif kind == "env":
            import os
            print(f"ENV {tag} {os.environ.get(rest, '')}", flush=True)
    except Exception as exc:
        word = {"tcp": "CLOSED", "dns": "NXDOMAIN", "dnsac": "NXDOMAIN", "file": "NOFILE"}.get(kind, "GET-FAIL")
        print(f"{word} {tag} {type(exc).__name__}: {exc}", flush=True)
