"""Install like the package it is: build the wheel (it carries the prebuilt agent and WASI shell), install
it into a fresh virtual environment outside the checkout, and run `agentkernel doctor`, `run` and
`serve` from there. No compiler is involved after the wheel is built."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.engine("podman"), pytest.mark.slow]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), REPO],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (whl,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return whl


def test_wheel_carries_the_prebuilt_binaries(wheel):
    assert os.path.basename(wheel).startswith("agentkernel_sandbox-")
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        for name in ("agentkernel/_prebuilt/ak-agent", "agentkernel/_prebuilt/aksh.wasm",
                     "agentkernel/api/mcp_tools.json"):  # the MCP tool list (api/mcp_identity.py)
            assert name in infos
        assert (infos["agentkernel/_prebuilt/ak-agent"].external_attr >> 16) & 0o111  # executable
        entry = z.read(next(n for n in infos if n.endswith("entry_points.txt"))).decode()
        assert "agentkernel = agentkernel.cli:entry" in entry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_installed_wheel_runs_doctor_run_and_serve(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[api,mcp]"], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(AGENTKERNEL_HOME=str(tmp_path / "home"), AGENTKERNEL_RUNTIME_DIR=str(tmp_path / "run"),
               AGENTKERNEL_AGENT_BIN="", AGENTKERNEL_AKSH_WASM="")
    exe = str(venv / "bin" / "agentkernel")
    cwd = str(tmp_path)  # outside the checkout: nothing of it is on the path

    def ak(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import agentkernel, agentkernel.paths as p; "
                            "print(agentkernel.__file__); print(p.agent_binary())"],
                           capture_output=True, text=True, env=env, cwd=cwd)
    mod, agent = where.stdout.split()
    assert mod.startswith(str(venv)) and agent.startswith(str(venv)) and agent.endswith("_prebuilt/ak-agent")
    p = ak("doctor")
    assert p.returncode == 0 and "podman" in p.stdout, p.stderr
    # setup from the wheel: no source checkout, the wheel's agent; this machine has everything podman needs
    p = ak("setup", "--check", "-B", "podman")
    assert p.returncode == 0 and "_prebuilt/ak-agent" in p.stdout, p.stdout + p.stderr
    assert "everything the chosen backends need is here" in p.stdout
    p = ak("run", "--", "sh", "-c", "echo from-the-wheel; test -x /.ak/ak-agent && echo agent-inside")
    assert (p.returncode, p.stdout) == (0, "from-the-wheel\nagent-inside\n"), p.stderr
    port = _free_port()
    srv = subprocess.Popen([exe, "serve", "-p", str(port), "--pool-min", "0"], env=env, cwd=cwd,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and srv.poll() is None, "serve did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/run", json={"command": ["echo", "served"]}, timeout=120)
        assert r.json()["data"]["stdout"] == "served\n"
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    assert srv.returncode == 0
