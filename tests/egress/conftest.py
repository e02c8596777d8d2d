"""A test network the egress tests make themselves: one network namespace (``akt-<random>``) joined to
the host by a veth pair, holding a test host (HTTP :80/:8080, HTTPS :443, DNS :53) that logs every
request and query it receives. The gateway resolves names through that DNS server
(AGENTKERNEL_EGRESS_DNS), so nothing here touches any address outside namespaces the tests created.
At the end the session's gateway is stopped and its bridge and host tables are removed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("allowed.test", "other.test", "bound.test", "unbound.test", "api.allowed.test")


def probe_results(stdout: bytes, probes: list[str], text: str) -> dict[str, str]:
    """client_prog.py's output -> {probe: result word + details} (a probe is echoed cut to 80 chars)."""
    res = {}
    for line in stdout.decode().splitlines():
        word, _, rest = line.partition(" ")
        for p in probes:
            if rest.startswith(p[:80]):
                res[p] = word + rest[len(p[:80]):]
    assert set(res) == set(probes), text
    return res


def _sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, input=input)


def _free_octet() -> int:
    used = _sh("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        x = 100 + secrets.randbelow(150)
        if f"10.199.{x}." not in used:
            return x
    raise RuntimeError("no free 10.199.x.0/24 for the test network")


class TestNet:
    def __init__(self, ns: str, host_ip: str, addr: str, log: str) -> None:
        self.ns, self.host_ip, self.addr, self.log = ns, host_ip, addr, log

    def events(self) -> list[dict]:
        try:
            with open(self.log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    def clear(self) -> None:
        open(self.log, "w").close()


@pytest.fixture(scope="session")
def testnet():
    yield from make_testnet()


def make_testnet():
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        if os.environ.get("CI") == "true":
            pytest.fail("egress tests need root, ip and nft")
        pytest.skip("egress tests need root, ip and nft")
    tag = secrets.token_hex(3)
    ns, veth = f"akt-{tag}", f"akth{tag}"
    x = _free_octet()
    host_ip, addr = f"10.199.{x}.1", f"10.199.{x}.2"
    work = tempfile.mkdtemp(prefix="ak-egress-test-")
    log = os.path.join(work, "server.jsonl")
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    _sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
        "-subj", "/CN=allowed.test", "-addext", "subjectAltName=" + ",".join(f"DNS:{n}" for n in NAMES))
    _sh("ip", "netns", "add", ns)
    proc = None
    try:
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/24", "dev", veth)
        _sh("ip", "link", "set", veth, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "testnet_server.py"),
                                 addr, log, cert, key, ",".join(NAMES)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        os.environ["AGENTKERNEL_EGRESS_DNS"] = f"{addr}:53"
        os.environ["AGENTKERNEL_SECRETS_DIR"] = os.path.join(work, "secrets")
        os.environ["AGENTKERNEL_SECRETS_BACKEND"] = "file"
        os.environ["AGENTKERNEL_EGRESS_CA_FILE"] = cert  # the gateway verifies the test host's TLS
        yield TestNet(ns, host_ip, addr, log)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        _sh("ip", "netns", "del", ns, check=False)
        _stop_gateway()
        shutil.rmtree(work, ignore_errors=True)


def _stop_gateway() -> None:
    from agentkernel.egress import gateway_ctl, netns

    gateway_ctl.stop()
    netns.remove_bridge()
