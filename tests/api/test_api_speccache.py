"""The reuse of /run's resolution (api/speccache.py): identical requests share one resolution for a few
seconds; a changed policy, config object, config file or environment is honoured at once; refusals are
never cached. In-process, on the host's real backends and image stores."""

from __future__ import annotations

import time

import pytest

from agentkernel.api.policy import CallerPolicy, ServerPolicy
from agentkernel.api.service import Service
from agentkernel.api.speccache import SpecCache
from agentkernel.errors import NotPermitted


def _policy(api: dict | None = None) -> ServerPolicy:
    return ServerPolicy.from_config({"api": api or {}}, local_tenant="local")


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config file the server finds is this directory's
    s = Service(config={}, with_daemon=False, policy=_policy())
    yield s


def test_identical_requests_share_one_resolution(svc):
    a = svc.run_spec("local", ["echo", "hi"])
    assert svc.run_spec("local", ["echo", "hi"]) is a
    other = svc.run_spec("local", ["echo", "hi"], profile="restrictive")
    assert other is not a and other.policy.profile == "restrictive"
    assert svc.run_spec("local", ["echo", "hi"]) is a
    assert svc.run_spec("other-tenant", ["echo", "hi"]) is not a  # per tenant (each has its own policy)
    svc.check_image(a)
    hits = svc.spec_cache.hits
    svc.check_image(a)
    assert svc.spec_cache.hits == hits + 1


def test_changed_policy_and_config_are_honoured(svc, tmp_path, monkeypatch):
    a = svc.run_spec("local", ["echo", "hi"])
    assert a.resources.memory_mb is None or a.resources.memory_mb > 64
    svc.policy = _policy({"max_memory_mb": 64})  # a new policy object (what a reload does)
    b = svc.run_spec("local", ["echo", "hi"])
    assert b.resources.memory_mb == 64
    svc.config = {"resources": {"memory_mb": 32}}
    c = svc.run_spec("local", ["echo", "hi"])
    assert c.resources.memory_mb == 32
    svc.config["resources"]["memory_mb"] = 48  # changed in place
    assert svc.run_spec("local", ["echo", "hi"]).resources.memory_mb == 48
    svc.policy.default = CallerPolicy(max_memory_mb=40)  # changed in place
    assert svc.run_spec("local", ["echo", "hi"]).resources.memory_mb == 40
    svc.policy.default = CallerPolicy()
    svc.config["resources"]["memory_mb"] = 32
    c = svc.run_spec("local", ["echo", "hi"])
    assert svc.run_spec("local", ["echo", "hi"]) is c
    # the config file in the server's directory appears, then changes: resolved again each time
    cfg = tmp_path / "agentkernel.toml"
    cfg.write_text('[images]\nsetuid = "strip"\n')
    d = svc.run_spec("local", ["echo", "hi"])
    assert d is not c and d == c
    cfg.write_text('[images]\nsetuid = "strip"\n# changed\n')
    assert svc.run_spec("local", ["echo", "hi"]) is not d
    e = svc.run_spec("local", ["echo", "hi"])
    monkeypatch.setenv("AGENTKERNEL_PROFILE", "restrictive")
    f = svc.run_spec("local", ["echo", "hi"])
    assert f is not e and f.policy.profile == "restrictive"


def test_refusals_are_not_cached_and_entries_expire(svc):
    svc.policy = _policy({"profiles": ["restrictive"]})
    for _ in range(2):
        with pytest.raises(NotPermitted):
            svc.run_spec("local", ["echo", "hi"], profile="moderate")
    assert svc.spec_cache.hits == 0
    svc.spec_cache = SpecCache(ttl_s=0.05)
    a = svc.run_spec("local", ["echo", "hi"], profile="restrictive")
    assert svc.run_spec("local", ["echo", "hi"], profile="restrictive") is a
    time.sleep(0.1)
    assert svc.run_spec("local", ["echo", "hi"], profile="restrictive") is not a
