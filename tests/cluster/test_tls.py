"""TLS: both backends verify the server against the configured CA (kubeconfig certificate-authority-data;
[orchestrator] nomad_ca_cert) and refuse a server they cannot verify."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.backends.nomad import NomadBackend
from agentkernel.errors import AgentKernelError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Resources, SandboxSpec

from .conftest import IMAGE, _need_podman

pytestmark = [pytest.mark.wire, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
         "-subj", "/CN=agentkernel test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.crt",
         "-days", "1", "-extfile", "ext")
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt", "-days", "1",
         "-subj", "/CN=someone else")
    return d


def test_kubernetes_over_tls(pki, tmp_path):
    _need_podman()
    from tests.emulators.kube_apiserver import Emulator

    server = Emulator().serve_in_thread(certfile=str(pki / "srv.crt"), keyfile=str(pki / "srv.key"))
    try:
        server.ca_data = (pki / "ca.crt").read_bytes()
        good = server.kubeconfig(str(tmp_path / "good"))
        server.ca_data = (pki / "other.crt").read_bytes()
        bad = server.kubeconfig(str(tmp_path / "bad"))
        spec = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64))

        async def go(kc: str) -> int:
            b = KubernetesBackend({"kubeconfig": kc})
            try:
                ref = await b.create(spec, sandbox_id=new_id("tls"), owner=current_owner())
                try:
                    await b.start(ref)
                    return (await b.exec(ref, ExecRequest(["sh", "-c", "exit 4"]))).exit_code  # wss:// exec
                finally:
                    await b.remove(ref)
            finally:
                await b.aclose()

        assert asyncio.run(go(good)) == 4
        with pytest.raises(AgentKernelError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            asyncio.run(go(bad))
    finally:
        server.stop()


def test_nomad_over_tls(pki):
    _need_podman()
    from tests.emulators.nomad_agent import NomadEmulator

    server = NomadEmulator(token="t").serve_in_thread(certfile=str(pki / "srv.crt"), keyfile=str(pki / "srv.key"))
    spec = SandboxSpec(backend="nomad", image=IMAGE, resources=Resources(memory_mb=64))
    try:
        async def go(ca: str) -> int:
            b = NomadBackend({"nomad_addr": server.url, "nomad_token": "t", "nomad_ca_cert": ca,
                              "namespace": "default"})
            try:
                ref = await b.create(spec, sandbox_id=new_id("tls"), owner=current_owner())
                try:
                    await b.start(ref)
                    return (await b.exec(ref, ExecRequest(["sh", "-c", "exit 6"]))).exit_code
                finally:
                    await b.remove(ref)
            finally:
                await b.aclose()

        assert asyncio.run(go(str(pki / "ca.crt"))) == 6
        with pytest.raises(AgentKernelError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            asyncio.run(go(str(pki / "other.crt")))
    finally:
        server.stop()
