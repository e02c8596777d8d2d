"""Egress rules and configuration, without engines: entry syntax, matching, modes from every source."""

from __future__ import annotations

import pytest

from agentkernel.config import load_config, resolve_spec
from agentkernel.egress.rules import Rules, parse_binding, parse_entry
from agentkernel.errors import ConfigError, ValidationError
from agentkernel.spec import network_mode


def test_matching_wildcards_ports_and_block_wins():
    r = Rules.from_lists("allowlist", ["*.example.com", "api.other.org:8443", "203.0.113.0/24"],
                         ["bad.example.com", "203.0.113.66"])
    assert r.decide_host("example.com", 443)[0] and r.decide_host("a.b.example.com", 80)[0]
    assert not r.decide_host("example.com", 22)[0]  # names without a port: 80 and 443 only
    assert not r.decide_host("notexample.com", 443)[0]
    assert r.decide_host("api.other.org", 8443)[0] and not r.decide_host("api.other.org", 443)[0]
    assert r.decide_host("bad.example.com", 443) == (False, "block bad.example.com")
    import ipaddress

    assert r.decide_ip(ipaddress.ip_address("203.0.113.5"), 5432)[0]
    assert not r.decide_ip(ipaddress.ip_address("203.0.113.66"), 80)[0]
    o = Rules.from_lists("open", [], ["*.blocked.test"])
    assert o.decide_host("anything.test", 1)[0] and not o.decide_host("x.blocked.test", 443)[0]


@pytest.mark.parametrize("text", ["*", "*.com", "a*.b.com", "a..b", "-a.com", "a.com:0", "a.com:65536",
                                  "10.0.0.1/33", "10.0.0.1/8", "fd00::/8", "[10.0.0.0/8]", "[fd00::/8", "1.2.3",
                                  "a.com:x", ""])
def test_bad_entries_are_named(text):
    with pytest.raises(ValidationError):
        parse_entry(text, "allow")


@pytest.mark.parametrize("text", ["X", "X:", "X:*", "X:*.a.com", "1X:a.com", "X:a.com:bad header", "X:a..com"])
def test_bad_bindings(text):
    with pytest.raises(ValidationError):
        parse_binding(text)


def _cfg(tmp_path, text):
    p = tmp_path / "agentkernel.toml"
    p.write_text(text)
    return load_config(str(p))


def test_reference_config_keys(tmp_path):
    cfg = _cfg(tmp_path, """
[security]
network = "allowlist"
[security.domains]
allow = ["api.example.com", "*.pkg.example"]
block = ["evil.pkg.example"]
[secrets]
TOKEN = {host = "api.example.com", header = "Authorization"}
""")
    spec = resolve_spec({}, config=cfg, environ={})
    assert network_mode(spec.policy) == "allowlist"
    assert spec.policy.network_allow == ("api.example.com", "*.pkg.example")
    assert spec.policy.network_block == ("evil.pkg.example",)
    assert spec.policy.secrets == ("TOKEN:api.example.com:Authorization",)
    # flags win over the file
    assert network_mode(resolve_spec({"network": "open"}, config=cfg, environ={}).policy) == "open"
    cfg2 = _cfg(tmp_path, "[security]\nnetwork = true\n[security.domains]\nallowlist_only = true\nallow = ['a.io']\n")
    assert network_mode(resolve_spec({}, config=cfg2, environ={}).policy) == "allowlist"
    assert network_mode(resolve_spec({}, config=_cfg(tmp_path, "[security]\nnetwork = true\n"),
                                     environ={}).policy) == "open"
    assert network_mode(resolve_spec({"network": False}, config=cfg2, environ={}).policy) == "none"


@pytest.mark.parametrize("text,msg", [
    ("[security]\nnetwork = 'sometimes'\n", "network must be"),
    ("[security.domains]\nallow = ['*']\n", "only allowed as a leading"),
    ("[security.domains]\nallow = 'a.com'\n", "must be a list"),
    ("[security.domains]\nwhatever = 1\n", "unknown key 'whatever'"),
    ("[security]\nnetwork = false\n[security.domains]\nallow = ['a.com']\n", "contradicts"),
    ("[security]\nnetwork = 'allowlist'\n", "needs at least one allowed destination"),
    ("[secrets]\nT = {header = 'X'}\n", "bound to no host"),
    ("[secrets]\nT = {host = '*'}\n", "wildcard"),
    ("[secrets]\nT = 'a.com'\n", "must be a table"),
    ("[secrets]\nbackend = 'vault'\n", "backend must be"),
])
def test_bad_config_is_named(tmp_path, text, msg):
    with pytest.raises((ConfigError, ValidationError), match=msg):
        resolve_spec({}, config=_cfg(tmp_path, text), environ={})


def test_cli_network_forms():
    from agentkernel.cli_flags import RUN_FLAGS, fast_parse

    assert fast_parse(["--network", "--", "x"], RUN_FLAGS).network == "open"
    assert fast_parse(["--network", "allowlist", "--allow-host", "a.io", "--", "x"], RUN_FLAGS).network == "allowlist"
    assert fast_parse(["--network=none", "x"], RUN_FLAGS).network == "none"
    ns = fast_parse(["--allow-host", "a.io:8443", "--allow-host", "b.io", "--secret", "T:a.io", "x"], RUN_FLAGS)
    assert ns.allow_host == ["a.io:8443", "b.io"] and ns.secret == ["T:a.io"] and ns.command == ["x"]
    assert fast_parse(["--network", "echo", "hi"], RUN_FLAGS).command == ["echo", "hi"]  # old form still works
    assert fast_parse(["--network", "bogus", "--", "x"], RUN_FLAGS) is None  # argparse reports the bad mode
