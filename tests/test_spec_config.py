"""The sandbox model, profiles, config merging and the fail-closed policy check (no engines needed)."""

from __future__ import annotations

import pytest

from agentkernel.backends.base import Capabilities, check_policy, required_controls
from agentkernel.config import load_config, resolve_spec
from agentkernel.errors import ConfigError, PolicyNotEnforceable, ValidationError
from agentkernel.spec import PROFILES, Policy, Resources, SandboxSpec, check_sandbox_path, validate_name


def test_defaults_are_moderate_and_hardened():
    spec = resolve_spec({}, environ={})
    assert spec.backend == "podman"
    assert spec.policy.profile == "moderate"
    assert spec.policy.network is False
    assert spec.policy.user == "1000:1000"
    assert (spec.resources.memory_mb, spec.resources.vcpus, spec.resources.pids) == (512, 1.0, 256)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles_apply(profile):
    spec = resolve_spec({"profile": profile}, environ={})
    want = PROFILES[profile]
    for k, v in want["policy"].items():
        assert getattr(spec.policy, k) == v
    for k, v in want["resources"].items():
        assert getattr(spec.resources, k) == v


def test_restrictive_is_read_only_without_network():
    spec = resolve_spec({"profile": "restrictive"}, environ={})
    assert spec.policy.read_only_root and not spec.policy.network
    assert spec.policy.seccomp == "restrictive"
    assert spec.resources.disk_mb == 64


def test_precedence_flags_over_env_over_file_over_profile(monkeypatch):
    cfg = {"sandbox": {"backend": "docker", "image": "img/a"}, "resources": {"memory_mb": 1024},
           "security": {"profile": "restrictive", "network": True}}
    spec = resolve_spec({}, config=cfg, environ={})
    assert spec.backend == "docker" and spec.image == "img/a"
    assert spec.resources.memory_mb == 1024  # explicit file value beats the profile's 256
    assert spec.policy.network is True and spec.policy.read_only_root is True
    monkeypatch.setenv("AGENTKERNEL_BACKEND", "gvisor")
    assert resolve_spec({}, config=cfg, environ={}).backend == "gvisor"
    spec = resolve_spec({"backend": "oci", "memory_mb": 64, "network": False}, config=cfg, environ={})
    assert (spec.backend, spec.resources.memory_mb, spec.policy.network) == ("oci", 64, False)


def test_pass_env_takes_values_from_the_caller():
    cfg = {"security": {"pass_env": ["FOO", "MISSING"]}, "env": {"BAR": "2"}}
    spec = resolve_spec({"env": {"BAZ": "3"}}, config=cfg, environ={"FOO": "1", "OTHER": "x"})
    assert spec.env == {"FOO": "1", "BAR": "2", "BAZ": "3"}


def test_unknown_config_keys_are_rejected(tmp_path):
    p = tmp_path / "agentkernel.toml"
    p.write_text('[security]\nmount_hme = true\n')
    with pytest.raises(ConfigError,
                       match=r"unknown key 'mount_hme' in \[security\] \(did you mean 'mount_home'\?\).*known keys"):
        load_config(str(p))
    p.write_text('[sandboxx]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"unknown table \[sandboxx\] \(did you mean 'sandbox'\?\)"):
        load_config(str(p))


def test_malformed_config_is_a_clear_error(tmp_path):
    p = tmp_path / "agentkernel.toml"
    p.write_text('[resources\nvcpus = 1\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(p))
    p.write_text('[resources]\nmemory_mb = "lots"\n')
    with pytest.raises(ConfigError, match=r"\[resources\] memory_mb must be an integer"):
        load_config(str(p))


def test_config_file_round_trip(tmp_path):
    p = tmp_path / "agentkernel.toml"
    p.write_text('[sandbox]\nname = "box"\nimage = "agentkernel/debian"\nbackend = "docker"\n'
                 '[resources]\nvcpus = 2\nmemory_mb = 300\npids = 99\n'
                 '[security]\nprofile = "permissive"\nread_only = true\nmount_cwd = false\n'
                 '[env]\nA = "b"\n')
    spec = resolve_spec({}, config=load_config(str(p)), environ={})
    assert (spec.name, spec.image, spec.backend) == ("box", "agentkernel/debian", "docker")
    assert (spec.resources.vcpus, spec.resources.memory_mb, spec.resources.pids) == (2.0, 300, 99)
    assert spec.policy.read_only_root and not spec.policy.mount_cwd and spec.policy.network
    assert spec.env == {"A": "b"}


@pytest.mark.parametrize("bad", ["", "-a", "a-", "a/b", "a b", "a;rm", "$(x)", "a..b", "x" * 64, "a--b", "../x"])
def test_bad_names_rejected(bad):
    with pytest.raises(ValidationError):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "box1", "my-box", "my_box", "A9"])
def test_good_names(good):
    assert validate_name(good) == good


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"memory_mb must be at least 6"):
        resolve_spec({"memory_mb": 1}, environ={})
    with pytest.raises(ConfigError, match="unknown profile 'paranoid'"):
        resolve_spec({"profile": "paranoid"}, environ={})
    with pytest.raises(ValidationError, match=r"invalid SandboxSpec.image reference"):
        SandboxSpec(image="a b")
    with pytest.raises(ValidationError, match="unknown key 'swap'"):
        Resources(swap=1)
    with pytest.raises(ValidationError, match="user"):
        Policy(user="root")


def test_spec_is_immutable_and_round_trips_json():
    spec = resolve_spec({"name": "x", "env": {"K": "v"}}, environ={})
    with pytest.raises(AttributeError):
        spec.image = "other"
    again = SandboxSpec.from_json(spec.to_json())
    assert again == spec and again.pool_key() == spec.pool_key()
    assert spec.replace(image="agentkernel/debian").pool_key() != spec.pool_key()
    assert spec.replace(name="y").pool_key() == spec.pool_key()  # the name is not part of the pool key


def test_sandbox_paths():
    assert check_sandbox_path("/workspace/a.txt")
    for bad in ("relative", "/a/../../etc/passwd", "/a/\0b", ""):
        with pytest.raises(ValidationError):
            check_sandbox_path(bad)


def test_fail_closed_names_every_missing_control():
    spec = resolve_spec({"profile": "restrictive"}, environ={})
    caps = Capabilities({"memory", "cpu", "cap_drop_all", "no_new_privileges", "network_none"})
    with pytest.raises(PolicyNotEnforceable) as ei:
        check_policy(spec, caps, "toy")
    msg = str(ei.value)
    for c in ("read_only_root", "pids", "disk_tmpfs", "seccomp_restrictive", "non_root"):
        assert c in msg
    assert "memory (" not in msg


def test_disk_on_writable_root_needs_rootfs_quota():
    spec = resolve_spec({"disk_mb": 100}, environ={})
    assert "disk_rootfs" in required_controls(spec)
    spec = resolve_spec({"disk_mb": 100, "read_only": True}, environ={})
    assert "disk_tmpfs" in required_controls(spec)
