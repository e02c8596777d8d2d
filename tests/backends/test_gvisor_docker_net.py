"""gvisor-docker's networked runtime: the wrapper dockerd runs as ``runsc-agentkernel-net`` (run here on
real bundles and a real network namespace, with ``echo`` standing in for runsc), and the backend's
refusal when dockerd's registration is not that wrapper. The attacks through it: tests/egress
(``gvisor-docker`` in ENFORCING)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from agentkernel.backends import _runsc_net_wrapper

RUNTIME_DIR = "/run/user/0/agentkernel"


def _wrapper(tmp_path) -> str:
    path = str(tmp_path / "runsc-agentkernel-net")
    with open(path, "w") as f:
        f.write(_runsc_net_wrapper.text(runsc="/bin/echo"))
    os.chmod(path, 0o755)
    return path


def _bundle(tmp_path, resolv_source: str | None) -> str:
    d = tmp_path / "bundle"
    d.mkdir()
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"}]
    if resolv_source:
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv_source,
                       "options": ["rbind", "ro"]})
    spec = {"mounts": mounts, "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}}
    (d / "config.json").write_text(json.dumps(spec))
    return str(d)


def _run(wrapper: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([wrapper, *argv], capture_output=True, text=True, timeout=30)


@pytest.fixture
def egress_netns():
    """A real namespace named as egress.netns names a sandbox's (ak-<10 hex>)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (ip netns add)")
    short = secrets.token_hex(5)
    subprocess.run(["ip", "netns", "add", f"ak-{short}"], check=True)
    yield short
    subprocess.run(["ip", "netns", "del", f"ak-{short}"], check=False)


def test_create_joins_the_sandboxes_egress_namespace(tmp_path, egress_netns):
    w = _wrapper(tmp_path)
    b = _bundle(tmp_path, f"{RUNTIME_DIR}/egress/resolv/{egress_netns}")
    r = _run(w, "--root", "/run/x", "--network=host", "create", "--bundle", b, "--pid-file", "p", "cid")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["--root", "/run/x", "--network=host", "create", "--bundle", b, "--pid-file", "p",
                                "cid"]  # runsc got the arguments as they were
    with open(os.path.join(b, "config.json")) as f:
        nss = json.load(f)["linux"]["namespaces"]
    assert {"type": "network", "path": f"/run/netns/ak-{egress_netns}"} in nss, nss
    assert [n for n in nss if n["type"] != "network"] == [{"type": "pid"}, {"type": "mount"}]


@pytest.mark.parametrize("source,why", [
    (None, "no agentkernel egress attachment"),
    ("/etc/resolv.conf", "no agentkernel egress attachment"),
    (f"{RUNTIME_DIR}/egress/resolv/..", "no agentkernel egress attachment"),
    (f"{RUNTIME_DIR}/egress/resolv/0123456789", "/run/netns/ak-0123456789 does not exist"),
])
def test_create_elsewhere_is_refused_and_runsc_never_runs(tmp_path, source, why):
    w = _wrapper(tmp_path)
    b = _bundle(tmp_path, source)
    cfg = tmp_path / "bundle" / "config.json"
    before = cfg.read_text()
    r = _run(w, "create", "--bundle", b, "cid")
    assert r.returncode == 125 and why in r.stderr and r.stdout == "", r
    assert cfg.read_text() == before


def test_other_commands_go_straight_to_runsc(tmp_path):
    w = _wrapper(tmp_path)
    r = _run(w, "--root", "/run/x", "--host-uds=create", "state", "cid")
    assert (r.returncode, r.stdout.split()) == (0, ["--root", "/run/x", "--host-uds=create", "state", "cid"]), r


def test_backend_refuses_a_registration_that_is_not_the_current_wrapper(tmp_path, monkeypatch):
    """dockerd answers with the runtime's path and flags; only our wrapper, byte for byte, is accepted."""
    from agentkernel.backends import gvisor_docker

    good = tmp_path / "good"
    good.write_text(_runsc_net_wrapper.text())
    stale = tmp_path / "stale"
    stale.write_text(_runsc_net_wrapper.text().replace("runsc-agentkernel-net", "an older wrapper"))
    args = ["--network=host", "--platform=ptrace", "--oci-seccomp", "--host-uds=create"]
    cases = {str(good): None, str(stale): "not agentkernel's current wrapper", "/usr/bin/runsc": "not agentkernel's",
             str(tmp_path / "missing"): "not agentkernel's"}
    for path, why in cases.items():
        monkeypatch.setattr(gvisor_docker, "runtime_entry", lambda _rt, p=path: {"path": p, "runtimeArgs": args})
        ok, reason = gvisor_docker._net_runtime_status("runsc-agentkernel-net")
        assert ok is (why is None) and (why or "") in reason, (path, reason)


def test_setup_writes_the_wrapper_the_backend_accepts(tmp_path, monkeypatch):
    from agentkernel import hostsetup

    monkeypatch.setattr(hostsetup, "RUNSC_NET_WRAPPER", str(tmp_path / "lib" / "runsc-agentkernel-net"))
    step = hostsetup.runsc_net_wrapper_step()
    f = step.check()
    assert not f.ok and "missing" in f.detail
    step.apply()
    assert step.check().ok
    assert os.stat(hostsetup.RUNSC_NET_WRAPPER).st_mode & 0o777 == 0o755
    with open(hostsetup.RUNSC_NET_WRAPPER) as fh:
        assert fh.read() == _runsc_net_wrapper.text()
    assert hostsetup.RUNSC_NET_WRAPPER.endswith(os.path.basename(_runsc_net_wrapper.PATH))
    r = subprocess.run([sys.executable, "-c", "import agentkernel.hostsetup as h, agentkernel.backends."
                        "_runsc_net_wrapper as w; assert h.RUNSC_NET_WRAPPER == w.PATH"], capture_output=True)
    assert r.returncode == 0, r.stderr
