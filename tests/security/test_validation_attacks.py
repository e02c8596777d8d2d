"""Issue 11 items 13 and 16: values that used to slip through validation into engines.

13: ``--cpus nan``, TOML ``vcpus = nan``, ``--timeout inf`` / ``1e12`` passed validation (podman then
applied no CPU quota; docker/oci crashed with tracebacks). 16: a ``:`` in ``workdir`` was spliced into
podman's ``--tmpfs PATH:OPTS`` string. Each attack is performed through the real CLI and must be refused
with a clear error before any engine is called."""

from __future__ import annotations

import os

import pytest

from agentkernel.backends import _container
from agentkernel.errors import ValidationError
from agentkernel.spec import SandboxSpec
from tests.conftest import ak

BACKENDS = ("podman", "docker", "oci")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [["--cpus", "nan"], ["--cpus", "inf"], ["--timeout", "inf"], ["--timeout", "1e12"],
                                   ["--timeout", "nan"], ["--memory", "0"]])
def test_cli_refuses_non_finite_and_huge_values(backend, flags):
    r = ak("run", "-B", backend, *flags, "--", "true", timeout=60)
    assert r.returncode in (2, 125), r
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert "finite" in err or "at most" in err or "at least" in err, err


def test_toml_vcpus_nan_refused(tmp_path):
    cfg = tmp_path / "agentkernel.toml"
    cfg.write_text("[resources]\nvcpus = nan\n")
    r = ak("run", "-B", "podman", "--", "true", cwd=str(tmp_path), timeout=60)
    assert r.returncode == 125, r
    assert b"vcpus must be a finite number" in r.stderr
    assert b"Traceback" not in r.stderr


def test_spec_layer_is_the_one_check():
    from agentkernel.spec import validate_timeout

    with pytest.raises(ValidationError):
        SandboxSpec.from_dict({"resources": {"vcpus": float("nan")}})
    for bad in (float("inf"), float("nan"), 1e12, 0, -1, True, "5"):
        with pytest.raises(ValidationError):
            validate_timeout(bad)
    assert validate_timeout(2) == 2.0


@pytest.mark.parametrize("workdir", ["/tmp:exec", "/w,size=0", "/a\nb", "/x\\y"])
def test_workdir_with_engine_syntax_refused(workdir):
    r = ak("run", "-B", "podman", "-p", "restrictive", "-w", workdir, "--", "true", timeout=60)
    assert r.returncode == 125, r
    assert b"workdir" in r.stderr and b"Traceback" not in r.stderr


def test_mount_source_with_colon_refused(tmp_path):
    """--mount-cwd from a directory whose name would split podman's -v SRC:DST:MODE."""
    d = tmp_path / "evil:/etc:rw"
    os.makedirs(d)
    r = ak("run", "-B", "podman", "--mount-cwd", "--", "true", cwd=str(d), timeout=60)
    assert r.returncode == 125, r
    assert b"contains ':'" in r.stderr, r.stderr


def test_plan_never_renders_unsafe_paths():
    spec = SandboxSpec.from_dict({"policy": {"mount_cwd": True, "read_only_root": True}})
    with pytest.raises(ValidationError):
        _container.plan(spec, sandbox_id="run-0123456789", owner={}, container_name="x", argv=["true"],
                        cwd="/tmp/a:b")
    p = _container.plan(spec, sandbox_id="run-0123456789", owner={}, container_name="x", argv=["true"],
                        cwd="/tmp")
    args = _container.podman_args(p)
    for i, a in enumerate(args):
        if args[i - 1] in ("--tmpfs", "-v"):
            assert a.count(":") <= 2
