"""What network egress costs (docs/network.md "Measured cost"):

- ``cold_none`` / ``cold_allowlist`` / ``cold_open``: a cold one-shot ``run --no-daemon -- echo hello``
  per network mode, interleaved run by run (so load drift hits the modes alike); the difference is
  what the egress namespace, firewall and gateway registration add to a cold start;
- ``http_via_gateway`` / ``http_direct``: one HTTP GET from inside a sandbox to a test host, through
  the gateway (allowlist, proxy) and straight (open mode), one sample per request, in one sandbox each.

The test host lives in a network namespace this suite makes (``akb-<random>``, a veth to the host, a
``python3 -m http.server``) and removes; nothing outside it is contacted. Needs root, ``ip`` and ``nft``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

from ..harness import BenchContext, Cmd

SUITE = "egress"
BACKENDS = ("oci", "podman", "docker", "gvisor")
HTTP_IMAGE = "agentkernel/debian"  # has python3
CLIENT = r"""
import sys, time, urllib.request
url, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
op = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if mode == "direct" else []))
for i in range(n + 3):
    t = time.perf_counter(); op.open(url, timeout=5).read(); ms = (time.perf_counter() - t) * 1000
    if i >= 3:
        print(f"{ms:.3f}")
"""


class _TestHost:
    """A namespace with one HTTP server on ADDR:8080, joined to the host by a veth."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.veth = f"akb-{tag}", f"akbh{tag}"
        used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        x = next(x for x in range(100, 250) if f"10.198.{x}." not in used)
        self.host_ip, self.addr = f"10.198.{x}.1", f"10.198.{x}.2"
        self.dir = tempfile.mkdtemp(prefix="ak-bench-egress-")
        with open(os.path.join(self.dir, "index.html"), "w") as f:
            f.write("ok\n")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> _TestHost:
        def sh(*a: str) -> None:
            subprocess.run(a, check=True, capture_output=True)

        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            sh("ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "eth0")
            sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "http.server",
                                          "--bind", self.addr, "8080"], cwd=self.dir, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            for _ in range(100):
                r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                    f"import socket; socket.create_connection(('{self.addr}', 8080), 1)"],
                                   capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _modes(addr: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (("none", ()), ("allowlist", ("--allow-host", f"{addr}:8080")), ("open", ("--network", "open")))


def run(ctx: BenchContext) -> None:
    backends = [b for b in ctx.selected() if b in BACKENDS]
    if not backends:
        return
    why = None
    if os.geteuid() != 0:
        why = "network egress needs root (network namespaces, nftables)"
    elif not shutil.which("ip") or not shutil.which("nft"):
        why = "ip and nft are needed (apt-get install -y iproute2 nftables)"
    if why:
        for b in backends:
            ctx.add_unavailable(suite=SUITE, backend=b, name="cold_allowlist", label="cold run, allowlist",
                                mode="cold", reason=why)
        return
    q = ctx.cfg.quick
    iterations, warmup = (3, 1) if q else (max(5, min(ctx.cfg.iterations, 15)), 1)
    try:
        with _TestHost() as host:
            for b in backends:
                ok, reason = ctx.available(b)
                if not ok:
                    ctx.add_unavailable(suite=SUITE, backend=b, name="cold_allowlist", label="cold run, allowlist",
                                        mode="cold", reason=reason)
                    continue
                cmds = [Cmd(f"cold_{m}", ctx.ak("run", "--no-daemon", "-B", b, *flags, "--", "echo", "hello"),
                            label=f"cold one-shot, network {m}", backend=b, mode="cold")
                        for m, flags in _modes(host.addr)]
                ctx.add_cmd_results(SUITE, cmds, ctx.interleave(cmds, iterations, warmup, f"egress cold {b}"))
                _ratio(ctx, b)
            _http(ctx, host, "oci" if "oci" in backends else backends[0], 50 if q else 200)
    except Exception as exc:
        ctx.error(SUITE, None, f"{type(exc).__name__}: {exc}")
    finally:
        subprocess.run([sys.executable, "-c", "from agentkernel.egress import gateway_ctl, netns; "
                        "gateway_ctl.stop(); netns.remove_bridge()"], env=ctx.env, capture_output=True)


def _ratio(ctx: BenchContext, backend: str) -> None:
    for m in ("allowlist", "open"):
        ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/cold_{m}",
                      raw=f"{SUITE}/{backend}/cold_none", label=f"cold run, {m} vs none")


def _http(ctx: BenchContext, host: _TestHost, backend: str, n: int) -> None:
    ok, _ = ctx.available(backend)
    if not ok:
        return
    url = f"http://{host.addr}:8080/"
    for name, mode, flags, label in (
            ("http_via_gateway", "proxy", ("--allow-host", f"{host.addr}:8080"),
             "HTTP GET through the egress gateway (allowlist, proxy)"),
            ("http_direct", "direct", ("--network", "open"), "HTTP GET straight (open mode, no gateway)")):
        argv = ctx.ak("run", "--no-daemon", "-B", backend, "-i", HTTP_IMAGE, *flags, "--", "python3", "-c", CLIENT,
                      url, mode, str(n))
        r = ctx.run_quiet(argv, timeout=300)
        samples = []
        for line in r.stdout.decode(errors="replace").split():
            try:
                samples.append(float(line))
            except ValueError:
                pass
        if r.returncode != 0 or not samples:
            ctx.error(SUITE, backend, f"{name}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
            continue
        ctx.add_measurement(suite=SUITE, backend=backend, name=name, label=label, mode="warm",
                            samples_ms=samples, command=argv, image=HTTP_IMAGE,
                            extra={"requests": len(samples), "sandbox": "one sandbox, sequential requests"})
    ctx.add_ratio(suite=SUITE, backend=backend, ours=f"{SUITE}/{backend}/http_via_gateway",
                  raw=f"{SUITE}/{backend}/http_direct", label="HTTP GET via the gateway vs direct")
