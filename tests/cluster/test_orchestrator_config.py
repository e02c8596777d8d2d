"""[orchestrator]: the reference's keys are accepted and reach the backends (pod spec, job spec, pools,
limits); precedence is options > environment > file > defaults; bad values are refused by name."""

from __future__ import annotations

import asyncio

import pytest

from agentkernel.backends import _kube_manifest as km
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.backends.nomad import NomadBackend
from agentkernel.config import load_config, orchestrator_settings
from agentkernel.errors import ConfigError, PolicyNotEnforceable, SandboxError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Policy, Resources, SandboxSpec

from .conftest import IMAGE

REFERENCE_TOML = """
[orchestrator]
provider = "kubernetes"
namespace = "sandboxes"
kubeconfig = "~/.kube/other"
context = "k3s-default"
runtime_class = "gvisor"
service_account = "agentkernel-sandbox"
node_selector = { "pool" = "agents" }
nomad_addr = "http://nomad.internal:4646"
nomad_token = "secret"
nomad_driver = "exec"
nomad_datacenter = "dc2"
warm_pool_size = 5
max_pool_size = 20
warm_pool_images = ["agentkernel/busybox"]
max_sandboxes = 100
"""


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "agentkernel.toml"
    p.write_text(REFERENCE_TOML)
    return load_config(str(p))


def test_reference_keys_parse_and_resolve(cfg):
    s = orchestrator_settings(config=cfg, environ={})
    assert (s["namespace"], s["runtime_class"], s["node_selector"], s["nomad_driver"], s["warm_pool_size"],
            s["max_pool_size"], s["max_sandboxes"]) == ("sandboxes", "gvisor", {"pool": "agents"}, "exec", 5, 20, 100)


def test_precedence_options_env_file(cfg):
    s = orchestrator_settings({"nomad_addr": "http://opt:1"}, config=cfg, environ={"NOMAD_ADDR": "http://env:2"})
    assert s["nomad_addr"] == "http://opt:1"
    s = orchestrator_settings(config=cfg, environ={"NOMAD_ADDR": "http://env:2", "NOMAD_TOKEN": "t2"})
    assert (s["nomad_addr"], s["nomad_token"]) == ("http://env:2", "t2")
    s = orchestrator_settings(config=cfg, environ={"NOMAD_NAMESPACE": "ns2"}, backend="nomad")
    assert s["namespace"] == "ns2"


@pytest.mark.parametrize("bad,match", [
    ({"nomad_driver": "raw_exec"}, "raw_exec"), ({"provider": "swarm"}, "provider"),
    ({"warm_pool_size": "9", "max_pool_size": "3"}, "exceeds"), ({"max_sandboxes": "x"}, "number"),
    ({"no_such_key": "1"}, "unknown orchestrator option"),
])
def test_bad_values_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        orchestrator_settings(bad, config={}, environ={})


def test_unknown_key_in_file_is_refused(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text("[orchestrator]\nnamespaces = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key 'namespaces' in \\[orchestrator\\]"):
        load_config(str(p))


def test_kubernetes_settings_reach_the_pod(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTKERNEL_CONFIG", str(tmp_path / "agentkernel.toml"))
    (tmp_path / "agentkernel.toml").write_text(REFERENCE_TOML)
    b = KubernetesBackend({"tolerations": "dedicated=agents:NoSchedule", "pod_pids_limit": "128"})
    spec = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=256))
    b.check(spec)  # podPidsLimit 128 <= 256 asked: enforced
    with pytest.raises(PolicyNotEnforceable, match="podPidsLimit"):
        b.check(SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=64)))
    pod = km.pod(spec, b.settings, name="p", namespace=b.namespace, labels={}, annotations={})
    ps = pod["spec"]
    assert (pod["metadata"]["namespace"], ps["runtimeClassName"], ps["serviceAccountName"], ps["nodeSelector"]) == \
        ("sandboxes", "gvisor", "agentkernel-sandbox", {"pool": "agents"})
    assert ps["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "agents", "effect": "NoSchedule"}]
    assert ps["automountServiceAccountToken"] is False


def test_nomad_settings_reach_the_job(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTKERNEL_CONFIG", str(tmp_path / "agentkernel.toml"))
    (tmp_path / "agentkernel.toml").write_text(REFERENCE_TOML)
    monkeypatch.delenv("NOMAD_ADDR", raising=False)
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    b = NomadBackend({"nomad_region": "eu"})
    spec = SandboxSpec(backend="nomad", image=IMAGE, policy=Policy(read_only_root=False),
                       resources=Resources(pids=None))

    async def go():
        try:
            return b.job(spec, "ak-x", {"m": "1"}), b._api()
        finally:
            await b.aclose()

    job, api = asyncio.run(go())
    assert (api.addr, api.token, api.namespace, api.region) == \
        ("http://nomad.internal:4646", "secret", "sandboxes", "eu")
    assert job["Datacenters"] == ["dc2"] and job["Namespace"] == "sandboxes" and job["Region"] == "eu"
    assert job["TaskGroups"][0]["Tasks"][0]["Driver"] == "exec"
    assert job["TaskGroups"][0]["Networks"] == [{"Mode": "none"}]
    # the exec driver has no read-only root or pids limit: such specs are refused, not weakened
    with pytest.raises(PolicyNotEnforceable, match="read_only_root"):
        b.check(SandboxSpec(backend="nomad", image=IMAGE, policy=Policy(read_only_root=True),
                            resources=Resources(pids=None)))


@pytest.mark.wire
@pytest.mark.timeout(120)
def test_max_sandboxes_is_enforced(kube):
    spec = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64))

    async def go():
        probe = KubernetesBackend(kube.options())
        live = len([i for i in await probe.list() if i.status != "stopped"])
        await probe.aclose()
        b = KubernetesBackend(kube.options(max_sandboxes=str(live + 1)))
        ref = await b.create(spec, sandbox_id=new_id("cap"), owner=current_owner())
        try:
            with pytest.raises(SandboxError, match="max_sandboxes"):
                await b.create(spec, sandbox_id=new_id("cap"), owner=current_owner())
        finally:
            await b.remove(ref)
            await b.aclose()

    asyncio.run(go())
