"""The reference system's CLI forms, run as its docs write them."""

from __future__ import annotations

import json
import os

import pytest

from agentkernel import __version__
from agentkernel.cli import build_parser
from tests.conftest import ak as _ak


def ak(*args, **kw):
    """These tests follow the reference's docs, written for a container engine with named volumes and
    committed images: podman (backend auto picks oci as root)."""
    kw["env"] = {"AGENTKERNEL_BACKEND": "podman", **(kw.get("env") or {})}
    return _ak(*args, **kw)


def test_version_and_help_forms():
    for form in ("-V", "--version"):
        p = ak(form)
        assert (p.returncode, p.stdout) == (0, f"agentkernel {__version__}\n".encode())
    for cmd in ("setup", "status", "init", "agents", "plugin", "volume", "mcp-server"):
        assert ak(cmd, "--help").returncode == 0, cmd


def test_reference_flag_spellings_parse():
    a = build_parser("serve").parse_args(["serve", "-H", "0.0.0.0", "-p", "9999"])
    assert (a.host, a.port) == ("0.0.0.0", 9999)
    assert build_parser("replay").parse_args(["replay", "-s", "2", "x.cast"]).speed == 2.0
    assert build_parser("audit").parse_args(["audit", "--path"]).path is True
    assert build_parser("start").parse_args(["start", "-B", "docker", "box"]).backend == "docker"
    a = build_parser("attach").parse_args(["attach", "-e", "A=1", "-e", "B=2", "box"])
    assert a.env == [("A", "1"), ("B", "2")]
    a = build_parser("create").parse_args(["create", "box", "--agent", "codex", "--dir", "/tmp", "-v", "v:/d:ro"])
    assert (a.agent, a.dir, a.volume) == ("codex", "/tmp", ["v:/d:ro"])
    assert build_parser("run").parse_args(["run", "-F", "echo"]).fast is True
    assert build_parser("run").parse_args(["run", "--fast", "echo"]).fast is True
    assert build_parser("mcp-server").parse_args(["mcp-server"]).cmd == "mcp-server"


def test_audit_path(tmp_path):
    p = ak("audit", "--path")
    assert p.returncode == 0 and p.stdout.decode().strip().endswith("audit.jsonl")


def test_init_writes_a_commented_config_that_loads(tmp_path):
    d = tmp_path / "My Project"
    d.mkdir()
    p = ak("init", "--agent", "gemini", cwd=str(d))
    assert p.returncode == 0, p.stderr
    text = (d / "agentkernel.toml").read_text()
    assert 'name = "My-Project"' in text and 'preferred = "gemini"' in text and "# network = true" in text
    assert ak("init", cwd=str(d)).returncode == 125  # never overwritten silently
    assert ak("init", "--force", "-n", "other", cwd=str(d)).returncode == 0
    from agentkernel.config import load_config, resolve_spec

    spec = resolve_spec({}, config=load_config(str(d / "agentkernel.toml")), environ={})
    assert spec.name == "other" and spec.policy.network is False


def test_agents_lists_the_four_agents(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "codex"
    fake.write_text("#!/bin/sh\necho codex 1.0\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": ""}
    p = ak("agents", "--json", env=env)
    rows = {r["agent"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"claude", "codex", "gemini", "opencode"}
    assert rows["codex"]["installed"] and rows["codex"]["api_key"] == "OPENAI_API_KEY"
    assert not rows["claude"]["installed"] and rows["claude"]["api_key"] is None
    p = ak("agents", env=env)
    assert b"Codex" in p.stdout and b"OPENAI_API_KEY set" in p.stdout and b"npm install -g" in p.stdout


@pytest.mark.engine("podman")
def test_status_and_setup_check():
    p = ak("status", "--json")
    assert p.returncode == 0
    st = json.loads(p.stdout)
    assert st["backends"]["podman"] is True and st["version"] == __version__
    p = ak("setup", "--check")
    assert p.returncode == 0 and b"everything the chosen backends need is here" in p.stdout, p.stdout
    p = ak("setup", "--check", "-B", "nope")
    assert p.returncode == 125 and b"unknown backend 'nope'" in p.stderr


def test_setup_says_what_it_will_change_before_changing_it(tmp_path):
    """A missing image: setup --check names the fix; setup without -y and without a terminal refuses."""
    env = {"AGENTKERNEL_AGENT_BIN": "none"}
    p = ak("setup", "--check", "-B", "wasm", env=env)
    agent_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agent")
    assert p.returncode == 1 and b"in-sandbox agent binary: missing" in p.stdout, p.stdout
    assert f"make -C {agent_dir}".encode() in p.stdout
    p = ak("setup", "-B", "wasm", env=env, input=b"")
    assert b"setup will run:" in p.stdout and p.returncode == 125 and b"pass -y" in p.stderr
    p = ak("setup", "--dry-run", "-B", "wasm", env=env)  # the plan, and a zero exit: nothing changed
    assert p.returncode == 0 and b"setup will run:" in p.stdout and b"==> " not in p.stdout
    p = ak("setup", "--check", "--image", "alpine")
    assert p.returncode == 125 and b"unknown local image 'alpine'" in p.stderr


@pytest.mark.engine("podman")
def test_lifecycle_as_the_reference_docs_write_it(tmp_path):
    """create --agent, start -B, exec NAME CMD... (no --), run --fast, the reference benchmark script's
    sequence; --dir reads that directory's agentkernel.toml."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "agentkernel.toml").write_text('[sandbox]\nbase_image = "agentkernel/debian"\n')
    name = f"refcli-{os.getpid()}"
    p = ak("create", name, "--agent", "claude", "--dir", str(proj))
    assert p.returncode == 0, p.stderr
    try:
        p = ak("start", "-B", "docker", name)
        assert p.returncode == 125 and b"created on backend 'podman'" in p.stderr
        assert ak("start", "-B", "podman", name).returncode == 0
        p = ak("exec", name, "python3", "--version")
        assert p.returncode == 0 and p.stdout.startswith(b"Python 3"), p.stderr
        p = ak("exec", name, "python3", "-c", "import sys; print(sys.argv)", "-x", "--", "y")
        assert p.stdout == b"['-c', '-x', '--', 'y']\n"
        p = ak("exec", "-e", "K=V", name, "sh", "-c", "echo $K; exit 7")
        assert (p.returncode, p.stdout) == (7, b"V\n")
        assert ak("exec", name, "--", "echo", "dashdash").stdout == b"dashdash\n"
        assert ak("exec", name, "--timeout", "5", "--", "echo", "old-form").stdout == b"old-form\n"
        assert ak("stop", name).returncode == 0
    finally:
        p = ak("remove", name)
        assert p.returncode == 0, p.stderr
    p = ak("run", "--fast", "echo", "fast")
    assert (p.returncode, p.stdout) == (0, b"fast\n")
    p = ak("run", "-F", "--", "echo", "F")
    assert (p.returncode, p.stdout) == (0, b"F\n")


@pytest.mark.engine("podman")
def test_create_with_a_named_volume(tmp_path):
    vol, a, b = f"clivol-{os.getpid()}", f"va-{os.getpid()}", f"vb-{os.getpid()}"
    assert ak("volume", "create", vol).returncode == 0
    try:
        assert ak("create", a, "--start", "-v", f"{vol}:/data").returncode == 0
        assert ak("exec", a, "sh", "-c", "echo persisted > /data/x").returncode == 0
        assert ak("rm", a).returncode == 0
        assert ak("create", b, "--start", "-v", f"{vol}:/data:ro").returncode == 0
        assert ak("exec", b, "cat", "/data/x").stdout == b"persisted\n"
        assert ak("exec", b, "sh", "-c", "echo y > /data/y").returncode != 0
        assert json.loads(ak("volume", "info", vol).stdout)["size_bytes"] == 10
    finally:
        ak("rm", a)
        ak("rm", b)
        ak("volume", "rm", vol)
    p = ak("create", a, "-v", "no-such-volume:/data")
    assert p.returncode == 125 and b"no such volume" in p.stderr


def test_daemon_start_background_flag_parses():
    """The reference's `daemon start -b` (it bailed there): accepted, and the default here."""
    args = build_parser().parse_args(["daemon", "start", "-b"])
    assert args.background and not args.foreground
    with pytest.raises(SystemExit):
        build_parser().parse_args(["daemon", "start", "-b", "--foreground"])
