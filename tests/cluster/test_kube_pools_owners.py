"""Warm-pool claims (many concurrent claimers, one winner per pod), the v4 exec fallback, agent-sandbox
claims, and cleanup when the owner dies (journal reaping; ownerReferences garbage collection)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from agentkernel.backends import _kube_manifest as km
from agentkernel.backends._kube_api import ApiError
from agentkernel.backends.base import ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Resources, SandboxSpec

from .conftest import IMAGE

pytestmark = [pytest.mark.wire, pytest.mark.timeout(180)]


def pool_spec(tag: str) -> SandboxSpec:
    # a distinct spec (env) per test: its own pool key
    return SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64),
                       env={"POOL_TEST": tag})


def test_pool_claims_race_one_winner_per_pod(kube):
    s = pool_spec(new_id("race"))
    size, claimers = 3, 12

    async def go():
        filler = KubernetesBackend(kube.options())
        assert await filler.fill_pool(s, size) == size
        assert await filler.fill_pool(s, size) == 0  # already full
        # separate backend objects = separate API clients, as separate server replicas would be
        backends = [KubernetesBackend(kube.options()) for _ in range(claimers)]
        refs = await asyncio.gather(*(b.claim(s, sandbox_id=new_id("claim"), owner=current_owner())
                                      for b in backends))
        won = [r for r in refs if r is not None]
        pods = [r.handle["pod"] for r in won]
        # exactly one claimer per pod, every pod claimed once
        assert len(won) == size and len(set(pods)) == size
        found = await filler._api().request("GET", filler._path("pods"),
                                            params={"labelSelector": f"{km.LABEL_POOL}={s.pool_key()}"})
        states = {p["metadata"]["name"]: p["metadata"]["labels"][km.LABEL_POOL_STATE] for p in found["items"]}
        assert states == dict.fromkeys(pods, "claimed")
        # the claimed pod is the claimer's sandbox: it runs commands, and goes with remove
        await filler.start(won[0])
        r = await filler.exec(won[0], ExecRequest(["sh", "-c", "echo $POOL_TEST"]))
        assert r.stdout.strip() == s.env["POOL_TEST"].encode()
        for ref in won:
            await filler.remove(ref)
        for b in [*backends, filler]:
            await b.aclose()

    asyncio.run(go())


def test_stale_resource_version_conflicts(kube):
    s = pool_spec(new_id("rv"))

    async def go():
        b = KubernetesBackend(kube.options())
        await b.fill_pool(s, 1)
        found = await b._api().request("GET", b._path("pods"),
                                       params={"labelSelector": f"{km.LABEL_POOL}={s.pool_key()}"})
        pod = found["items"][0]["metadata"]
        patch = {"metadata": {"resourceVersion": pod["resourceVersion"], "labels": {"x": "first"}}}
        await b._api().request("PATCH", b._path("pods", pod["name"]), body=patch,
                               content_type="application/merge-patch+json")
        with pytest.raises(ApiError) as err:  # same (now stale) resourceVersion: 409
            await b._api().request("PATCH", b._path("pods", pod["name"]), body=patch,
                                   content_type="application/merge-patch+json")
        assert err.value.status == 409
        ref = await b.claim(s, sandbox_id=new_id("rv"), owner=current_owner())
        assert ref is not None  # a claim re-reads, so it still wins
        await b.remove(ref)
        await b.aclose()

    asyncio.run(go())


def test_create_claims_from_warm_pool_and_refills(kube):
    s = pool_spec(new_id("warm"))

    async def go():
        b = KubernetesBackend(kube.options(warm_pool_size="1"))
        await b.fill_pool(s)
        ref = await b.create(s, sandbox_id=new_id("warm"), owner=current_owner())
        assert ref.handle["pod"].startswith("ak-pool-")
        await b.start(ref)
        assert (await b.exec(ref, ExecRequest(["true"]))).exit_code == 0
        await b.aclose()  # waits for the background refill
        found = await b._api().request("GET", b._path("pods"), params={
            "labelSelector": f"{km.LABEL_POOL}={s.pool_key()},{km.LABEL_POOL_STATE}=free"})
        assert len(found["items"]) == 1
        await b.remove(ref)
        for p in found["items"]:
            await b.remove(type(ref)("kubernetes", "x", {"namespace": kube.namespace,
                                                          "pod": p["metadata"]["name"]}, s))
        await b.aclose()

    asyncio.run(go())


CHILD = r"""
import asyncio, os, sys, time
from agentkernel import owner
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.spec import Resources, SandboxSpec

async def main():
    b = KubernetesBackend({"kubeconfig": sys.argv[1], "namespace": sys.argv[2]})
    sid = owner.new_id("orphan")
    owner.claim("kubernetes", sid, {"container": "agentkernel-" + sid})  # as the manager does, before create
    s = SandboxSpec(backend="kubernetes", image=sys.argv[3], resources=Resources(pids=None, memory_mb=64))
    ref = await b.create(s, sandbox_id=sid, owner=owner.current_owner())
    print(sid, ref.handle["pod"], flush=True)
    time.sleep(600)

asyncio.run(main())
"""


def test_owner_death_is_reaped(kube, tmp_path, monkeypatch):
    """The owner process is SIGKILLed after creating its sandbox: the next command's journal reap (here
    called directly) removes the pod and its NetworkPolicy."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kube.kubeconfig, kube.namespace, IMAGE],
                            stdout=subprocess.PIPE, text=True)
    sid, _pod = proc.stdout.readline().split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig)
    monkeypatch.setenv("AGENTKERNEL_CONFIG", str(tmp_path / "agentkernel.toml"))
    (tmp_path / "agentkernel.toml").write_text(f'[orchestrator]\nnamespace = "{kube.namespace}"\n')

    async def listed():
        b = KubernetesBackend()
        try:
            return {i.id: i for i in await b.list()}
        finally:
            await b.aclose()

    info = asyncio.run(listed())[sid]
    from agentkernel.backends.base import owner_from_labels
    from agentkernel.owner import is_dead, reap_dead

    assert is_dead(owner_from_labels(info.labels))  # what `gc` decides from the cluster's labels alone
    assert reap_dead() >= 1
    assert sid not in asyncio.run(listed())


def test_owner_pod_garbage_collects_sandboxes(kube, monkeypatch):
    """In-cluster, the server's own pod owns what it creates: deleting it (the server dies for good)
    makes the cluster's garbage collector delete the sandbox pod and its NetworkPolicy."""

    async def go():
        b = KubernetesBackend(kube.options())
        api = b._api()
        owner_name = km.pod_name(new_id("server"))
        body = km.pod(pool_spec("server"), {}, name=owner_name, namespace=kube.namespace, labels={}, annotations={})
        owner_pod = await api.request("POST", b._path("pods"), body=body)
        monkeypatch.setenv("AGENTKERNEL_OWNER_POD_NAME", owner_name)
        monkeypatch.setenv("AGENTKERNEL_OWNER_POD_UID", owner_pod["metadata"]["uid"])
        monkeypatch.setenv("AGENTKERNEL_OWNER_POD_NAMESPACE", kube.namespace)
        ref = await b.create(pool_spec("owned"), sandbox_id=new_id("owned"), owner=current_owner())
        pod = await api.request("GET", b._path("pods", ref.handle["pod"]))
        assert pod["metadata"]["ownerReferences"][0]["uid"] == owner_pod["metadata"]["uid"]
        await api.request("DELETE", b._path("pods", owner_name), body={"gracePeriodSeconds": 0})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = await api.request("GET", b._path("pods", ref.handle["pod"]), allow=(404,))
            n = await api.request("GET", b._path("networkpolicies", ref.handle["pod"]), allow=(404,))
            if p is None and n is None:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the sandbox outlived its owner pod")
        await b.aclose()

    asyncio.run(go())


def test_v4_fallback_exact_codes_and_stdin(kube):
    """A server that speaks only v4.channel.k8s.io: stdin cannot be closed there, so the command sees EOF
    after exactly the bytes sent (emulator only: a real cluster's protocol set cannot be chosen)."""
    if kube.emulator is None:
        pytest.skip("needs the emulator to restrict the exec protocols")
    s = pool_spec("v4")

    async def go():
        b = KubernetesBackend(kube.options())
        ref = await b.create(s, sandbox_id=new_id("v4"), owner=current_owner())
        await b.start(ref)
        kube.emulator.protocols = ("v4.channel.k8s.io",)
        try:
            r = await b.exec(ref, ExecRequest(["sh", "-c", "cat; exit 9"], stdin=b"abc\x00def"))
            assert (r.exit_code, r.stdout) == (9, b"abc\x00def")
            r = await b.exec(ref, ExecRequest(["wc", "-c"]))
            assert r.stdout.strip() == b"0"
        finally:
            kube.emulator.protocols = ("v5.channel.k8s.io", "v4.channel.k8s.io")
            await b.remove(ref)
            await b.aclose()

    asyncio.run(go())
