"""Regression tests for the bugs issue 12 found (each failed before its fix), and issue 11 item 5."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from agentkernel.backends import get_backend
from tests.conftest import ak, require_backend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- gVisor under docker: a real backend, and its seccomp applied ---------------------------------------


def test_gvisor_engine_docker_is_a_real_backend():
    from agentkernel.backends.base import AgentAccess, Backend, OneShot

    b = get_backend("gvisor", {"engine": "docker"})
    from agentkernel.backends.gvisor_docker import GVisorDockerBackend

    assert type(b) is GVisorDockerBackend and isinstance(b, Backend)
    assert b.name == "gvisor-docker" and b.options == {"engine": "docker"} and b._api is None  # __init__ ran
    assert isinstance(b, OneShot) and isinstance(b, AgentAccess)
    assert get_backend("gvisor-docker").name == "gvisor-docker"


def test_gvisor_docker_restrictive_seccomp_refuses_user_namespaces():
    """Issue 11 item 5, the attack as written: before the fix this printed uid=65534 and exited 0."""
    require_backend("gvisor-docker")
    r = ak("run", "-B", "gvisor", "-o", "engine=docker", "-p", "restrictive", "--", "unshare", "-U", "id",
           env={"AGENTKERNEL_NO_DAEMON": "1"})
    assert r.returncode != 0, r
    assert b"uid=" not in r.stdout and b"Operation not permitted" in r.stderr, r


def test_gvisor_docker_probe_refuses_a_runtime_without_oci_seccomp():
    """A backend may only declare seccomp when its runtime applies it: dockerd's plain ``runsc`` runtime
    (no --oci-seccomp) must make the backend unavailable, not silently unenforced."""
    require_backend("gvisor-docker")
    from agentkernel.backends.gvisor_docker import GVisorDockerBackend

    class PlainRunsc(GVisorDockerBackend):
        docker_runtime = "runsc"

    a = PlainRunsc.probe()
    assert not a.available and "--oci-seccomp" in a.reason, a.to_dict()


def test_gvisor_docker_refuses_network_without_its_network_runtime():
    """Network modes need dockerd's second runsc runtime (--network=host, entered only inside the egress
    namespace). Missing, or registered with the wrong network flag, the backend refuses them with the
    reason (fail closed); network none is unaffected. The real registration is what tests/egress uses."""
    require_backend("gvisor-docker")
    from agentkernel.backends.gvisor_docker import GVisorDockerBackend, flag_problems, net_runtime_status
    from agentkernel.config import resolve_spec
    from agentkernel.errors import PolicyNotEnforceable

    class Unregistered(GVisorDockerBackend):
        docker_net_runtime = "runsc-agentkernel-not-registered"

    class NetworkNone(GVisorDockerBackend):  # registered, but with --network=none baked in
        docker_net_runtime = "runsc-agentkernel"

    allow = resolve_spec({"backend": "gvisor-docker"}, environ={},
                         config={"security": {"network": "allowlist", "network_allow": ["a.test"]}})
    open_ = resolve_spec({"backend": "gvisor-docker", "network": True}, environ={})
    none = resolve_spec({"backend": "gvisor-docker"}, environ={})
    for cls, why in ((Unregistered, "has no runtime 'runsc-agentkernel-not-registered'"),
                     (NetworkNone, "lacks --network=host")):
        for spec, mode in ((allow, "allowlist"), (open_, "open")):
            with pytest.raises(PolicyNotEnforceable) as ei:
                cls().check(spec)
            msg = str(ei.value.message)
            assert f"cannot enforce network mode {mode}" in msg and why in msg, msg
            assert "agentkernel setup" in (ei.value.hint or ""), ei.value.hint
        cls().check(none)
    assert "--network=none (conflicts)" in net_runtime_status("runsc-agentkernel")[1]
    assert flag_problems(["--network=none", "--network=host", "--platform=ptrace", "--oci-seccomp",
                          "--host-uds=create"], ("network=host", "platform=ptrace", "oci-seccomp",
                                                 "host-uds=create")) == ["--network=none (conflicts)"]


# ---- serve --config: [pool] and [[pool.warm]] come from the given file --------------------------------


def test_service_takes_pools_from_its_config_not_the_working_directory(tmp_path, monkeypatch):
    require_backend("wasm")
    (tmp_path / "agentkernel.toml").write_text('[pool]\nmin = 5\n[[pool.warm]]\nbackend = "docker"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGENTKERNEL_DAEMON_SOCKET", str(tmp_path / "d.sock"))
    from agentkernel.api.service import Service

    cfg = {"pool": {"min": 1, "warm": [{"backend": "wasm", "min": 1}]}}
    svc = Service(config=cfg)

    async def go():
        await svc.start()
        try:
            return [(s.backend, c.min_size) for s, c in svc.daemon.warm], svc.daemon.pool_defaults.min_size
        finally:
            await svc.close()

    warm, default_min = asyncio.run(go())
    assert warm == [("wasm", 1)] and default_min == 1


# ---- [daemon] socket is honoured -------------------------------------------------------------------------


def test_daemon_socket_from_config(tmp_path):
    require_backend("wasm")
    sock = str(tmp_path / "ak-daemon.sock")
    (tmp_path / "agentkernel.toml").write_text(
        f'[daemon]\nsocket = "{sock}"\n[[pool.warm]]\nbackend = "wasm"\nmin = 1\n')
    env = {"AGENTKERNEL_DAEMON_SOCKET": "", "AGENTKERNEL_NO_DAEMON": ""}
    r = ak("daemon", "start", cwd=str(tmp_path), env=env)
    try:
        assert r.returncode == 0, r
        assert os.path.exists(sock), r
        st = ak("daemon", "status", "--json", cwd=str(tmp_path), env=env)
        assert json.loads(st.stdout)["socket"] == sock
        before = json.loads(st.stdout)["runs"]
        run = ak("run", "-B", "wasm", "--", "echo", "hi", cwd=str(tmp_path), env=env)
        assert (run.returncode, run.stdout) == (0, b"hi\n"), run
        st = ak("daemon", "status", "--json", cwd=str(tmp_path), env=env)
        assert json.loads(st.stdout)["runs"] == before + 1  # the CLI found the daemon on that socket
    finally:
        ak("daemon", "stop", cwd=str(tmp_path), env=env)
    deadline = time.monotonic() + 10
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(sock)


def test_daemon_socket_must_be_an_absolute_path(tmp_path):
    (tmp_path / "agentkernel.toml").write_text('[daemon]\nsocket = "relative.sock"\n')
    r = ak("run", "-B", "wasm", "--", "true", cwd=str(tmp_path))
    assert r.returncode != 0 and b"[daemon] socket must be an absolute path" in r.stderr


# ---- one image rule: Sandbox.run honours AGENTKERNEL_IMAGE and the config's image ----------------------


@pytest.mark.parametrize("source", ["env", "config"])
def test_sandbox_run_uses_the_named_image(source, monkeypatch):
    require_backend("oci")
    from agentkernel.sandbox import Sandbox

    cfg = None
    if source == "env":
        monkeypatch.setenv("AGENTKERNEL_IMAGE", "agentkernel/busybox")
    else:
        monkeypatch.delenv("AGENTKERNEL_IMAGE", raising=False)
        cfg = {"sandbox": {"image": "agentkernel/busybox"}}
    # python3 alone would select agentkernel/debian; the named busybox image has no python3: 127
    r = asyncio.run(Sandbox.run(["python3", "-c", "print(1)"], backend="oci", profile="moderate", config=cfg))
    assert r.exit_code == 127 and r.stdout == b"", r


# ---- one environment variable for the agent binary --------------------------------------------------------


def test_agent_binary_has_one_lookup(tmp_path):
    out = subprocess.run(["grep", "-rn", "AGENTKERNEL_AGENT_BINARY", os.path.join(REPO, "agentkernel")],
                         capture_output=True, text=True)
    assert out.stdout == "", out.stdout
    import agentkernel.agent as agent_pkg

    assert not hasattr(agent_pkg, "agent_binary")
    fake = tmp_path / "ak-agent"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    code = "from agentkernel import paths; print(paths.agent_binary())"
    env = {**os.environ, "AGENTKERNEL_AGENT_BIN": str(fake)}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() \
        == str(fake)
