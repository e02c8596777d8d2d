"""Allowlists and secrets on Kubernetes: a per-sandbox egress gateway pod + Service.

- the exact objects (on the emulator and on a real cluster): the sandbox's NetworkPolicy lets it reach
  the gateway pod only, its DNS is the gateway's Service, the Secret is mounted in the gateway pod only
  and the sandbox holds placeholders only; everything carries the sandbox's labels and goes with it;
- the gateway really works (emulator: its pod is a podman container running the shipped standard-library
  code with the debian image's python3): an allowed host is proxied, another refused, a secret substituted
  only for its bound host; destinations are the egress tests' own test host in a network namespace this
  test creates (tests/egress/conftest.py), resolved through its DNS server;
- bad input and fail-closed creation;
- ``real_cni``: a direct-IP connection from the sandbox pod fails. This proves the CNI enforces the
  NetworkPolicy, so it runs only when KUBECONFIG points at a real cluster (the emulator models the policy
  by the networks a pod is attached to, which proves nothing about a CNI).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest

from agentkernel.backends import _kube_egress as ke
from agentkernel.backends import _kube_manifest as km
from agentkernel.backends.base import LABEL_ID, ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.errors import NotFound, PolicyNotEnforceable, SandboxError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Policy, Resources, SandboxSpec
from tests.egress.conftest import probe_results

from .conftest import REAL_K8S

pytestmark = [pytest.mark.wire, pytest.mark.timeout(300)]

GATEWAY_IMAGE = os.environ.get("AGENTKERNEL_TEST_EGRESS_GATEWAY_IMAGE", "agentkernel/debian")
SANDBOX_IMAGE = os.environ.get("AGENTKERNEL_TEST_EGRESS_SANDBOX_IMAGE", "agentkernel/debian")
SECRET_VALUE = "s3cr3t-value-for-bound-host-only"
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "egress", "client_prog.py")) as _f:
    CLIENT = _f.read()


def run(coro):
    return asyncio.run(coro)


def on(b: KubernetesBackend, coro):
    """Run one coroutine on a new event loop, then close the backend's API client (bound to that loop)."""
    async def go():
        try:
            return await coro
        finally:
            await b.aclose()

    return run(go())


def started(b: KubernetesBackend, s: SandboxSpec, sid: str):
    async def up():
        ref = await b.create(s, sandbox_id=sid, owner=current_owner())
        await b.start(ref)
        return ref

    return on(b, up())


def spec(image: str = SANDBOX_IMAGE, **policy) -> SandboxSpec:
    return SandboxSpec(backend="kubernetes", image=image, resources=Resources(pids=None, memory_mb=256, vcpus=0.5),
                       policy=Policy(**policy))


@pytest.fixture(scope="module")
def testnet():
    if REAL_K8S:
        pytest.skip("the test host lives in a network namespace on this machine, out of a real cluster's reach")
    from tests.egress.conftest import make_testnet

    yield from make_testnet()


@pytest.fixture(scope="module")
def gw_options(kube, testnet):
    """Backend options: the gateway image, the test host's DNS as the gateways' resolver, and cluster
    ranges that cover the emulator's networks (podman's bridge, its service networks) but not the test
    host's 10.199.x.0/24."""
    from agentkernel.egress import secrets as store

    store.put("AK_K8S_TOKEN", SECRET_VALUE)
    return kube.options(egress_gateway_image=GATEWAY_IMAGE, egress_gateway_dns=f"{testnet.addr}:53",
                        egress_gateway_ca_file=os.environ["AGENTKERNEL_EGRESS_CA_FILE"],  # the test host's cert
                        cluster_cidrs="10.88.0.0/16,10.240.0.0/12", ready_timeout_s="120")


def probe(b: KubernetesBackend, ref, probes: list[str]) -> dict[str, str]:
    async def go():
        return await b.exec(ref, ExecRequest(["python3", "-c", CLIENT, *probes], timeout=120))

    r = on(b, go())
    text = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.exit_code == 0, text
    return probe_results(r.stdout, probes, text)


async def objects(b: KubernetesBackend, sandbox_id: str) -> dict[str, list[dict]]:
    sel = {"labelSelector": f"{LABEL_ID}={km.label_value(sandbox_id)}"}
    out = {}
    for kind in ("pods", "networkpolicies", "services", "configmaps", "secrets"):
        found = await b._api().request("GET", b._path(kind), params=sel)
        out[kind] = [o for o in found.get("items", []) if not o["metadata"].get("deletionTimestamp")]
    return out


@pytest.fixture(scope="module")
def allowlisted(gw_options):
    """One sandbox: allowlist allowed.test and bound.test, AK_K8S_TOKEN bound to bound.test."""
    b = KubernetesBackend(gw_options)
    s = spec(network=True, network_allow=["allowed.test", "bound.test"], secrets=["AK_K8S_TOKEN:bound.test"])
    sid = new_id("keg")

    ref = started(b, s, sid)
    yield b, ref

    on(b, b.remove(ref))


def test_objects_fence_the_sandbox_to_its_gateway(allowlisted):
    b, ref = allowlisted
    pod_name, gw = ref.handle["pod"], ke.gateway_name(ref.handle["pod"])

    async def go():
        return await objects(b, ref.id)

    objs = on(b, go())
    by = {k: {o["metadata"]["name"]: o for o in v} for k, v in objs.items()}
    assert set(by["pods"]) == {pod_name, gw}
    assert set(by["networkpolicies"]) == {pod_name, gw}
    assert set(by["services"]) == set(by["configmaps"]) == set(by["secrets"]) == {gw}
    # the sandbox may reach the gateway pod only, on its ports
    np_sb = by["networkpolicies"][pod_name]["spec"]
    assert np_sb["podSelector"] == {"matchLabels": {km.LABEL_POD: pod_name}}
    assert np_sb["ingress"] == []
    assert np_sb["egress"] == [{"to": [{"podSelector": {"matchLabels": {km.LABEL_POD: gw}}}],
                                "ports": [{"protocol": "TCP", "port": 3128}, {"protocol": "TCP", "port": 80},
                                          {"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 53}]}]
    # the gateway admits the sandbox pod only; its egress is open mode's (metadata and cluster ranges out)
    np_gw = by["networkpolicies"][gw]["spec"]
    assert np_gw["podSelector"] == {"matchLabels": {km.LABEL_POD: gw}}
    assert np_gw["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {km.LABEL_POD: pod_name}}}]
    v4 = np_gw["egress"][0]["to"][0]["ipBlock"]
    assert v4["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in v4["except"] and "10.88.0.0/16" in v4["except"]
    # the Service selects the gateway pod; the sandbox resolves through its clusterIP only
    svc = by["services"][gw]["spec"]
    assert svc["selector"] == {km.LABEL_POD: gw}
    ip = svc["clusterIP"]
    sb_pod, gw_pod = by["pods"][pod_name], by["pods"][gw]
    assert sb_pod["spec"]["dnsPolicy"] == "None"
    assert sb_pod["spec"]["dnsConfig"]["nameservers"] == [ip]
    env = {e["name"]: e.get("value") for e in sb_pod["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == env["https_proxy"] == f"http://{ip}:3128"
    assert env["AK_K8S_TOKEN"].startswith("AGENTKERNEL_SECRET_PLACEHOLDER_AK_K8S_TOKEN_")
    # the secret: in the Secret, mounted in the gateway pod only; nowhere in the sandbox pod or ConfigMap
    assert base64.b64decode(by["secrets"][gw]["data"]["AK_K8S_TOKEN"]).decode() == SECRET_VALUE
    assert SECRET_VALUE not in json.dumps(sb_pod) and SECRET_VALUE not in json.dumps(by["configmaps"][gw])
    assert not any("secret" in v for v in sb_pod["spec"].get("volumes", []))
    assert [v["secret"]["secretName"] for v in gw_pod["spec"]["volumes"] if "secret" in v] == [gw]
    assert gw_pod["spec"]["containers"][0]["image"] == GATEWAY_IMAGE
    assert gw_pod["spec"]["automountServiceAccountToken"] is False
    csc = gw_pod["spec"]["containers"][0]["securityContext"]
    assert csc["runAsNonRoot"] and csc["readOnlyRootFilesystem"] and csc["capabilities"] == {"drop": ["ALL"]}
    config = json.loads(by["configmaps"][gw]["data"]["config.json"])
    assert config["advertise"] == ip and config["allow"] == ["allowed.test", "bound.test"]
    assert "10.88.0.0/16" in config["blocked"]
    # gateways are not sandboxes: list() shows the one sandbox, under its id
    listed = [i for i in on(b, b.list()) if i.id == ref.id]
    assert [i.handle["pod"] for i in listed] == [pod_name]


def test_gateway_proxies_allowed_hosts_and_refuses_others(allowlisted, testnet):
    b, ref = allowlisted
    testnet.clear()
    ok = ["get:http://allowed.test/via-proxy", "get:https://allowed.test/tls-connect",
          "get:http://allowed.test/transparent|noproxy", "get:https://allowed.test/tls-sni|noproxy",
          "dns:allowed.test"]
    tunnel = "dns:" + "a" * 63 + "." + "b" * 63 + ".exfil.other.test"  # DNS tunnelling under an unlisted name
    refused = ["get:http://other.test/", "get:https://other.test/", "get:http://allowed.test:8080/",
               "get:http://169.254.169.254/latest/meta-data/", f"get:http://{testnet.addr}/", "dns:other.test",
               tunnel, f"tcp:{testnet.addr}:80"]  # the emulator's model of the policy: no route but to the gateway
    res = probe(b, ref, ok + refused)
    for p in ok:
        assert res[p].startswith(("GET-OK", "RESOLVED")), (p, res[p])
    assert "hello from test host on 80" in res["get:http://allowed.test/via-proxy"]
    assert "hello from test host on 443" in res["get:https://allowed.test/tls-connect"]
    svc_ip = on(b, _service_ip(b, ref))
    assert res["dns:allowed.test"] == f"RESOLVED ['{svc_ip}']"  # allowed names resolve to the gateway
    for p in refused:
        assert res[p].startswith(("GET-FAIL", "NXDOMAIN", "CLOSED")), (p, res[p])
    assert "403" in res["get:http://other.test/"]
    heads = [e["head"] for e in testnet.events() if e["kind"] == "http"]
    assert any("/via-proxy" in h for h in heads) and any("/transparent" in h for h in heads)
    assert not any("other.test" in h for h in heads)
    names = {e["name"] for e in testnet.events() if e["kind"] == "dns"}
    assert not any(n.endswith("other.test") for n in names), names  # denied queries go nowhere


async def _service_ip(b, ref) -> str:
    svc = await b._api().request("GET", b._path("services", ke.gateway_name(ref.handle["pod"])))
    return svc["spec"]["clusterIP"]


def test_secret_substituted_only_for_its_bound_host(allowlisted, testnet):
    b, ref = allowlisted
    testnet.clear()
    env = probe(b, ref, ["env:AK_K8S_TOKEN"])["env:AK_K8S_TOKEN"]
    ph = env.split()[-1]
    assert ph.startswith("AGENTKERNEL_SECRET_PLACEHOLDER_AK_K8S_TOKEN_") and SECRET_VALUE not in env
    res = probe(b, ref, [f"get:http://bound.test/bound|H=Authorization=Bearer {ph}",
                         f"get:http://allowed.test/unbound|H=Authorization=Bearer {ph}",
                         # plain HTTP to :443 through the proxy: the gateway speaks verified TLS itself
                         f"get:http://bound.test:443/bound-tls|H=Authorization=Bearer {ph}",
                         f"get:http://allowed.test:443/unbound-tls|H=Authorization=Bearer {ph}",
                         # HTTPS from the sandbox (CONNECT): end to end, nothing substituted inside TLS
                         f"get:https://bound.test/bound-connect|H=Authorization=Bearer {ph}"])
    assert all(v.startswith("GET-OK") for v in res.values()), res
    heads = {(e["port"], e["head"].split()[1]): e["head"] for e in testnet.events() if e["kind"] == "http"}
    assert f"Bearer {SECRET_VALUE}" in heads[(80, "/bound")]
    assert f"Bearer {SECRET_VALUE}" in heads[(443, "/bound-tls")]
    for key in ((80, "/unbound"), (443, "/unbound-tls"), (443, "/bound-connect")):
        assert SECRET_VALUE not in heads[key] and ph in heads[key], key
    # nothing in the sandbox's environment or files holds the value
    async def grep():
        return await b.exec(ref, ExecRequest(["sh", "-c", "env; cat /proc/1/environ; ls -R /run /etc 2>/dev/null"]))

    assert SECRET_VALUE.encode() not in on(b, grep()).stdout


def test_open_mode_with_a_secret_keeps_open_egress_and_substitutes_through_the_gateway(gw_options, testnet):
    """open + secret: the sandbox's policy keeps open mode's rules and adds its gateway (proxy variables
    point at it); the bound host gets the value through the proxy, a direct request only the placeholder."""
    b = KubernetesBackend(gw_options)
    sid = new_id("keg")

    ref = started(b, spec(network=True, secrets=["AK_K8S_TOKEN:bound.test"]), sid)
    try:
        testnet.clear()
        ph = probe(b, ref, ["env:AK_K8S_TOKEN"])["env:AK_K8S_TOKEN"].split()[-1]
        res = probe(b, ref, [f"get:http://bound.test/open-proxied|H=Authorization=Bearer {ph}",
                             f"get:http://bound.test/open-direct|noproxy|H=Authorization=Bearer {ph}",
                             "get:http://169.254.169.254/|noproxy"])
        assert res[f"get:http://bound.test/open-proxied|H=Authorization=Bearer {ph}"].startswith("GET-OK"), res
        assert res[f"get:http://bound.test/open-direct|noproxy|H=Authorization=Bearer {ph}"].startswith("GET-OK")
        assert res["get:http://169.254.169.254/|noproxy"].startswith("GET-FAIL")
        heads = {e["head"].split()[1]: e["head"] for e in testnet.events() if e["kind"] == "http"}
        assert f"Bearer {SECRET_VALUE}" in heads["/open-proxied"]
        assert SECRET_VALUE not in heads["/open-direct"] and ph in heads["/open-direct"]

        async def policy():
            return await b._api().request("GET", b._path("networkpolicies", ref.handle["pod"]))

        egress = on(b, policy())["spec"]["egress"]
        assert egress[0]["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
        gw = ke.gateway_name(ref.handle["pod"])
        assert egress[-1]["to"] == [{"podSelector": {"matchLabels": {km.LABEL_POD: gw}}}]
    finally:
        on(b, b.remove(ref))


def test_stop_start_keeps_the_gateway_and_remove_deletes_everything_and_imports_audit(gw_options, testnet):
    from agentkernel import paths

    b = KubernetesBackend(gw_options)
    s = spec(network=True, network_allow=["allowed.test"])
    sid = new_id("keg")

    async def lifecycle():
        ref = await b.create(s, sandbox_id=sid, owner=current_owner())
        await b.start(ref)
        await b.stop(ref)
        assert await b.status(ref) == "stopped"
        await b.start(ref)
        return ref

    ref = on(b, lifecycle())
    res = probe(b, ref, ["get:http://allowed.test/after-restart", "get:http://other.test/audited"])
    assert res["get:http://allowed.test/after-restart"].startswith("GET-OK")
    assert "403" in res["get:http://other.test/audited"]

    async def down():
        await b.remove(ref)
        return await objects(b, sid)

    left = on(b, down())
    assert all(v == [] for v in left.values()), left
    with open(paths.audit_path()) as f:
        events = [json.loads(line) for line in f]
    denied = [e for e in events if e.get("event") == "network.denied" and e.get("id") == sid]
    assert any(e.get("dest") == "other.test" and e.get("gateway") for e in denied), denied


def test_gc_reaps_a_gateway_left_by_a_crashed_create(gw_options):
    """A create that died after the sandbox's NetworkPolicy and gateway were made (no sandbox pod) is
    listed as a stopped sandbox, and removing it by id deletes the gateway with it."""
    from agentkernel.backends.base import SandboxRef

    b = KubernetesBackend(gw_options)
    sid = new_id("keg")
    s = spec(network=True, network_allow=["allowed.test"])

    async def go():
        ref = await b.create(s, sandbox_id=sid, owner=current_owner())
        name = ref.handle["pod"]
        await b._api().request("DELETE", b._path("pods", name), body={"gracePeriodSeconds": 0})
        await b._wait_gone(b.namespace, name)
        listed = {i.id: i for i in await b.list()}
        assert listed[sid].status == "stopped"
        await b.remove(SandboxRef("kubernetes", sid, {}, s))  # by id alone, as gc does
        return await objects(b, sid)

    left = on(b, go())
    assert all(v == [] for v in left.values()), left


def test_bad_input(kube, gw_options):
    # allowlist / secrets with no gateway image configured: refused, naming the setting
    plain = KubernetesBackend(kube.options())
    for pol in ({"network": True, "network_allow": ["api.example.com"]},
                {"network": True, "secrets": ["AK_K8S_TOKEN:api.example.com"]}):
        with pytest.raises(PolicyNotEnforceable) as ei:
            plain.check(spec(**pol))
        assert "egress_gateway_image" in (ei.value.hint or ""), ei.value.hint
    from agentkernel.errors import ConfigError

    for bad in ("resolver.example", "10.0.0.1:0", "10.0.0.1:dns", "[::1]:53"):
        with pytest.raises(ConfigError, match="egress_gateway_dns must be IPv4"):
            KubernetesBackend(dict(gw_options, egress_gateway_dns=bad))
    b = KubernetesBackend(gw_options)
    b.check(spec(network=True, network_allow=["allowed.test"]))  # enforceable with the image set
    with pytest.raises(PolicyNotEnforceable, match="tls_intercept"):
        b.check(spec(network=True, network_allow=["bound.test"], secrets=["AK_K8S_TOKEN:bound.test"],
                     tls_intercept=True))
    # a secret that does not exist: nothing is created
    sid = new_id("keg")

    async def missing():
        with pytest.raises(NotFound, match="NO_SUCH_SECRET"):
            await b.create(spec(network=True, network_allow=["bound.test"], secrets=["NO_SUCH_SECRET:bound.test"]),
                           sandbox_id=sid, owner=current_owner())
        return await objects(b, sid)

    assert all(v == [] for v in on(b, missing()).values())
    # an unreadable CA file or one without a certificate: nothing is created
    for path in ("/nonexistent/ca.pem", "/etc/hostname"):
        bad = KubernetesBackend(dict(gw_options, egress_gateway_ca_file=path))
        sid = new_id("keg")

        async def bad_ca(bad=bad, sid=sid):
            with pytest.raises(ConfigError, match="egress_gateway_ca_file"):
                await bad.create(spec(network=True, network_allow=["allowed.test"]), sandbox_id=sid,
                                 owner=current_owner())
            return await objects(bad, sid)

        assert all(v == [] for v in on(bad, bad_ca()).values())


def test_gateway_that_never_gets_ready_fails_closed(kube, gw_options):
    """An image without python3: the gateway cannot start, so no sandbox pod is made and nothing is left."""
    b = KubernetesBackend(dict(gw_options, egress_gateway_image="agentkernel/busybox", ready_timeout_s="60"))
    sid = new_id("keg")

    async def go():
        with pytest.raises(SandboxError, match="egress gateway did not become ready") as ei:
            await b.create(spec(network=True, network_allow=["allowed.test"]), sandbox_id=sid,
                           owner=current_owner())
        assert "fail closed" in str(ei.value)
        return await objects(b, sid)

    assert all(v == [] for v in on(b, go()).values())


@pytest.mark.real_cni
@pytest.mark.skipif(not REAL_K8S, reason="proves a CNI enforces NetworkPolicy: needs KUBECONFIG at a real cluster")
def test_direct_ip_from_the_sandbox_pod_fails_on_a_real_cni(kube):
    """On a real cluster: set AGENTKERNEL_TEST_EGRESS_GATEWAY_IMAGE (python3 >= 3.11) and
    AGENTKERNEL_TEST_DIRECT_IP (an address the nodes can reach; default 1.1.1.1). The sandbox pod's
    direct connections fail (to that IP, to metadata, to the API server's address in KUBECONFIG) and an
    unlisted name does not resolve."""
    b = KubernetesBackend(kube.options(egress_gateway_image=GATEWAY_IMAGE))
    direct = os.environ.get("AGENTKERNEL_TEST_DIRECT_IP", "1.1.1.1")
    sid = new_id("keg")

    ref = started(b, spec(network=True, network_allow=["example.com"]), sid)
    import socket
    import urllib.parse

    from agentkernel.backends._kube_api import load_connection

    api = urllib.parse.urlsplit(load_connection(kube.kubeconfig, None).host)
    api_ip = socket.gethostbyname(api.hostname)
    try:
        res = probe(b, ref, [f"tcp:{direct}:443", f"tcp:{direct}:80", "tcp:169.254.169.254:80",
                             f"tcp:{api_ip}:{api.port or 443}", "dns:example.org"])
        assert all(v.startswith(("CLOSED", "NXDOMAIN")) for v in res.values()), res
    finally:
        on(b, b.remove(ref))


def test_cli_allowlist_sandbox_and_live_network_log(kube, gw_options, testnet, tmp_path):
    """The user's path: `create --allow-host --secret`, exec, `logs --network` while it runs (read from the
    gateway pod), `rm`; config from agentkernel.toml."""
    from tests.conftest import ak

    cfg = tmp_path / "agentkernel.toml"
    cfg.write_text(
        "[orchestrator]\n"
        f'kubeconfig = "{kube.kubeconfig}"\nnamespace = "{kube.namespace}"\n'
        f'egress_gateway_image = "{GATEWAY_IMAGE}"\negress_gateway_dns = "{testnet.addr}:53"\n'
        'cluster_cidrs = ["10.88.0.0/16", "10.240.0.0/12"]\n'
        f"pod_pids_limit = {kube.emulator.pod_pids_limit if kube.emulator else 256}\n")
    env = {"AGENTKERNEL_CONFIG": str(cfg)}
    name = f"kegcli-{os.urandom(3).hex()}"
    r = ak("create", name, "-B", "kubernetes", "-i", SANDBOX_IMAGE, "--allow-host", "allowed.test",
           "--secret", "AK_K8S_TOKEN:allowed.test", "--start", env=env, timeout=180)
    assert r.returncode == 0, r.stderr.decode()
    try:
        r = ak("exec", name, "--", "python3", "-c", CLIENT, "get:http://allowed.test/cli", "get:http://other.test/cli",
               "env:AK_K8S_TOKEN", env=env, timeout=120)
        text = r.stdout.decode()
        assert r.returncode == 0, text + r.stderr.decode()
        assert "GET-OK get:http://allowed.test/cli 200" in text and "GET-FAIL get:http://other.test/cli" in text
        assert "AGENTKERNEL_SECRET_PLACEHOLDER_AK_K8S_TOKEN_" in text and SECRET_VALUE not in text
        r = ak("logs", name, "--network", env=env)
        assert r.returncode == 0, r.stderr.decode()
        assert "DENY  http: other.test:80  (not in allowlist)" in r.stdout.decode(), r.stdout.decode()
    finally:
        r = ak("rm", name, env=env, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
    r = ak("logs", name, "--network", "--json", env=env)
    events = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert any(e["event"] == "network.denied" and e.get("dest") == "other.test" and e.get("gateway")
               for e in events), events
    # a one-shot run, warm pool configured: a fresh pod behind its own gateway, gone afterwards
    before = run(_gateway_objects(kube))
    r = ak("run", "-B", "kubernetes", "-i", SANDBOX_IMAGE, "-o", "warm_pool_size=1", "--allow-host", "allowed.test",
           "--", "python3", "-c", CLIENT, "get:http://allowed.test/run", "dns:other.test", env=env, timeout=180)
    text = r.stdout.decode()
    assert r.returncode == 0, text + r.stderr.decode()
    from agentkernel import paths

    with open(paths.audit_path()) as f:
        tail = f.readlines()[-30:]
    assert "GET-OK get:http://allowed.test/run 200" in text and "NXDOMAIN dns:other.test" in text, (
        text + r.stderr.decode() + "".join(tail))
    assert run(_gateway_objects(kube)) == before


async def _gateway_objects(kube) -> set[tuple[str, str]]:
    """Every live egress-gateway object in the namespace, and every warm-pool pod."""
    b = KubernetesBackend(kube.options())
    try:
        found = set()
        for kind in ("pods", "services", "configmaps", "secrets", "networkpolicies"):
            for o in (await b._api().request("GET", b._path(kind))).get("items", []):
                labels = o["metadata"].get("labels") or {}
                if (ke.LABEL_GATEWAY in labels or km.LABEL_POOL in labels) and not o["metadata"].get(
                        "deletionTimestamp"):
                    found.add((kind, o["metadata"]["name"]))
        return found
    finally:
        await b.aclose()
