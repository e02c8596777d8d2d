"""agentkernel setup: the steps scripts/setup.sh delegates to it (checked before acting, idempotent)."""

from __future__ import annotations

import os
import subprocess

import pytest

from agentkernel import hostsetup
from tests.conftest import ak

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# scripts/setup.sh's package list before `agentkernel setup` took the steps over: --all --dev installs these
SETUP_SH_PACKAGES = """
  podman crun runc uidmap slirp4netns containernetworking-plugins iptables docker.io containerd runsc
  busybox-static debootstrap python3 python3-venv python3-dev musl-tools make gcc
  iproute2 nftables util-linux procps openssl qemu-system-x86 qemu-utils e2fsprogs lz4 zstd
  clang lld wasi-libc libclang-rt-14-dev-wasm32 hyperfine docker-registry skopeo buildah btrfs-progs""".split()  # noqa: SIM905


def test_all_dev_installs_exactly_what_setup_sh_installed():
    opts = hostsetup.Options(backends=list(hostsetup.ALL_BACKENDS), dev=True)
    assert sorted(hostsetup.wanted_packages(opts)) == sorted(SETUP_SH_PACKAGES)
    # a single backend asks for its own engine only
    only_wasm = hostsetup.wanted_packages(hostsetup.Options(backends=["wasm"]))
    assert "clang" in only_wasm and "podman" not in only_wasm and "docker.io" not in only_wasm


def test_setup_sh_bootstraps_then_calls_agentkernel_setup():
    with open(os.path.join(REPO, "scripts", "setup.sh")) as f:
        text = f.read()
    assert "local args=(setup -y --all --dev --reference-clients)" in text
    assert '"$VENV/bin/python" -m agentkernel "${args[@]}"' in text
    assert "BOOTSTRAP_PACKAGES=(python3 python3-venv python3-dev)" in text
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "setup.sh")]).returncode == 0


def test_engine_config_steps_write_only_when_different(tmp_path, monkeypatch):
    """The podman and dockerd configuration steps: planned (file named) when missing or different, written
    by apply, then ok; a correct file is never rewritten. No dockerd runs with this pid file, so nothing
    is signalled."""
    monkeypatch.setattr(hostsetup, "PODMAN_CONF", str(tmp_path / "containers.conf.d" / "50-agentkernel.conf"))
    monkeypatch.setattr(hostsetup, "DOCKERD_CONF", str(tmp_path / "agentkernel" / "dockerd.json"))
    monkeypatch.setattr(hostsetup, "DOCKER_PID", str(tmp_path / "docker.pid"))
    for step, path in ((hostsetup.podman_conf_step(), hostsetup.PODMAN_CONF),
                       (hostsetup.dockerd_conf_step(), hostsetup.DOCKERD_CONF)):
        f = step.check()
        assert not f.ok and "missing" in f.detail and path in f.plan[0]
        assert "wrote" in step.apply()
        assert step.check().ok
        mtime = os.stat(path).st_mtime_ns
        assert step.check().ok and os.stat(path).st_mtime_ns == mtime
        with open(path, "a") as fh:
            fh.write("# a user's edit\n")
        f = step.check()
        assert not f.ok and "differs" in f.detail
    import json

    with open(hostsetup.DOCKERD_CONF) as f:
        conf = json.loads(f.read().split("# a user's")[0])
    from agentkernel.backends import gvisor, gvisor_docker

    # exactly the flags the gvisor-docker backend's probe and network check require, per runtime
    rts = conf["runtimes"]
    assert rts[gvisor_docker.RUNTIME]["runtimeArgs"] == [f"--{f}" for f in gvisor.RUNSC_FLAGS]
    assert rts[gvisor_docker.NET_RUNTIME]["runtimeArgs"] == [f"--{f}" for f in gvisor.RUNSC_NET_FLAGS]
    from agentkernel.backends import _runsc_net_wrapper

    assert rts[gvisor_docker.NET_RUNTIME]["path"] == _runsc_net_wrapper.PATH


def test_setup_converges_and_a_rerun_changes_nothing():
    """On a machine set up by scripts/setup.sh: `setup -y --all --dev` completes whatever other tests took
    away (e.g. a pruned rootfs cache), then every step checks ok, and the engine configuration files were
    never rewritten (they were already right)."""
    if os.geteuid() != 0 or not os.path.exists(hostsetup.DOCKERD_CONF):
        pytest.skip("needs the machine set up by scripts/setup.sh (root)")
    before = {p: os.stat(p).st_mtime_ns for p in (hostsetup.DOCKERD_CONF, hostsetup.PODMAN_CONF)}
    p = ak("setup", "-y", "--all", "--dev", "--quiet", timeout=1200)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    p = ak("setup", "--check", "--all", "--dev", "--quiet")
    assert p.returncode == 0 and b"everything the chosen backends need is here" in p.stdout, p.stdout.decode()
    p = ak("setup", "-y", "--all", "--dev", "--quiet")
    assert p.returncode == 0 and b"==> " not in p.stdout, p.stdout.decode()
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
