"""deploy/kubernetes and every manifest the backend generates validate against the real Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors); the Role in deploy/ holds exactly
the verbs the backend uses (the emulator enforces it: a missing verb is a 403, an extra one is never used)."""

from __future__ import annotations

import asyncio
import copy
import pathlib

import pytest
import yaml

from agentkernel.backends import _kube_manifest as km
from agentkernel.backends.base import ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.errors import SandboxError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Policy, Resources, SandboxSpec

from .conftest import IMAGE

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)


def deploy_docs() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_deploy_manifests_validate():
    docs = deploy_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"} <= kinds
    for d in docs:
        validate(d)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # the packaged config parses with agentkernel's own schema
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    import tomllib

    from agentkernel.config import orchestrator_settings

    cfg = tomllib.loads(cm["data"]["agentkernel.toml"])
    assert orchestrator_settings(config=cfg, environ={})["warm_pool_size"] == 2


SPECS = {
    "moderate": SandboxSpec(backend="kubernetes", image=IMAGE, env={"A": "b"}),
    "restrictive": SandboxSpec(backend="kubernetes", image=IMAGE, policy=Policy(profile="restrictive",
                               read_only_root=True, seccomp="restrictive"), resources=Resources(disk_mb=32)),
    "permissive": SandboxSpec(backend="kubernetes", image=IMAGE, policy=Policy(network=True, user="0"),
                              resources=Resources(vcpus=None, memory_mb=None, pids=None, disk_mb=100)),
}
SETTINGS = {"runtime_class": "gvisor", "service_account": "sandbox", "node_selector": {"pool": "sandboxes"},
            "tolerations": ["dedicated=sandbox:NoSchedule", "spot"], "seccomp_localhost_profile": "agentkernel.json"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_generated_manifests_validate(name):
    spec = SPECS[name]
    labels, ann = km.labels_and_annotations({"agentkernel.managed": "true", "agentkernel.store": "/root/x y"})
    pod = km.pod(spec, SETTINGS, name=km.pod_name("My_Sandbox-0123456789"), namespace="agentkernel", labels=labels,
                 annotations=ann, owner_refs=[{"apiVersion": "v1", "kind": "Pod", "name": "srv", "uid": "u"}])
    validate(pod)
    from agentkernel.spec import network_mode

    validate(km.network_policy(name="ak-x", namespace="agentkernel", mode=network_mode(spec.policy), labels=labels))
    tmpl = km.sandbox_template(spec, SETTINGS, name="ak-t", namespace="agentkernel", labels=labels)
    pod_of_template = tmpl["spec"]["podTemplate"]["spec"]
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": pod_of_template})
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is spec.policy.read_only_root
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert sc["runAsNonRoot"] is (spec.policy.user != "0")


def role_rules() -> list[dict]:
    return next(d for d in deploy_docs() if d["kind"] == "Role")["rules"]


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


async def egress_gateway(kubeconfig: str, namespace: str) -> None:
    """An allowlist sandbox with a secret (its own gateway): create, lose its pod, start again, remove."""
    from agentkernel.egress import secrets as store

    store.put("RBAC_TOKEN", "value")
    g = KubernetesBackend({"kubeconfig": kubeconfig, "namespace": namespace,
                           "egress_gateway_image": "agentkernel/debian"})
    gs = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64),
                     policy=Policy(network=True, network_allow=["allowed.test"], secrets=["RBAC_TOKEN:allowed.test"]))
    try:
        ref = await g.create(gs, sandbox_id=new_id("rbac"), owner=current_owner())
        await g.start(ref)
        await g._api().request("DELETE", g._path("pods", ref.handle["pod"]), body={"gracePeriodSeconds": 0})
        await g._wait_gone(namespace, ref.handle["pod"])
        await g.start(ref)  # a fresh pod behind the same gateway (its Service read back)
        await g.remove(ref)
    finally:
        await g.aclose()


def exercise(kubeconfig: str, namespace: str, agent_sandbox: bool) -> None:
    """Everything the backend does: pools, claims, lifecycle, exec, files, status, list, gc by id."""
    s = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64))

    async def go():
        b = KubernetesBackend({"kubeconfig": kubeconfig, "namespace": namespace, "warm_pool_size": "1"})
        try:
            if not agent_sandbox:
                await b.fill_pool(s)
            ref = await b.create(s, sandbox_id=new_id("rbac"), owner=current_owner())
            await b.start(ref)
            assert (await b.exec(ref, ExecRequest(["true"]))).exit_code == 0
            await b.write_file(ref, "/tmp/f", b"x")
            assert b"".join([c async for c in b.read_file(ref, "/tmp/f")]) == b"x"
            assert await b.status(ref) == "running"
            assert ref.id in {i.id for i in await b.list()}
            if not agent_sandbox:
                await b.stop(ref)
                await b.start(ref)
            await b.remove(ref)
            if not agent_sandbox:
                assert await b.status(ref) == "missing"  # no pod: the policy (the record) is asked too
            await b.aclose()  # the pool refill
            plain = await b.create(s.__class__.from_dict(dict(s.to_dict(), env={"X": "1"})),
                                   sandbox_id=new_id("rbac"), owner=current_owner())
            await b.remove(type(plain)("kubernetes", plain.id, {}, plain.spec))  # reaping: by id only
            if not agent_sandbox:
                await egress_gateway(kubeconfig, namespace)
                for i in await b.list():
                    await b.remove(type(plain)("kubernetes", i.id, i.handle, s))
        finally:
            await b.aclose()

    asyncio.run(go())


@pytest.mark.wire
@pytest.mark.timeout(180)
def test_role_has_exactly_the_verbs_used(tmp_path, monkeypatch):
    """Against emulators enforcing the Role for the service account: plain pods, then agent-sandbox CRDs.
    Every request is allowed, and every granted (group, resource, verb) is used by one of the two."""
    from tests.emulators.kube_apiserver import SA_TOKEN, Emulator

    from .conftest import _need_podman

    _need_podman()
    monkeypatch.setenv("AGENTKERNEL_SECRETS_DIR", str(tmp_path / "secrets"))
    monkeypatch.setenv("AGENTKERNEL_SECRETS_BACKEND", "file")
    used: set[tuple[str, str, str]] = set()
    for agent_sandbox in (False, True):
        emu = Emulator(role_rules=role_rules(), agent_sandbox=agent_sandbox)
        server = emu.serve_in_thread()
        try:
            kc = server.kubeconfig(str(tmp_path / f"kc-{agent_sandbox}"), token=SA_TOKEN)
            exercise(kc, "agentkernel", agent_sandbox)
            assert emu.denied == []
            used |= emu.used
        finally:
            server.stop()
    assert granted(role_rules()) - used == set(), "granted but never used"


@pytest.mark.wire
@pytest.mark.timeout(120)
def test_missing_verb_is_forbidden(tmp_path):
    from tests.emulators.kube_apiserver import SA_TOKEN, Emulator

    from .conftest import _need_podman

    _need_podman()
    rules = [dict(r, verbs=[v for v in r["verbs"] if v != "create"]) if r["resources"] == ["networkpolicies"] else r
             for r in role_rules()]
    emu = Emulator(role_rules=rules)
    server = emu.serve_in_thread()
    try:
        kc = server.kubeconfig(str(tmp_path / "kc"), token=SA_TOKEN)
        with pytest.raises(SandboxError, match="403 Forbidden"):
            exercise(kc, "agentkernel", False)
        assert ("networking.k8s.io", "networkpolicies", "create") in emu.denied
    finally:
        server.stop()


def test_emulator_is_only_a_test_tool():
    import re

    for path in (ROOT / "agentkernel").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+tests\b", path.read_text(), re.M), path


def test_egress_gateway_manifests_validate():
    """Every object of a sandbox's egress gateway, and the sandbox's pod and policy that point at it."""
    from agentkernel.backends import _kube_egress as ke

    spec = SandboxSpec(backend="kubernetes", image=IMAGE, policy=Policy(
        network=True, network_allow=["api.example.com", "*.pkg.example"], network_block=["bad.pkg.example"],
        secrets=["TOKEN:api.example.com:Authorization"]))
    settings = dict(SETTINGS, egress_gateway_image="python:3.12-alpine", egress_gateway_dns="10.0.0.10",
                    egress_gateway_ca_file="/etc/ssl/certs/ca-certificates.crt")
    name = km.pod_name("sb-0123456789")
    gw = ke.gateway_name(name)
    labels = ke.gateway_labels({"agentkernel.managed": "true", "agentkernel.id": "sb-0123456789"}, name)
    assert "agentkernel.managed" not in labels and labels[ke.LABEL_GATEWAY] == name
    owned = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "name": name, "uid": "u"}]
    config = ke.gateway_config(spec, "sb-0123456789", advertise="10.96.0.20", blocked=ke.cluster_blocked({}))
    assert config["secrets"][0]["placeholder"].startswith("AGENTKERNEL_SECRET_PLACEHOLDER_TOKEN_")
    assert "value" not in config["secrets"][0]
    cm = ke.config_map(name=gw, ns="agentkernel", labels=labels, config=config, owner_refs=owned,
                       ca_pem="-----BEGIN CERTIFICATE-----\n...")
    assert {f"code.{rel.replace('/', '.')}" for rel in ke.SHIPPED} | {"config.json", "ca.pem"} == set(cm["data"])
    assert sum(len(v) for v in cm["data"].values()) < 512 * 1024  # a ConfigMap holds at most 1 MiB
    gw_pod = ke.gateway_pod(settings, name=gw, ns="agentkernel", labels=labels, with_secrets=True, owner_refs=owned)
    for obj in (cm, ke.secret(name=gw, ns="agentkernel", labels=labels, values={"TOKEN": "v"}, owner_refs=owned),
                ke.service(name=gw, ns="agentkernel", labels=labels, owner_refs=owned), gw_pod,
                ke.gateway_network_policy(settings, name=gw, ns="agentkernel", sandbox_pod=name, labels=labels),
                km.network_policy(name=name, namespace="agentkernel", mode="allowlist", labels={},
                                  egress=ke.sandbox_egress_rules("allowlist", gw, settings)),
                km.pod(spec, settings, name=name, namespace="agentkernel", labels={}, annotations={},
                       extra_env=ke.sandbox_env(spec, "sb-0123456789", "10.96.0.20"),
                       extra_spec=ke.sandbox_dns("10.96.0.20"))):
        validate(obj)
    assert len(ke.gateway_name("ak-" + "x" * 60)) <= 63
    # CIDR allow entries are routed straight (minus metadata, the cluster's ranges and block entries)
    cidr = ke.sandbox_egress_rules("allowlist", gw, {"cluster_cidrs": ["10.0.0.0/8"]},
                                   ["api.example.com", "203.0.113.0/24:5432", "10.1.0.0/16", "0.0.0.0/0"],
                                   ["203.0.113.128/25"])
    validate(km.network_policy(name=name, namespace="agentkernel", mode="allowlist", labels={}, egress=cidr))
    assert cidr[1] == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}],
                       "ports": [{"protocol": "TCP", "port": 5432}, {"protocol": "UDP", "port": 5432}]}
    assert len(cidr) == 3  # 10.1.0.0/16 lies in the cluster's ranges: left out
    assert {"10.0.0.0/8", "169.254.0.0/16", "203.0.113.128/25"} <= set(cidr[2]["to"][0]["ipBlock"]["except"])
    # open mode with a secret keeps its open rules and adds the gateway
    rules = ke.sandbox_egress_rules("open", gw, {})
    assert rules[0]["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0" and rules[-1]["to"][0]["podSelector"]
