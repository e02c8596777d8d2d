"""The server policy for remote callers and its configuration, without a server (api/policy.py)."""

from __future__ import annotations

import pytest

from agentkernel import config
from agentkernel.api import policy
from agentkernel.api.policy import CallerPolicy, ServerPolicy, check_origin
from agentkernel.api.service import Service
from agentkernel.errors import ConfigError, NotPermitted, TooManyRequests


def test_config_schema_knows_every_policy_key():
    assert set(policy.POLICY_KEYS) <= set(config.SCHEMA["api"])
    assert policy.TENANT_KEYS == config.TENANT_KEYS


def _load(tmp_path, text: str) -> dict:
    p = tmp_path / "agentkernel.toml"
    p.write_text(text)
    return config.load_config(str(p))


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'tokenz' in \[\[api\.tenant\]\]"):
        _load(tmp_path, '[[api.tenant]]\nname = "ci"\ntokenz = "x"\n')
    with pytest.raises(ConfigError, match="'null' cannot be allowed"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nallowed_origins = ["null"]\n'))
    with pytest.raises(ConfigError, match="no configured token is named 'ci'"):
        ServerPolicy.from_config(_load(tmp_path, '[[api.tenant]]\nname = "ci"\n'), token_tenants={"api:other"})
    with pytest.raises(ConfigError, match="unknown profile 'yolo'"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nprofiles = ["yolo"]\n'))
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nbackends = ["nope"]\n'))
    with pytest.raises(ConfigError, match="max_runs must be positive"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nmax_runs = 0\n'))


def test_tenant_table_inherits_the_default(tmp_path):
    sp = ServerPolicy.from_config(_load(tmp_path, '[api]\nmax_runs = 3\nnetwork = false\n'
                                                  '[[api.tenant]]\nname = "ci"\nnetwork = true\n'))
    ci, other = sp.for_tenant("api:ci"), sp.for_tenant("api:x")
    assert ci.network and ci.max_runs == 3 and not other.network


def test_default_policy_is_safe(monkeypatch):
    monkeypatch.delenv("AGENTKERNEL_PROFILE", raising=False)
    svc = Service(with_daemon=False, config={"security": {"mount_cwd": True}, "resources": {"memory_mb": 100000}})
    spec = svc.run_spec("api:x", ["true"])
    assert spec.policy.mount_cwd is False and spec.policy.network is False  # the server's config is not enough
    assert spec.resources.memory_mb == CallerPolicy().max_memory_mb
    for kw, why in (({"profile": "permissive"}, "profile"), ({"network": True}, "network"),
                    ({"backend": "docker"}, None)):
        if why is None:
            svc.run_spec("api:x", ["true"], **kw)  # every registered backend by default
            continue
        with pytest.raises(NotPermitted, match=why):
            svc.run_spec("api:x", ["true"], **kw)
    with pytest.raises(NotPermitted, match="vcpus 64"):
        svc.sandbox_spec("api:x", "box", vcpus=64)


def test_server_credentials_never_passed_into_a_sandbox(monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_API_TOKENS", "a=0123456789abcdef0123")
    monkeypatch.setenv("LANG", "C.UTF-8")
    svc = Service(with_daemon=False, config={"security": {"pass_env": ["AGENTKERNEL_API_TOKENS", "LANG"]}})
    spec = svc.run_spec("api:x", ["true"])
    assert "AGENTKERNEL_API_TOKENS" not in spec.env and spec.env["LANG"] == "C.UTF-8"


def test_wasm_preopen_refused_for_remote_callers():
    svc = Service(with_daemon=False, config={"sandbox": {"options": {"preopen": "/:/host"}}})
    with pytest.raises(NotPermitted, match="preopen"):
        svc.run_spec("api:x", ["true"], backend="wasm")


def test_origin_rules():
    allowed = frozenset({"https://app.example"})
    assert check_origin(None, allowed) is None
    assert check_origin("https://app.example/", allowed) is None
    assert "null" in check_origin("null", allowed)
    assert check_origin("https://evil.example", allowed)
    assert check_origin("http://localhost:3000", frozenset())


def test_admission_counts_and_releases():
    sp = ServerPolicy(default=CallerPolicy(max_runs=2, max_batch=2, max_sandboxes=3), server_max_runs=3)
    svc = Service(with_daemon=False, policy=sp)
    adm = svc.admission
    t1 = adm.runs("a", 2, oneshot=True)
    with pytest.raises(TooManyRequests, match="concurrent runs for this caller") as exc:
        adm.runs("a", 1, oneshot=False)
    assert exc.value.retry_after >= 1 and exc.value.http_status == 429
    with pytest.raises(TooManyRequests, match="on this server"):
        adm.runs("b", 2, oneshot=False)
    with pytest.raises(TooManyRequests, match="batch of 3"):
        adm.runs("b", 3, oneshot=True, batch=True)
    t1.release()
    t1.release()  # idempotent
    assert adm.runs_by["a"] == 0 and adm.oneshots_by["a"] == 0
    with adm.runs("b", 2, oneshot=False):
        assert adm.runs_by["b"] == 2
    assert adm.runs_by["b"] == 0


def test_admission_counts_named_sandboxes_of_the_tenant_and_the_server_in_one_query(tmp_path):
    """The live-sandbox limits count the store's named sandboxes (this tenant's, every tenant's: one query)
    plus the one-shot runs and creates in flight; rows another process writes count at once."""
    from agentkernel.store import Store

    store = Store(str(tmp_path / "state.db"))
    sp = ServerPolicy(default=CallerPolicy(max_runs=10, max_sandboxes=3), server_max_sandboxes=5)
    adm = Service(with_daemon=False, policy=sp, store=store).admission
    store.reserve("a1", "a1-x", "podman", {}, tenant="a")
    store.reserve("a2", "a2-x", "podman", {}, tenant="a")
    store.reserve("b1", "b1-x", "podman", {}, tenant="b")
    assert store.counts("a") == (2, 3) and store.counts("nobody") == (0, 3)
    t = adm.runs("a", 1, oneshot=True)  # 2 named + 1 run = a's limit
    with pytest.raises(TooManyRequests, match="live sandboxes for this caller"):
        adm.runs("a", 1, oneshot=True)
    with pytest.raises(TooManyRequests, match="live sandboxes for this caller"):
        adm.creating("a")
    with adm.creating("b"):  # server: 3 named + 1 run + 1 create = 5
        with pytest.raises(TooManyRequests, match="live sandboxes on this server"):
            adm.runs("c", 1, oneshot=True)
        adm.runs("c", 1, oneshot=False).release()  # an exec is no new sandbox
    t.release()
    other = Store(str(tmp_path / "state.db"))  # another writer (the CLI, another server)
    other.delete("a1-x")
    other.close()
    adm.runs("a", 2, oneshot=True).release()  # 1 named + 2 runs
    store.close()


def test_network_policy_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown network mode 'wide'"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nnetwork_modes = ["wide"]\n'))
    with pytest.raises(ConfigError, match="allow_hosts"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nallow_hosts = ["*.com"]\n'))
    with pytest.raises(ConfigError, match="invalid secret name '1X'"):
        ServerPolicy.from_config(_load(tmp_path, '[api]\nsecrets = ["1X"]\n'))
    sp = ServerPolicy.from_config(_load(tmp_path, '[api]\nnetwork = true\n[[api.tenant]]\nname = "a"\n'
                                                  'network_modes = ["none", "allowlist"]\n'
                                                  'allow_hosts = ["*.example.com", "api.other.com:443", '
                                                  '"203.0.113.0/24"]\nsecrets = ["TOK"]\n'))
    assert sp.for_tenant("api:x").modes() == {"none", "allowlist", "open"}
    a = sp.for_tenant("api:a")
    assert a.modes() == {"none", "allowlist"}
    ok = (("a.example.com",), ("*.x.example.com",), ("example.com:80",), ("api.other.com:443",),
          ("203.0.113.8/29:5432",), ("203.0.113.9",))
    for allow in ok:
        a.check_request(backend=None, profile=None, network=None, resources={}, mode="allowlist", allow=allow)
    for allow in (("api.other.com",), ("other.com",), ("*.com.example",), ("example.com:8080",),
                  ("203.0.112.0/23",), ("*.other.com",)):
        with pytest.raises(NotPermitted, match="allow_hosts"):
            a.check_request(backend=None, profile=None, network=None, resources={}, mode="allowlist", allow=allow)
    with pytest.raises(NotPermitted, match="network mode 'open'"):
        a.check_request(backend=None, profile=None, network=None, resources={}, mode="open")
    with pytest.raises(NotPermitted, match="may not bind secret 'OTHER'"):
        a.check_request(backend=None, profile=None, network=None, resources={}, secrets=("OTHER:a.example.com",))


def test_config_network_and_secrets_lowered_for_callers_not_allowed(monkeypatch):
    monkeypatch.delenv("AGENTKERNEL_PROFILE", raising=False)
    cfg = {"security": {"network": "allowlist", "domains": {"allow": ["a.example.com"]}},
           "secrets": {"TOK": {"host": "a.example.com"}}}
    svc = Service(with_daemon=False, config=cfg)
    spec = svc.run_spec("api:x", ["true"])  # default caller: none only
    assert spec.policy.network is False and spec.policy.network_allow == () and spec.policy.secrets == ()
    svc.policy.default = CallerPolicy(network=True)  # every mode, but no secret names
    spec = svc.run_spec("api:x", ["true"])
    assert spec.policy.network_allow == ("a.example.com",) and spec.policy.secrets == ()
