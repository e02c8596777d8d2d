"""Helpers for the API tests: a real `agentkernel serve` in a subprocess on 127.0.0.1 (free port), real
podman underneath, small pools. Nothing is mocked.

One session server (tokens for three tenants) serves most tests; tests that need another
configuration (no token, restart) start their own with ``start_server``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import skip_unavailable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKENS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef00",
    "fuzz": "fuzz-token-0123456789abcdef0",
    "ops": "ops-token-0123456789abcdef000",  # an admin (AGENTKERNEL_API_ADMINS): sees the whole /metrics
}


def _need_podman() -> None:
    if shutil.which("podman") is None:
        skip_unavailable("podman", "podman is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_dir: str, *, tokens: dict[str, str] | None = None, pool_min: int = 1, pool_max: int = 3,
                 extra_env: dict[str, str] | None = None, args: list[str] | None = None,
                 port: int | None = None, ready_timeout: float = 60) -> Server:
    _need_podman()
    port = port or free_port()
    env = dict(os.environ)
    env.pop("AGENTKERNEL_API_KEY", None)
    env["AGENTKERNEL_API_TOKENS"] = ",".join(f"{k}={v}" for k, v in (tokens or {}).items())
    env["AGENTKERNEL_LOG_LEVEL"] = "warning"
    env["AGENTKERNEL_API_ADMINS"] = "ops"
    # these tests inspect podman containers (leaks, snapshots as committed images): backend auto may pick oci
    env.setdefault("AGENTKERNEL_BACKEND", "podman")
    env.update(extra_env or {})
    os.makedirs(tmp_dir, exist_ok=True)
    log_path = os.path.join(tmp_dir, f"serve-{port}.log")
    logf = open(log_path, "ab")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "serve", "--port", str(port),
                             "--pool-min", str(pool_min), "--pool-max", str(pool_max), *(args or [])],
                            stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=tmp_dir)
    srv = Server(proc, port, log_path)
    deadline = time.monotonic() + ready_timeout  # start-up scans every engine for orphans: slow on a busy host
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.log()}")
        try:
            if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    srv.stop()
    raise RuntimeError(f"server did not come up:\n{srv.log()}")


def wait_pool_ready(url: str, token: str | None, n: int = 1, timeout: float = 60) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", headers=headers, timeout=5).text
        for line in text.splitlines():
            if line.startswith("agentkernel_pool_ready{") and float(line.rsplit(" ", 1)[1]) >= n:
                return
        time.sleep(0.2)
    raise AssertionError("the warm pool never became ready")


def containers(label: str | None = None) -> list[str]:
    label = label or os.environ["AGENTKERNEL_LABELS"].split(",")[0]
    r = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter", f"label={label}"],
                       capture_output=True, text=True)
    return [n for n in r.stdout.split() if n]


def auth(tenant: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


_counter = [0]


def unique(prefix: str = "t") -> str:
    _counter[0] += 1
    return f"{prefix}-{os.getpid()}-{_counter[0]}"


def host_processes(pattern: str) -> list[str]:
    r = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if pattern in ln and "ps -eo" not in ln]


def wait_until(pred, timeout: float = 20, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


_ = REPO
