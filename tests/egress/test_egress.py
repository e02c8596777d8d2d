"""Network egress attacks, on real engines, against test hosts in namespaces the tests create.

Each sandbox command prints markers; the assertions read the markers, the test host's own log of
what reached it, and the audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ak, require_backend, skip_unavailable
from tests.egress.conftest import probe_results

ENFORCING = ["podman", "oci", "docker", "gvisor", "oci-runsc", "gvisor-docker"]
# a test id -> the CLI's backend flags
_BACKEND_FLAGS = {"oci-runsc": ("-B", "oci", "-o", "runtime=runsc")}


def bflags(backend: str) -> tuple[str, ...]:
    return _BACKEND_FLAGS.get(backend, ("-B", backend))


def run_timeout(backend: str) -> float:
    """gVisor's ptrace platform makes python3 start-up slow (every syscall trapped): more time on a
    loaded machine."""
    return 240 if backend in ("gvisor", "oci-runsc", "gvisor-docker") else 90


@pytest.fixture(autouse=True)
def _backend_networks(request):
    """gvisor-docker networks through a second runtime registered in dockerd (agentkernel setup): without
    it the backend refuses network modes, so these tests cannot run (a failure in CI, where gvisor is
    required)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "gvisor-docker":
        return
    require_backend("gvisor-docker")
    from agentkernel.backends.gvisor_docker import net_runtime_status

    ok, why = net_runtime_status()
    if not ok:
        skip_unavailable("gvisor-docker", why)


IMAGE = "agentkernel/debian"
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "client_prog.py")) as _f:
    CLIENT = _f.read()


# the other sandbox of the open-mode test: its address, then a listener on 9000 that reports connections
LISTENER = """
import signal, socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((sys.argv[1], 53))
print("inet %s/" % u.getsockname()[0], flush=True)
s = socket.socket()
s.bind(("0.0.0.0", 9000))
s.listen(8)
s.settimeout(0.5)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
end = time.time() + 180
while time.time() < end and not stop:  # until the test's SIGTERM (forwarded by the CLI)
    try:
        c, a = s.accept()
        print("ACCEPTED", a, flush=True)
        c.close()
    except socket.timeout:
        pass
print("LISTENED", flush=True)
"""


def out(r) -> str:
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def probe(backend: str, probes: list[str], *flags: str) -> tuple[dict[str, str], str]:
    """Run the probes in a fresh sandbox; {probe: result word + details}, and the whole output."""
    r = ak("run", "--no-daemon", *bflags(backend), "-i", IMAGE, *flags, "--", "python3", "-c", CLIENT, *probes,
           timeout=run_timeout(backend))
    text = out(r)
    assert r.returncode == 0, text
    res = probe_results(r.stdout, probes, text)
    return res, text


def audit_events(kind: str) -> list[dict]:
    from agentkernel import paths

    try:
        with open(paths.audit_path()) as f:
            return [e for e in (json.loads(line) for line in f) if e.get("event") == kind]
    except OSError:
        return []


@pytest.mark.parametrize("backend", ENFORCING)
def test_allowlist_http_https_and_refusals(testnet, backend):
    testnet.clear()
    ok = ["get:http://allowed.test/via-proxy", "get:http://allowed.test/transparent|noproxy",
          "get:https://allowed.test/tls-connect", "get:https://allowed.test/tls-sni|noproxy", "dns:allowed.test",
          "dnsac:allowed.test",  # AI_ADDRCONFIG: the sandbox sees its interface (gVisor lists those it started with)
          "get:http://allowed.test/fronted|H=Host=other.test"]  # HTTP fronting: Host is rewritten
    refused = ["get:http://other.test/", "get:https://other.test/", "get:https://other.test/x|noproxy",
               "get:http://allowed.test:8080/", f"get:http://{testnet.addr}/", f"get:http://{testnet.addr}/|noproxy",
               f"tcp:{testnet.addr}:80", f"tcp:{testnet.addr}:443", f"tcp:{testnet.host_ip}:22", "dns:other.test",
               "sni:allowed.test|other.test"]
    res, text = probe(backend, ok + refused, "--allow-host", "allowed.test")
    for p in ok:
        assert res[p].startswith(("GET-OK", "RESOLVED")), (p, text)
    for p in refused:
        assert res[p].startswith(("GET-FAIL", "CLOSED", "NXDOMAIN")), (p, text)
    heads = [e for e in testnet.events() if e["kind"] == "http"]
    assert len(heads) == 5, heads  # the allowed fetches (the fronting attempt arrives as allowed.test)
    assert all("other.test" not in e["head"] and e["port"] != 8080 for e in heads), heads
    # a denied name is never even looked up upstream
    assert not [e for e in testnet.events() if e["kind"] == "dns" and e["name"] == "other.test"]
    dests = {(e.get("dest"), e.get("via")) for e in audit_events("network.denied")}
    assert ("other.test", "dns") in dests and ("other.test", "http") in dests, dests
    assert ("other.test", "tls") in dests and ("other.test", "connect") in dests, dests  # SNI fronting refused
    assert (testnet.addr, "firewall") in dests, dests


@pytest.mark.parametrize("backend", ENFORCING)
def test_dns_tunnelling_goes_nowhere(testnet, backend):
    testnet.clear()
    chunk = "a" * 63
    names = [f"{chunk}.{chunk}.exfil.attacker.test", f"{'b' * 60}.other.test", f"c{'x' * 62}.unbound.test",
             f"{'d' * 50}.allowed.test"]
    res, text = probe(backend, [f"dns:{n}" for n in names], "--allow-host", "allowed.test")
    assert all(v.startswith("NXDOMAIN") for v in res.values()), text
    seen = [e["name"] for e in testnet.events() if e["kind"] == "dns"]
    assert seen == [], seen  # nothing reached the upstream resolver


@pytest.mark.parametrize("backend", ENFORCING)
def test_open_mode_excludes_host_sandboxes_and_metadata(testnet, backend):
    import socket

    from agentkernel.egress import netns

    gw = netns.network()["gateway"]
    # listeners on host addresses (the test veth's host side and the egress bridge), made by this test
    ls = []
    for ip in (testnet.host_ip, gw):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, 0))
        s.listen(8)
        s.settimeout(0)
        ls.append(s)
    # another sandbox, listening on 9000 until the test is done; it reports its address (the source address
    # of its route to the gateway: the debian image has no `ip`) and any connection that reached it
    other = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", "--no-daemon", *bflags(backend), "-i", IMAGE, "--network",
         "--", "python3", "-c", LISTENER, gw], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = other.stdout.readline().decode()
        assert line.startswith("inet "), (line, other.stderr.read(4000) if other.poll() is not None else "")
        other_ip = line.split("inet ")[1].split("/")[0]
        refused = ["tcp:169.254.169.254:80", f"tcp:{testnet.host_ip}:{ls[0].getsockname()[1]}",
                   f"tcp:{gw}:{ls[1].getsockname()[1]}", f"tcp:{other_ip}:9000", "tcp:[fd00:ec2::254]:80",
                   "get:http://169.254.169.254/latest/meta-data/", "tcp:127.0.0.1:22"]
        res, text = probe(backend, [f"tcp:{testnet.addr}:8080", "dns:allowed.test", *refused], "--network", "open")
        assert res[f"tcp:{testnet.addr}:8080"].startswith("OPEN"), text  # open does reach the outside world
        assert res["dns:allowed.test"].startswith("RESOLVED") and testnet.addr in res["dns:allowed.test"], text
        for p in refused:
            assert res[p].startswith(("CLOSED", "GET-FAIL")), (p, text)
        for s in ls:
            with pytest.raises(BlockingIOError):
                s.accept()
        import time

        time.sleep(1)  # the listener polls every 0.5 s: a connection that reached it is reported by now
        assert other.poll() is None, other.communicate()  # still listening: its silence means something
        other.terminate()  # forwarded to the listener by the CLIs that forward signals; the others exit
        rest, _ = other.communicate(timeout=60)
        assert b"ACCEPTED" not in rest, rest
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        for s in ls:
            s.close()


@pytest.mark.parametrize("backend", ENFORCING)
def test_secret_placeholder_substituted_only_on_bound_host(testnet, backend):
    value = "s3cr3t-value-" + os.urandom(4).hex()
    r = ak("secret", "set", "API_TOKEN", input=value.encode() + b"\n")
    assert r.returncode == 0, out(r)
    assert ak("secret", "list").stdout.decode().split() == ["API_TOKEN"]
    assert ak("secret", "get", "API_TOKEN").stdout.decode().strip() == value
    testnet.clear()
    # the sandbox's own environment has the placeholder, which it sends everywhere; only bound.test gets the value
    ph = "AGENTKERNEL_SECRET_PLACEHOLDER_API_TOKEN_"
    probes = ["env:API_TOKEN", "get:http://bound.test/a|H=Authorization=Bearer $T",
              "get:http://unbound.test/b|H=Authorization=Bearer $T", "get:http://unbound.test/c|noproxy|H=X-Key=$T",
              "get:https://bound.test/tls|H=Authorization=Bearer $T",
              "get:http://bound.test:443/originated|H=Authorization=Bearer $T",
              "get:http://unbound.test:443/originated2|H=Authorization=Bearer $T"]
    script = 'T="$API_TOKEN"; exec python3 -c "$0" ' + " ".join(f'"{p}"' for p in probes)
    r = ak("run", "--no-daemon", *bflags(backend), "-i", IMAGE, "--allow-host", "bound.test", "--allow-host",
           "unbound.test", "--secret", "API_TOKEN:bound.test:Authorization", "--", "sh", "-c", script, CLIENT,
           timeout=run_timeout(backend))
    text = out(r)
    assert r.returncode == 0, text
    assert value not in text, text
    assert f"ENV env:API_TOKEN {ph}" in text, text
    heads = {e["head"].split(" ")[1]: e["head"] for e in testnet.events() if e["kind"] == "http"}
    assert f"Bearer {value}" in heads["/a"], heads
    for path in ("/b", "/c"):
        assert value not in heads[path] and ph in heads[path], heads
    assert value not in heads.get("/tls", ""), heads  # TLS is never intercepted: no substitution there
    # plain HTTP to :443 through the proxy: the gateway originates TLS (verified) and substitutes
    assert f"Bearer {value}" in heads.get("/originated", ""), (heads, text)
    assert value not in heads["/originated2"] and ph in heads["/originated2"], heads
    assert "GET-OK get:http://bound.test:443/originated" in text, text
    subs = audit_events("network.secret")
    assert subs and subs[-1]["host"] == "bound.test" and subs[-1]["secret"] == "API_TOKEN", subs
    from agentkernel import paths

    with open(paths.audit_path()) as f:
        assert value not in f.read()


def test_logs_network_shows_denials(testnet):
    r = ak("run", "--no-daemon", "--keep", "-n", "egress-logs", "-i", IMAGE, "--allow-host", "allowed.test", "--",
           "python3", "-c", CLIENT, "get:http://other.test/", f"tcp:{testnet.addr}:80")
    try:
        assert r.returncode == 0, out(r)
        r = ak("logs", "egress-logs", "--network")
        text = out(r)
        assert "other.test" in text and "DENY" in text, text
        assert testnet.addr in text, text  # the firewall's refusal, read live from the namespace
    finally:
        ak("rm", "egress-logs")
    r = ak("logs", "egress-logs", "--network", "--json")
    evs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert any(e.get("via") == "firewall" and e.get("dest") == testnet.addr for e in evs), evs


BAD = [
    (["--allow-host", "*"], "only allowed as a leading"),
    (["--allow-host", "bad..name"], "invalid host name"),
    (["--allow-host", "10.0.0.1/33"], "invalid IPv4 network"),
    (["--allow-host", "10.0.0.1/8"], "host bits set"),
    (["--allow-host", "a.test:0"], "invalid port"),
    (["--allow-host", "a.test:70000"], "invalid port"),
    (["--allow-host", "*.test"], "top-level domain"),
    (["--network", "allowlist"], "needs at least one allowed destination"),
    (["--network", "none", "--allow-host", "a.test"], "contradicts"),
    (["--allow-host", "a.test", "--secret", "TOK:*"], "wildcard"),
    (["--allow-host", "a.test", "--secret", "TOK:"], "bound to no host"),
    (["--allow-host", "a.test", "--secret", "TOK:b.test"], "may not reach"),
    (["--allow-host", "a.test", "--secret", "NOPE_NOT_SET:a.test"], "no secret named 'NOPE_NOT_SET'"),
    (["--allow-host", "a.test", "--tls-intercept"], "tls_intercept without a secret binding"),
    (["-B", "wasm", "--allow-host", "a.test"], "network_allowlist"),
]


@pytest.mark.parametrize("flags,msg", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_fails_closed(testnet, flags, msg):
    r = ak("run", "--no-daemon", *flags, "--", "true")
    assert r.returncode in (2, 125), out(r)
    assert msg in out(r), out(r)


@pytest.mark.parametrize("backend", ENFORCING)
def test_killed_cli_leaves_no_network_behind(testnet, backend):
    """SIGKILL the owning CLI mid-run: the next agentkernel command reaps the sandbox and its namespace,
    registration and address lease."""
    import signal
    import time

    from agentkernel.egress import netns

    d = netns.state_dir()
    before = set(os.listdir(os.path.join(d, "by-id")))
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--no-daemon", *bflags(backend), "--network",
                          "--", "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    new: set[str] = set()
    for _ in range(300):
        new = set(os.listdir(os.path.join(d, "by-id"))) - before
        if new and all(os.path.exists(f"/run/netns/ak-{s}") for s in new):
            break
        time.sleep(0.05)
    assert new, "the sandbox never attached"
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = ak("list")
    assert r.returncode == 0, out(r)
    for s in new:
        assert not os.path.exists(f"/run/netns/ak-{s}")
        assert not os.path.exists(os.path.join(d, "by-id", s))


def test_attach_refuses_a_process_in_the_hosts_namespace():
    """A runtime that ignored the spec's empty namespace (runsc --network=host with no namespace in the
    spec) would leave the sandbox in the host's network: completing the attachment refuses it rather
    than installing the sandbox's firewall and route in the host's namespace."""
    from agentkernel.egress.attach import _check_own_namespace
    from agentkernel.errors import SandboxError

    with pytest.raises(SandboxError, match="host's network namespace"):
        _check_own_namespace(os.getpid())
    other = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        import time

        for _ in range(100):  # until unshare has exec'd sleep in its new namespace
            if os.readlink(f"/proc/{other.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.02)
        _check_own_namespace(other.pid)
    finally:
        other.kill()
        other.wait()


def test_no_netns_left_behind(testnet):
    from agentkernel.egress import netns

    d = netns.state_dir()
    assert os.listdir(os.path.join(d, "sb")) == []
    assert os.listdir(os.path.join(d, "leases")) == []


def test_allowlist_through_the_daemon(testnet):
    """The daemon's path (pool members created by the daemon, the CLI running the command through the
    member's agent) enforces the same rules; the daemon's installation has its own bridge and gateway."""
    import tempfile

    root = tempfile.mkdtemp(prefix="ak-egress-daemon-")
    env = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"), "AGENTKERNEL_HOME": os.path.join(root, "home"),
           "AGENTKERNEL_NO_DAEMON": "0"}
    r = ak("daemon", "start", "--pool-min", "0", "--pool-max", "2", env=env)
    assert r.returncode == 0, out(r)
    try:
        for _ in range(2):  # the second run may be served by a member the first one's demand warmed
            r = ak("run", "-i", IMAGE, "--allow-host", "allowed.test", "--", "python3", "-c", CLIENT,
                   "get:http://allowed.test/daemon", "get:http://other.test/", f"tcp:{testnet.addr}:80", env=env,
                   timeout=90)
            text = out(r)
            assert r.returncode == 0, text
            assert "GET-OK get:http://allowed.test/daemon" in text, text
            assert "GET-FAIL get:http://other.test/" in text and f"CLOSED tcp:{testnet.addr}:80" in text, text
        st = json.loads(ak("daemon", "status", "--json", env=env).stdout)
        assert any(p["metrics"].get("hits", 0) + p["metrics"].get("misses", 0) for p in st["pools"]), st
    finally:
        ak("daemon", "stop", env=env)
        subprocess.run([sys.executable, "-c", "from agentkernel.egress import gateway_ctl, netns; "
                        "gateway_ctl.stop(); netns.remove_bridge()"], env=dict(os.environ, **env), check=False)


@pytest.mark.parametrize("backend", ENFORCING)
def test_sandbox_cannot_rewire_its_network(testnet, backend, tmp_path):
    """Even as uid 0 inside (capabilities dropped), the sandbox cannot add addresses (spoof), change
    routes, or take its interface down; a new user+network namespace of its own is empty."""
    (tmp_path / "agentkernel.toml").write_text('[security]\nuser = "0"\n')
    script = ("ip addr add 10.99.99.99/32 dev eth0 2>/dev/null && echo ADDR-CHANGED; "
              "ip route replace default dev eth0 2>/dev/null && echo ROUTE-CHANGED; "
              "ip link set eth0 down 2>/dev/null && echo LINK-CHANGED; "
              "unshare -rn sh -c 'ip -o link | grep -v lo: ; ip route' 2>/dev/null | grep . && echo NS-HAS-NET; "
              "id -u; echo DONE")
    r = ak("run", "--no-daemon", *bflags(backend), "--config", str(tmp_path / "agentkernel.toml"), "--allow-host",
           "allowed.test", "--", "sh", "-c", script)
    text = out(r)
    assert "DONE" in text and "\n0\n" in "\n" + r.stdout.decode(), text
    for bad in ("ADDR-CHANGED", "ROUTE-CHANGED", "LINK-CHANGED", "NS-HAS-NET"):
        assert bad not in text, text


@pytest.mark.parametrize("backend", ENFORCING)
def test_tls_intercept_substitutes_only_for_the_bound_host(testnet, backend):
    """--tls-intercept: the sandbox verifies the gateway's certificate for the bound host against its
    own per-sandbox CA (name-constrained to that host), the bound host gets the value over verified TLS;
    TLS to any other host passes through untouched (placeholder only)."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("cryptography")
    value = "tls-secret-" + os.urandom(4).hex()
    assert ak("secret", "set", "TLS_TOKEN", input=value.encode()).returncode == 0
    testnet.clear()
    probes = ["getv:https://bound.test/intercepted|H=Authorization=Bearer $T",
              "get:https://unbound.test/passthrough|H=Authorization=Bearer $T",
              "getv:https://unbound.test/verify-other",  # the sandbox CA cannot vouch for unbound.test
              "file:/.ak/egress-ca.pem"]
    script = 'T="$TLS_TOKEN"; exec python3 -c "$0" ' + " ".join(f'"{p}"' for p in probes)
    r = ak("run", "--no-daemon", *bflags(backend), "-i", IMAGE, "--allow-host", "bound.test", "--allow-host",
           "unbound.test", "--secret", "TLS_TOKEN:bound.test", "--tls-intercept", "--", "sh", "-c", script, CLIENT,
           timeout=run_timeout(backend))
    text = out(r)
    assert r.returncode == 0, text
    assert "GET-OK getv:https://bound.test/intercepted" in text, text
    assert "GET-OK get:https://unbound.test/passthrough" in text, text
    assert "GET-FAIL getv:https://unbound.test/verify-other" in text, text  # the test host's own cert: untrusted
    assert "FILE file:/.ak/egress-ca.pem 1" in text, text
    assert value not in text
    heads = {e["head"].split(" ")[1]: e["head"] for e in testnet.events() if e["kind"] == "http"}
    assert f"Bearer {value}" in heads["/intercepted"], heads
    assert value not in heads["/passthrough"], heads
    assert any(e.get("host") == "bound.test" for e in audit_events("network.tls_intercepted"))


@pytest.mark.parametrize("backend", ENFORCING)
def test_named_sandbox_keeps_its_rules_across_stop_start(testnet, backend):
    from agentkernel.egress import netns

    name = f"egress-named-{backend}"
    r = ak("create", name, *bflags(backend), "--allow-host", "allowed.test", "--start")
    assert r.returncode == 0, out(r)
    sid = json.loads(ak("list", "--json").stdout)[0]["id"]
    try:
        for _ in range(2):
            r = ak("exec", name, "--", "sh", "-c", "nslookup allowed.test >/dev/null && echo A-OK; "
                   "nslookup other.test >/dev/null 2>&1 || echo O-REFUSED; " + f"nc -w 2 {testnet.addr} 80 </dev/null "
                   "&& echo DIRECT-OPEN || echo DIRECT-CLOSED")
            text = out(r)
            assert "A-OK" in text and "O-REFUSED" in text and "DIRECT-CLOSED" in text, text
            rs = ak("stop", name)
            assert rs.returncode == 0, out(rs)
            assert ak("start", name).returncode == 0
    finally:
        r = ak("rm", name)
    assert r.returncode == 0, out(r)
    d = netns.state_dir()
    assert os.listdir(os.path.join(d, "sb")) == [] and os.listdir(os.path.join(d, "by-id")) == []
    assert not os.path.exists(f"/run/netns/ak-{netns.short_id(sid)}")


def test_in_process_sandbox_api(testnet):
    """The Python API takes the same network settings (allow_hosts implies allowlist)."""
    import asyncio

    from agentkernel.sandbox import Sandbox

    async def main():
        async with Sandbox(backend="podman", image=IMAGE, allow_hosts=["allowed.test"]) as sb:
            return await sb.exec(["python3", "-c", CLIENT, "get:http://allowed.test/inproc", "get:http://other.test/"])

    r = asyncio.run(main())
    text = r.stdout.decode()
    assert r.exit_code == 0 and "GET-OK get:http://allowed.test/inproc" in text, text
    assert "GET-FAIL get:http://other.test/" in text, text
