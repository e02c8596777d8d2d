"""``agentkernel gc`` removes the egress plumbing a killed owner left: the sandbox's namespace and veth,
its registration and lease, and (nothing attached any more) the gateway, the bridge and its host tables.
Each test uses an installation of its own (a private runtime dir), so its bridge is its alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ak


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


@pytest.fixture
def installation(testnet):
    root = tempfile.mkdtemp(prefix="ak-egress-gc-")
    env = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"), "AGENTKERNEL_HOME": os.path.join(root, "home")}
    yield env
    subprocess.run([sys.executable, "-c", "from agentkernel.egress import gateway_ctl, netns; "
                    "gateway_ctl.stop(); netns.remove_bridge()"], env=dict(os.environ, **env), check=False)


def _state(env: dict) -> str:
    return os.path.join(env["AGENTKERNEL_RUNTIME_DIR"], "egress")


def _ours_left(net: dict, shorts: set[str]) -> list[str]:
    """Everything of this installation still visible in ip link / ip netns / nft list tables."""
    left = []
    links = _sh("ip", "-o", "link", "show")
    for s in shorts:
        if f"akv{s}" in links:
            left.append(f"link akv{s}")
        if f"ak-{s}" in _sh("ip", "netns", "list"):
            left.append(f"netns ak-{s}")
    if f"{net['bridge']}:" in links:
        left.append(f"bridge {net['bridge']}")
    if f"agentkernel_egress_{net['tag']}" in _sh("nft", "list", "tables"):
        left.append("nft tables")
    return left


def _backdate(env: dict) -> None:
    """Make the records look older than the sweep's grace period (an attach in progress is kept)."""
    d = os.path.join(_state(env), "by-id")
    old = time.time() - 3600
    for f in os.listdir(d):
        os.utime(os.path.join(d, f), (old, old))


def _gateway_running(env: dict) -> bool:
    r = subprocess.run([sys.executable, "-c", "import sys; from agentkernel.egress import gateway_ctl, netns; "
                        "sys.exit(0 if gateway_ctl._running(netns.state_dir()) else 1)"],
                       env=dict(os.environ, **env))
    return r.returncode == 0


@pytest.mark.parametrize("backend", ["oci", "podman"])
def test_gc_cleans_after_a_sigkilled_owner(installation, backend):
    env = installation
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--no-daemon", "-B", backend, "--network",
                          "--", "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, **env), start_new_session=True)
    byid = os.path.join(_state(env), "by-id")
    shorts: set[str] = set()
    for _ in range(600):
        shorts = set(os.listdir(byid)) if os.path.isdir(byid) else set()
        if shorts and all(os.path.exists(f"/run/netns/ak-{s}") for s in shorts):
            break
        time.sleep(0.05)
    assert shorts, "the sandbox never attached"
    with open(os.path.join(_state(env), "net.json")) as f:
        net = json.load(f)
    time.sleep(1)
    os.killpg(p.pid, signal.SIGKILL)  # the CLI and everything in its session
    p.wait()
    assert _ours_left(net, shorts), "nothing to clean: the test proves nothing"
    _backdate(env)
    r = ak("gc", env=env)
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    assert f"bridge {net['bridge']}" in text, text
    assert _ours_left(net, shorts) == [], text
    assert not _gateway_running(env)
    assert os.listdir(os.path.join(_state(env), "leases")) == []
    assert os.listdir(byid) == []


def test_gc_releases_an_attach_whose_engine_never_started(installation):
    """A CLI killed between attach and its engine's start: a registration, a lease, a namespace and a veth
    no engine lists. gc releases them (once older than the grace period) and then the idle bridge."""
    env = installation
    code = ("from agentkernel.spec import SandboxSpec; from agentkernel.egress.attach import attach; "
            "import os; spec = SandboxSpec(backend='oci'); spec = spec.replace(policy=spec.policy.replace("
            "network=True)); attach(spec, 'gc-test-0123456789'); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(_state(env), "net.json")) as f:
        net = json.load(f)
    shorts = {"0123456789"}
    assert os.path.exists("/run/netns/ak-0123456789")
    r = ak("gc", env=env)  # too young: an attach in progress is never touched
    assert os.path.exists("/run/netns/ak-0123456789"), r.stdout.decode()
    _backdate(env)
    r = ak("gc", env=env)
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    assert "egress gc-test-0123456789" in text, text
    assert _ours_left(net, shorts) == [], text


def test_gc_removes_a_dead_installations_bridge(installation):
    """Another installation whose runtime dir is gone: its bridge, veths, namespaces and tables go."""
    import shutil

    other_root = tempfile.mkdtemp(prefix="ak-egress-gone-")
    other = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(other_root, "run"),
             "AGENTKERNEL_HOME": os.path.join(other_root, "home")}
    code = ("from agentkernel.spec import SandboxSpec; from agentkernel.egress.attach import attach; "
            "import os; spec = SandboxSpec(backend='oci'); spec = spec.replace(policy=spec.policy.replace("
            "network=True)); attach(spec, 'gc-gone-9876543210'); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **other), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(other["AGENTKERNEL_RUNTIME_DIR"], "egress", "net.json")) as f:
        net = json.load(f)
    subprocess.run([sys.executable, "-c", "from agentkernel.egress import gateway_ctl; gateway_ctl.stop()"],
                   env=dict(os.environ, **other), check=False)
    shutil.rmtree(other_root)  # the installation is gone, its plumbing is not
    shorts = {"9876543210"}
    assert _ours_left(net, shorts)
    r = ak("gc", env=installation)
    assert r.returncode == 0, r.stderr.decode()
    assert _ours_left(net, shorts) == [], r.stdout.decode()
