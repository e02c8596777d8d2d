"""Cluster fixtures: a real cluster when KUBECONFIG / NOMAD_ADDR point at one, else the emulators in
tests/emulators (test tools: API servers speaking the real wire protocol whose pods/allocations are podman
containers). The tests themselves do not know which they talk to."""

from __future__ import annotations

import os
import shutil

import pytest

REAL_K8S = bool(os.environ.get("KUBECONFIG"))
REAL_NOMAD = bool(os.environ.get("NOMAD_ADDR"))
K8S_NAMESPACE = os.environ.get("AGENTKERNEL_TEST_K8S_NAMESPACE", "agentkernel")
IMAGE = os.environ.get("AGENTKERNEL_TEST_CLUSTER_IMAGE", "agentkernel/busybox")


def _need_podman() -> None:
    if shutil.which("podman") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("podman is required for the cluster emulators")
        pytest.skip("podman is not installed (the emulators run pods as podman containers)")


class KubeTarget:
    def __init__(self, kubeconfig: str, namespace: str, emulator=None, server=None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.emulator = emulator  # None on a real cluster
        self.server = server

    def options(self, **extra: str) -> dict[str, str]:
        return {"kubeconfig": self.kubeconfig, "namespace": self.namespace, **extra}


@pytest.fixture(scope="session")
def kube(tmp_path_factory):
    if REAL_K8S:
        yield KubeTarget(os.environ["KUBECONFIG"], K8S_NAMESPACE)
        return
    _need_podman()
    from tests.emulators.kube_apiserver import Emulator

    emu = Emulator()
    server = emu.serve_in_thread()
    path = server.kubeconfig(str(tmp_path_factory.mktemp("kube") / "config"), namespace=K8S_NAMESPACE)
    try:
        yield KubeTarget(path, K8S_NAMESPACE, emu, server)
    finally:
        server.stop()


class NomadTarget:
    def __init__(self, addr: str, token: str | None, namespace: str, emulator=None) -> None:
        self.addr = addr
        self.token = token
        self.namespace = namespace
        self.emulator = emulator

    def options(self, **extra: str) -> dict[str, str]:
        o = {"nomad_addr": self.addr, "namespace": self.namespace, **extra}
        if self.token:
            o["nomad_token"] = self.token
        return o


NOMAD_TEST_TOKEN = "emulator-nomad-acl-token"


@pytest.fixture(scope="session")
def nomad():
    if REAL_NOMAD:
        yield NomadTarget(os.environ["NOMAD_ADDR"], os.environ.get("NOMAD_TOKEN"),
                          os.environ.get("NOMAD_NAMESPACE", "default"))
        return
    _need_podman()
    from tests.emulators.nomad_agent import NomadEmulator

    emu = NomadEmulator(token=NOMAD_TEST_TOKEN)
    server = emu.serve_in_thread()
    try:
        yield NomadTarget(server.url, NOMAD_TEST_TOKEN, "default", emu)
    finally:
        server.stop()


async def create_and_start(backend, spec) -> None:
    """create + start one sandbox (for start-time errors); removed and the backend closed whatever happens."""
    from agentkernel.owner import current_owner, new_id

    ref = await backend.create(spec, sandbox_id=new_id("bad"), owner=current_owner())
    try:
        await backend.start(ref)
    finally:
        await backend.remove(ref)
        await backend.aclose()


async def stop_start_remove(backend, ref) -> None:
    """The end of a lifecycle: stop, start again and run, remove (final, idempotent, gone from the listing)."""
    from agentkernel.backends.base import ExecRequest

    await backend.stop(ref)
    assert await backend.status(ref) == "stopped"
    await backend.start(ref)
    assert (await backend.exec(ref, ExecRequest(["true"]))).exit_code == 0
    await backend.remove(ref)
    assert await backend.status(ref) == "missing"
    await backend.remove(ref)  # idempotent
    assert ref.id not in {i.id for i in await backend.list()}
