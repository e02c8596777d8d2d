"""The reference system's agentkernel.toml files: every key read, mapped, or refused with the reason; its
README / getting-started / examples/* configs (equivalents in tests/fixtures/reference-configs) load and run."""

from __future__ import annotations

import glob
import os

import pytest

from agentkernel.config import load_config, resolve_spec
from agentkernel.errors import ConfigError, PolicyNotEnforceable
from tests.conftest import ak, require_backend

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "reference-configs")
ALL = sorted(glob.glob(os.path.join(FIXTURES, "*.toml")) + glob.glob(os.path.join(FIXTURES, "examples", "*.toml")))
NEEDS_BUILD = {"config-toml-full.toml", "agents-claude-code.toml", "agents-codex.toml", "agents-gemini.toml",
               "agents-opencode.toml"}


def _cfg(tmp_path, text: str) -> dict:
    p = tmp_path / "agentkernel.toml"
    p.write_text(text)
    return load_config(str(p))


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_every_reference_config_loads(path):
    cfg = load_config(path)
    spec = resolve_spec({}, config=cfg, environ={})
    assert spec.policy.profile in ("moderate", "restrictive")


def test_keys_map_onto_ours(tmp_path):
    cfg = _cfg(tmp_path, '[sandbox]\nname = "x"\nbase_image = "agentkernel/debian"\n'
                         '[agent]\npreferred = "codex"\ncompatibility_mode = "codex"\n'
                         '[security]\nprofile = "restrictive"\npass_env = true\nmount_home = false\n')
    spec = resolve_spec({}, config=cfg, environ={"LANG": "C.UTF-8", "PATH": "/host/bin", "HOME": "/root"})
    assert spec.image == "agentkernel/debian"
    assert spec.env == {"LANG": "C.UTF-8"}  # PATH and HOME stay the image's own
    assert spec.policy.seccomp == "default"  # the agent mode's filter ("ai-agent")
    cfg = _cfg(tmp_path, '[sandbox]\nruntime = "python"\n[security]\nseccomp = "restrictive"\npass_env = false\n')
    spec = resolve_spec({}, config=cfg, environ={"LANG": "C"})
    assert spec.image == "python:3.12-alpine" and spec.policy.seccomp == "restrictive" and spec.env == {}
    cfg = _cfg(tmp_path, '[sandbox]\nruntime = "base"\n[security]\nseccomp = "moderate"\n')
    spec = resolve_spec({}, config=cfg, environ={})
    assert spec.image == "agentkernel/busybox" and spec.policy.seccomp == "default"
    cfg = _cfg(tmp_path, '[security.domains]\nallow = ["api.example.test"]\nallowlist_only = true\n')
    spec = resolve_spec({}, config=cfg, environ={})
    assert spec.policy.network and spec.policy.network_allow == ("api.example.test",)


@pytest.mark.parametrize(("text", "reason"), [
    ('[security]\nmount_home = true\n', "mount_home"),
    ('[security]\nseccomp = "/etc/custom-seccomp.json"\n', "custom seccomp"),
    ('[security.commands]\nblock = ["curl"]\n', "not a security boundary"),
])
def test_understood_but_not_honoured_fails_closed(tmp_path, text, reason):
    cfg = _cfg(tmp_path, text)
    with pytest.raises(PolicyNotEnforceable, match=reason) as ei:
        resolve_spec({}, config=cfg, environ={})
    assert "podman" in ei.value.message  # names the backend


@pytest.mark.parametrize(("text", "match"), [
    ('[sandbox]\nbase_imag = "x"\n', r"unknown key 'base_imag' in \[sandbox\] \(did you mean 'base_image'\?\)"),
    ('[agentt]\npreferred = "claude"\n', r"unknown table \[agentt\] \(did you mean 'agent'\?\)"),
    ('[security.commands]\nalow = ["x"]\n', r"unknown key 'alow' in \[security.commands\] \(did you mean 'allow'\?\)"),
    ('[[files]]\nsource = "nope"\ndest = "/tmp/x"\n', r"source 'nope' is not a file"),
    ('[[files]]\nsrc = "a"\n', r"did you mean 'source'"),
    ('[agent]\npreferred = "cursor"\n', r"preferred 'cursor' is unknown"),
    ('[security]\nseccomp = "strict"\n', r"seccomp 'strict' is unknown"),
    ('[security]\npass_env = 1\n', r"pass_env must be true, false or a list"),
    ('[sandbox]\nruntime = "cobol"\n', r"runtime 'cobol' is unknown"),
])
def test_bad_reference_keys_are_clear_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, text)


def test_cosmetic_key_warns_once(tmp_path):
    (tmp_path / "agentkernel.toml").write_text('[network]\nvsock_cid = 3\n')
    first = ak("run", "--", "true", cwd=str(tmp_path))
    second = ak("run", "--", "true", cwd=str(tmp_path))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert b"vsock_cid is ignored" in first.stderr and b"vsock_cid" not in second.stderr


@pytest.mark.engine("podman")
@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_every_reference_config_runs(path, tmp_path):
    """As the reference's docs write it: `agentkernel run --config FILE CMD`. Images that are not on this
    machine are refused by name (nothing is pulled); with a local image (-i) every config runs."""
    name = os.path.basename(path)
    p = ak("run", "--config", path, "--", "echo", "ok", cwd=str(tmp_path))
    if name == "config-toml-full.toml":  # [build] and [[files]]: built; its /app/.env is not writable by the
        # sandbox's user (commands never run as root here, the reference's did): refused before the command runs
        p = ak("run", "--config", path, "--", "echo", "ran", cwd=str(tmp_path))
        assert p.returncode == 125 and b"[[files]]: cannot create /app" in p.stderr, p.stderr
        assert b"ran" not in p.stdout and b"must be able to write there" in p.stderr
        return
    if name in NEEDS_BUILD:  # built from the fixture's Dockerfile (images/dockerbuild.py), then run
        assert (p.returncode, p.stdout) == (0, b"ok\n"), p.stderr
        return
    if p.returncode != 0:
        image = load_config(path)["sandbox"]["image"]
        assert p.returncode == 125 and image.encode() in p.stderr, p.stderr
    p = ak("run", "--config", path, "-i", "agentkernel/busybox", "--", "echo", "ok", cwd=str(tmp_path))
    assert (p.returncode, p.stdout) == (0, b"ok\n"), p.stderr


@pytest.mark.engine("podman")
def test_files_are_copied_in_at_create(tmp_path):
    (tmp_path / "secret.env").write_text("TOKEN=abc\n")
    (tmp_path / "agentkernel.toml").write_text(
        '[sandbox]\nname = "files-box"\n[[files]]\nsource = "secret.env"\ndest = "/tmp/app/.env"\nmode = "0600"\n')
    name = f"refcfg-{os.getpid()}"
    p = ak("create", name, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    try:
        assert ak("start", name).returncode == 0
        p = ak("exec", name, "stat", "-c", "%a %s", "/tmp/app/.env")
        assert p.stdout == b"600 10\n", p.stderr
        assert ak("exec", name, "cat", "/tmp/app/.env").stdout == b"TOKEN=abc\n"
    finally:
        ak("rm", name)


@pytest.mark.parametrize("backend", ["podman", "docker", "gvisor", "oci", "wasm"])
def test_run_copies_files_in(tmp_path, backend):
    """A one-shot run with [[files]] gets them (content and mode) before its command runs, on every container
    backend and wasm; a source that went missing after loading fails before anything runs."""
    require_backend(backend)
    (tmp_path / "secret.env").write_text("TOKEN=abc\n")
    (tmp_path / "agentkernel.toml").write_text(
        '[[files]]\nsource = "secret.env"\ndest = "/tmp/app/.env"\nmode = "0600"\n'
        '[[files]]\nsource = "secret.env"\ndest = "/tmp/copy.env"\n')
    p = ak("run", "-B", backend, "--", "cat", "/tmp/app/.env", "/tmp/copy.env", cwd=str(tmp_path))
    assert (p.returncode, p.stdout) == (0, b"TOKEN=abc\nTOKEN=abc\n"), p.stderr
    if backend != "wasm":  # the WASI shell has no stat
        p = ak("run", "-B", backend, "--", "stat", "-c", "%a", "/tmp/app/.env", "/tmp/copy.env", cwd=str(tmp_path))
        assert (p.returncode, p.stdout) == (0, b"600\n644\n"), p.stderr
    p = ak("run", "-B", backend, "--", "sh", "-c", "exit 3", cwd=str(tmp_path))
    assert p.returncode == 3, p.stderr
