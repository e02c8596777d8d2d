"""Where kubernetes-sigs/agent-sandbox is installed (discovery), a sandbox is a SandboxClaim on a
SandboxWarmPool of a SandboxTemplate per spec. Emulator only: its minimal controller stands in for the
project's (on a real cluster with the CRDs installed, the other tests take this path by themselves)."""

from __future__ import annotations

import asyncio

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Resources, SandboxSpec

from .conftest import IMAGE, _need_podman

pytestmark = [pytest.mark.wire, pytest.mark.timeout(120)]


def test_claims_on_a_warm_pool(tmp_path):
    _need_podman()
    from tests.emulators.kube_apiserver import Emulator

    emu = Emulator(agent_sandbox=True)
    server = emu.serve_in_thread()
    kc = server.kubeconfig(str(tmp_path / "kc"))
    spec = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64))

    async def go():
        b = KubernetesBackend({"kubeconfig": kc, "warm_pool_size": "2"})
        try:
            ref = await b.create(spec, sandbox_id=new_id("as"), owner=current_owner())
            assert ref.handle.get("claim")
            await b.start(ref)
            r = await b.exec(ref, ExecRequest(["sh", "-c", "cat; exit 5"], stdin=b"in"))
            assert (r.exit_code, r.stdout) == (5, b"in")
            api = b._api()
            key = f"ak-{spec.pool_key()}"
            tmpl = await api.request("GET", b._path("sandboxtemplates", key))
            assert tmpl["spec"]["networkPolicy"] == {"ingress": [], "egress": []}
            pool = await api.request("GET", b._path("sandboxwarmpools", key))
            assert pool["spec"] == {"replicas": 2, "sandboxTemplateRef": {"name": key}}
            pod = await api.request("GET", b._path("pods", ref.handle["pod"]))
            assert pod["metadata"]["labels"]["agentkernel.sandbox-id"] == ref.id  # the claim's pod metadata
            assert ref.id in {i.id for i in await b.list()}
            await b.remove(ref)
            assert await b.status(ref) == "missing"
            for _ in range(100):  # the controller deletes the claimed sandbox's pod
                if await api.request("GET", b._path("pods", ref.handle["pod"]), allow=(404,)) is None:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("claimed pod outlived its claim")
            free = await api.request("GET", b._path("sandboxes"))
            assert len([s for s in free["items"] if not s["metadata"]["labels"].get("agents.x-k8s.io/claimed")]) == 2
        finally:
            await b.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()
