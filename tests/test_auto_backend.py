"""``backend = "auto"``: its choice on hosts where each candidate is missing, simulated through the probe
inputs (a PATH holding only some engine binaries, a Docker socket path that does not exist), with the real
probes and the real fail-closed policy check; its cache; explicit choices winning."""

from __future__ import annotations

import os

import pytest

from agentkernel.backends import auto
from agentkernel.config import default_spec_for, resolve_spec
from agentkernel.errors import BackendUnavailable
from tests.conftest import ak, require_backend

BINARIES = ("crun", "runc", "podman", "docker", "dockerd")


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A host whose PATH holds only the engine binaries a test names (symlinks to the real ones) plus the
    basic tools, and a private auto cache."""
    real = {b: auto.which(b) for b in BINARIES}
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("AGENTKERNEL_CACHE", str(cache))

    def make(*present: str, docker: bool = True) -> None:
        d = tmp_path / ("bin-" + "-".join(present or ("none",)))
        d.mkdir(exist_ok=True)
        for b in present:
            assert real[b], f"{b} is not installed here"
            if not (d / b).exists():
                (d / b).symlink_to(real[b])
        monkeypatch.setenv("PATH", str(d))
        if docker:
            monkeypatch.delenv("DOCKER_HOST", raising=False)
        else:
            monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")

    return make


def test_root_with_crun_picks_oci(host):
    require_backend("oci")
    assert os.geteuid() == 0, "this host runs the suite as root"
    host("crun", "runc", "podman", "docker")
    chosen, rows = auto.choose(default_spec_for)
    assert chosen == "oci", rows
    assert rows[0] == {"backend": "oci", "ok": True, "reason": rows[0]["reason"]}
    assert all(r["ok"] is None for r in rows[1:])  # later candidates are not probed


def test_without_crun_picks_podman(host):
    require_backend("podman")
    host("runc", "podman", "docker")
    chosen, rows = auto.choose(default_spec_for)
    assert chosen == "podman", rows
    assert rows[0] == {"backend": "oci", "ok": False, "reason": "crun is not on PATH"}


def test_without_crun_and_podman_picks_docker(host):
    require_backend("docker")
    host("runc")
    chosen, rows = auto.choose(default_spec_for)
    assert chosen == "docker", rows
    assert [r["ok"] for r in rows] == [False, False, True]
    assert rows[1]["reason"] == "podman is not on PATH"


def test_nothing_works_is_a_clear_error(host):
    host(docker=False)
    with pytest.raises(BackendUnavailable) as ei:
        auto.decide(default_spec_for)
    msg = ei.value.message
    assert "crun is not on PATH" in msg and "podman is not on PATH" in msg and "no Docker socket" in msg
    assert "--backend" in ei.value.hint


def test_rootless_is_not_an_oci_candidate():
    f = {"euid": 1000, "binaries": {"crun": "/usr/bin/crun"}, "docker_socket": "/nonexistent"}
    assert "not root" in auto.preconditions("oci", f)
    assert auto.preconditions("oci", {**f, "euid": 0}) is None


def test_choice_is_cached_and_rechosen_when_the_host_changes(host):
    require_backend("oci")
    require_backend("podman")
    host("crun", "runc", "podman")
    assert auto.decide(default_spec_for)[::2] == ("oci", False)
    assert auto.decide(default_spec_for)[::2] == ("oci", True)  # cached: no probe
    host("runc", "podman")  # crun went away: the fingerprint changed
    assert auto.decide(default_spec_for)[::2] == ("podman", False)
    assert auto.decide(default_spec_for)[::2] == ("podman", True)


def test_process_reuses_its_choice_until_the_cache_file_changes(host):
    """A long-lived process (the server) reuses its decision without re-reading the host; another process
    re-choosing (it rewrites the cache file) is seen at once, and ``refresh`` always probes."""
    require_backend("oci")
    host("crun", "runc", "podman")
    assert auto.decide(default_spec_for)[::2] == ("oci", False)
    assert auto.decide(default_spec_for)[::2] == ("oci", True)
    path = auto._cache_path()
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    with open(path + ".new", "w", encoding="utf-8") as fh:  # another process's choice, same host fingerprint
        fh.write("\n".join([lines[0], "podman", "podman\t1\tchosen elsewhere"]) + "\n")
    os.replace(path + ".new", path)
    chosen, rows, cached = auto.decide(default_spec_for)
    assert (chosen, cached, rows[0]["reason"]) == ("podman", True, "chosen elsewhere")
    assert auto.decide(default_spec_for, refresh=True)[::2] == ("oci", False)
    assert auto.decide(default_spec_for)[::2] == ("oci", True)


def test_explicit_backend_always_wins(host, monkeypatch):
    require_backend("oci")
    host("crun", "runc", "podman")
    assert resolve_spec({}).backend == "oci"
    assert resolve_spec({"backend": "auto"}).backend == "oci"
    assert resolve_spec({"backend": "podman"}).backend == "podman"
    assert resolve_spec({}, config={"sandbox": {"backend": "docker"}}).backend == "docker"
    monkeypatch.setenv("AGENTKERNEL_BACKEND", "gvisor")
    assert resolve_spec({}).backend == "gvisor"
    assert resolve_spec({"backend": "wasm"}).backend == "wasm"


def test_doctor_and_run_explain_say_which_and_why(host):
    require_backend("oci")
    host("crun", "runc", "podman")
    r = ak("run", "--explain", "--", "echo", "hello", env={"PATH": os.environ["PATH"]})
    assert r.returncode == 0, r
    out = r.stdout.decode()
    assert "backend auto -> oci" in out and "ok  oci:" in out and "image " in out
    r = ak("run", "-B", "podman", "--explain", "--", "true", env={"PATH": os.environ["PATH"]})
    assert r.stdout.decode().startswith("backend podman (named by --backend)"), r
    r = ak("doctor", env={"PATH": os.environ["PATH"]})
    assert "Default backend (auto):" in r.stdout.decode() and "backend auto -> oci" in r.stdout.decode(), r


def test_default_backend_hot_path_imports_nothing_denied(tmp_path):
    """With the choice cached, resolving ``auto`` on the CLI's one-shot path costs no denied import. A
    private runtime dir: a shared journal may hold dead owners' entries from other test runs, and reaping
    them is not the hot path."""
    from tests.contract.test_hotpath_imports import imported

    require_backend("oci")
    env = {"AGENTKERNEL_RUNTIME_DIR": str(tmp_path / "run")}
    assert ak("run", "--no-daemon", "--", "true", env=env).returncode == 0  # the choice is cached now
    assert imported("run", "--", "true", env=env) == set()
