"""Apple Containers: the exact commands we would run on macOS (they cannot run here)."""

from __future__ import annotations

import pytest

from agentkernel.backends import _container
from agentkernel.backends.apple import AppleBackend, apple_command
from agentkernel.config import resolve_spec
from agentkernel.errors import PolicyNotEnforceable, SandboxError

OWNER = {"host": "h", "boot": "b", "pid": 1, "start": 2}


def _plan(spec, **kw):
    return _container.plan(spec, sandbox_id="sid1", owner=OWNER, container_name="agentkernel-sid1", **kw)


def test_probe_explains_why_not_here():
    a = AppleBackend.probe()
    assert not a.available and "macOS 26" in a.reason


def test_default_policy_is_refused_with_what_is_missing():
    spec = resolve_spec({"backend": "apple"}, environ={})
    with pytest.raises(PolicyNotEnforceable) as ei:
        AppleBackend().check(spec)
    for c in ("network_none", "pids", "cap_drop_all", "no_new_privileges", "seccomp_default"):
        assert c in str(ei.value)


def test_run_command_construction():
    spec = resolve_spec({"backend": "apple", "image": "alpine:3.20", "memory_mb": 1024, "vcpus": 2.0,
                         "env": {"A": "1"}, "workdir": "/w", "network": True}, environ={})
    argv = apple_command(_plan(spec, argv=["python3", "-c", "print(1)"]))
    assert argv[:3] == ["container", "run", "--rm"]
    assert argv[argv.index("--memory") + 1] == "1024M"
    assert argv[argv.index("--cpus") + 1] == "2"
    assert argv[argv.index("--workdir") + 1] == "/w"
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert "A=1" in argv and "--label" in argv
    assert argv[argv.index("alpine:3.20") + 1:] == ["-c", "print(1)"]
    assert argv[argv.index("--entrypoint") + 1] == "python3"


def test_agent_socket_is_published_and_cwd_mounted(tmp_path):
    spec = resolve_spec({"backend": "apple", "mount_cwd": True}, environ={})
    p = _plan(spec, agent_bin="/opt/ak-agent", run_dir=str(tmp_path), cwd=str(tmp_path))
    argv = apple_command(p, "create")
    assert argv[:2] == ["container", "create"]
    assert f"{tmp_path}/agent.sock:/.ak/run/agent.sock" in argv
    assert f"{tmp_path}:/workspace" in argv
    assert "/opt/ak-agent:/.ak/ak-agent:ro" in argv
    i = argv.index(spec.image)
    assert argv[i + 1:] == ["serve", "--listen", "/.ak/run/agent.sock"]


def test_read_only_root_cannot_be_expressed():
    spec = resolve_spec({"backend": "apple", "read_only": True}, environ={})
    with pytest.raises(SandboxError, match="read-only"):
        apple_command(_plan(spec, argv=["true"]))
