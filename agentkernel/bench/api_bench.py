"""HTTP API benchmark (not a test): `/run` latency from a warm pool, and requests/s at 10 and 100
concurrent clients, for one-shot runs (each a fresh use-once sandbox) and for execs in one named
sandbox (API + agent overhead only).

    python -m agentkernel.bench.api_bench                       # starts its own `agentkernel serve`
    python -m agentkernel.bench.api_bench --url http://127.0.0.1:18888 --token T
    BENCH_ITERATIONS=50 python -m agentkernel.bench.api_bench --json out.json

Latency is measured sequentially with a pause between runs long enough for the pool to refill, so
every sample is a warm-pool hit (the result's ``timings.pooled`` is checked). Throughput runs N
requests through C concurrent clients (one raw keep-alive HTTP/1.1 connection each, ``KeepAlive``: no HTTP
library in the client's loop) and reports completed requests/s, the success rate and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summary(lat_ms: list[float]) -> dict[str, float]:
    return {"n": len(lat_ms), "mean_ms": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
            "p50_ms": round(_pct(lat_ms, 50), 2), "p95_ms": round(_pct(lat_ms, 95), 2),
            "p99_ms": round(_pct(lat_ms, 99), 2), "min_ms": round(min(lat_ms), 2) if lat_ms else None}


def run_latency(url: str, headers: dict[str, str], iterations: int = 30, pause_s: float = 0.6) -> dict[str, Any]:
    """Sequential `/run echo hello` from the warm pool: client-observed end-to-end milliseconds."""
    lat, server, hits = [], [], 0
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        for _ in range(3):  # warm-up (connection, imports, first pool use)
            c.post("/run", json={"command": ["echo", "hello"]})
            time.sleep(pause_s)
        for _ in range(iterations):
            t = time.perf_counter()
            r = c.post("/run", json={"command": ["echo", "hello"]})
            dt = (time.perf_counter() - t) * 1e3
            d = r.json()["data"]
            assert d["stdout"] == "hello\n", d
            lat.append(dt)
            server.append(d["timings"].get("server_ms", 0.0))
            hits += int(d["timings"].get("pooled", 0) == 1.0)
            time.sleep(pause_s)
    return {"client": _summary(lat), "server": _summary(server), "pool_hits": hits, "iterations": iterations}


class KeepAlive:
    """One raw HTTP/1.1 keep-alive connection (asyncio streams): requests written by hand, responses read by
    Content-Length (or chunked). The bench's client, so that the client's own cost per request (an HTTP
    library's) is not what is measured."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        rest = url.split("://", 1)[-1].rstrip("/")
        host, _, port = rest.partition(":")
        self.host, self.port = host, int(port or 80)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": rest, **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "content-length" in hdrs:
            data = await self.reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        else:
            data = await self.reader.read()
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _throughput(url: str, headers: dict[str, str], path: str, body: dict, total: int,
                      concurrency: int) -> dict[str, Any]:
    lat: list[float] = []
    ok = fail = 0
    errors: list[str] = []
    left = total
    raw = json.dumps(body).encode()

    async def worker() -> None:
        nonlocal ok, fail, left
        conn = KeepAlive(url, headers)
        try:
            while left > 0:
                left -= 1
                t = time.perf_counter()
                try:
                    status, data = await conn.post(path, raw)
                    good = status == 200 and json.loads(data)["data"]["exit_code"] == 0
                    if not good and len(errors) < 5:
                        errors.append(f"{status}: {data[:200]!r}")
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    good = False
                    await conn.close()
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                lat.append((time.perf_counter() - t) * 1e3)
                ok += good
                fail += not good
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    out = {"concurrency": concurrency, "requests": total, "ok": ok, "failed": fail,
           "success_rate": round(ok / total, 4), "wall_s": round(wall, 3), "rps": round(total / wall, 1),
           "latency": _summary(lat)}
    if errors:
        out["errors"] = errors
    return out


def throughput(url: str, headers: dict[str, str], path: str, body: dict, total: int, concurrency: int):
    return asyncio.run(_throughput(url, headers, path, body, total, concurrency))


def serve_speed(quick: bool = False) -> dict[str, Any]:
    """The ``speed`` suite's ``serve`` row: a fresh ``agentkernel serve`` (pool min 2, max 32), ``/run``
    (300; ``quick`` 30) and exec in one named sandbox (3,000; ``quick`` 200) at 10 concurrent keep-alive
    clients, each beside the same work done directly (``direct``) in the same run, with the ratio."""
    token = "bench-token-0123456789abcdef"
    proc, url, home = start_server(2, 32, token)
    headers = {"Authorization": f"Bearer {token}"}
    res: dict[str, Any] = {}
    try:
        wait_ready(url, headers, 2)
        runs, execs = (30, 200) if quick else (300, 3000)
        http = throughput(url, headers, "/run", {"command": ["echo", "hello"]}, runs, 10)
        wait_ready(url, headers, 2)
        res["serve_run_c10"] = with_ratio(http, direct(home, "run", runs, 10))
        name = f"bench-exec-{os.getpid()}"
        httpx.post(url + "/sandboxes", json={"name": name}, headers=headers, timeout=60).raise_for_status()
        try:
            throughput(url, headers, f"/sandboxes/{name}/exec", {"command": ["echo", "hello"]}, 50, 10)  # warm-up
            http = throughput(url, headers, f"/sandboxes/{name}/exec", {"command": ["echo", "hello"]}, execs, 10)
            res["serve_exec_c10"] = with_ratio(http, direct(home, "exec", execs, 10, name=name))
        finally:
            httpx.delete(f"{url}/sandboxes/{name}", headers=headers, timeout=60)
    finally:
        proc.terminate()
        proc.wait(60)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


# ---- the same work without HTTP ------------------------------------------------------------------------------


async def _direct(kind: str, name: str | None, tenant: str, total: int, concurrency: int) -> dict[str, Any]:
    """``total`` ``echo hello`` at ``concurrency`` through the layer under the HTTP API, in this process:
    one-shot runs over the server's daemon socket (one multiplexed connection) with the very spec the server
    resolves for this tenant's ``/run``; execs in the named sandbox through the sandbox manager (its agent)."""
    from .. import config as cfgmod
    from ..api.auth import load_tokens, tenants
    from ..api.policy import ServerPolicy
    from ..api.service import Service
    from ..backends.base import ExecRequest
    from ..daemon.mux_client import MuxClient
    from ..manager import SandboxManager

    argv = ["echo", "hello"]
    lat: list[float] = []
    ok = fail = 0
    left = total
    mgr = mux = None
    if kind == "run":
        cfg = cfgmod.load_config(cfgmod.find_config(None, os.getcwd()))
        tokens = load_tokens(config=cfg, cwd=os.getcwd())
        policy = ServerPolicy.from_config(cfg, token_tenants=tenants(tokens) if tokens else None)
        spec = Service(config=cfg, with_daemon=False, policy=policy).run_spec(tenant, argv)
        mux = await MuxClient.connect()
    else:
        mgr = SandboxManager()

    async def one() -> bool:
        if mux is not None:
            r = await mux.run(argv, spec, timeout=60)
            return r["exit_code"] == 0 and r["stdout"] == b"hello\n"
        assert mgr is not None and name is not None
        res = await mgr.exec(name, ExecRequest(argv, timeout=60), tenant)
        return res.exit_code == 0 and res.stdout == b"hello\n"

    async def worker() -> None:
        nonlocal ok, fail, left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            try:
                good = await one()
            except Exception:
                good = False
            lat.append((time.perf_counter() - t) * 1e3)
            ok += good
            fail += not good

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if mux is not None:
            await mux.close()
        if mgr is not None:
            await mgr.aclose()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": total, "ok": ok, "failed": fail,
            "success_rate": round(ok / total, 4), "wall_s": round(wall, 3), "rps": round(total / wall, 1),
            "latency": _summary(lat)}


def direct(home: str, kind: str, total: int, concurrency: int, *, name: str | None = None,
           tenant: str = "api:bench") -> dict[str, Any]:
    """``_direct`` in a child process with the server's directories (``home``, as ``start_server`` made it):
    the engine-side rate the HTTP numbers are a ratio of, measured in the same run."""
    env = dict(os.environ, **_server_env(home, None))
    argv = [sys.executable, "-m", "agentkernel.bench.api_bench", "--direct", kind, "--requests", str(total),
            "--concurrency", str(concurrency), "--tenant", tenant] + (["--name", name] if name else [])
    out = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout)


def with_ratio(http: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """The HTTP result with the direct one beside it and ``ratio`` = HTTP req/s over direct req/s."""
    out = dict(http, direct=raw)
    if raw.get("rps"):
        out["ratio_vs_direct"] = round(http["rps"] / raw["rps"], 3)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The bench's caller may run as many commands at once as a throughput point asks for, and sees the pool
# metrics (wait_ready reads them): the server policy's defaults (8 concurrent runs) are for remote callers.
BENCH_API_CONFIG = "[api]\nadmins = [\"bench\"]\nmax_runs = 256\nmax_sandboxes = 64\n"


def _server_env(home: str, token: str | None) -> dict[str, str]:
    """The bench server's own directories (and its token): never another daemon's state."""
    env = {"AGENTKERNEL_HOME": os.path.join(home, "home"), "AGENTKERNEL_RUNTIME_DIR": os.path.join(home, "run"),
           "AGENTKERNEL_AUDIT": "0"}
    if token:
        env["AGENTKERNEL_API_TOKENS"] = f"bench={token}"
    return env


def start_server(pool_min: int, pool_max: int, token: str) -> tuple[subprocess.Popen, str, str]:
    home = tempfile.mkdtemp(prefix="ak-api-bench-")
    with open(os.path.join(home, "agentkernel.toml"), "w") as f:
        f.write(BENCH_API_CONFIG)
    port = _free_port()
    env = dict(os.environ, **_server_env(home, token))
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "serve", "--port", str(port), "--pool-min",
                             str(pool_min), "--pool-max", str(pool_max), "--log-level", "warning"],
                            env=env, cwd=home, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(home, "serve.log"), "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url, home


def wait_ready(url: str, headers: dict[str, str], n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
            if line.startswith("agentkernel_pool_ready{") and float(line.rsplit(" ", 1)[1]) >= n:
                return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agentkernel.bench.api_bench")
    p.add_argument("--url")
    p.add_argument("--token", default=os.environ.get("AGENTKERNEL_API_KEY"))
    p.add_argument("--iterations", type=int, default=int(os.environ.get("BENCH_ITERATIONS", "30")))
    p.add_argument("--pool-min", type=int, default=2)
    p.add_argument("--pool-max", type=int, default=8)
    p.add_argument("--runs", type=int, default=100, help="one-shot runs per throughput point")
    p.add_argument("--execs", type=int, default=1000, help="execs per throughput point")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--direct", choices=["run", "exec"], help=argparse.SUPPRESS)  # the child of ``direct``
    p.add_argument("--requests", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--tenant", default="api:bench", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.direct:
        print(json.dumps(asyncio.run(_direct(a.direct, a.name, a.tenant, a.requests, a.concurrency))))
        return 0
    proc = home = None
    token = a.token or "bench-token-0123456789abcdef"
    url = a.url
    if not url:
        proc, url, home = start_server(a.pool_min, a.pool_max, token)
    headers = {"Authorization": f"Bearer {token}"}
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    out: dict[str, Any] = {"machine": machine,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backend": "podman",
                           "image": "agentkernel/busybox", "pool": {"min": a.pool_min, "max": a.pool_max}}
    try:
        wait_ready(url, headers, a.pool_min)
        out["run_latency_warm"] = run_latency(url, headers, a.iterations)
        print("run latency (warm pool):", json.dumps(out["run_latency_warm"]), flush=True)
        for c in (10, 100):
            wait_ready(url, headers, a.pool_min)
            r = throughput(url, headers, "/run", {"command": ["echo", "hello"]}, max(a.runs, c), c)
            if home is not None and c == 10:
                wait_ready(url, headers, a.pool_min)
                r = with_ratio(r, direct(home, "run", max(a.runs, c), c))
            out[f"run_throughput_c{c}"] = r
            print(f"/run x{r['requests']} @ {c} concurrent:", json.dumps(r), flush=True)
        name = "bench-exec"
        httpx.post(url + "/sandboxes", json={"name": name}, headers=headers, timeout=60)
        try:
            for c in (10, 100):
                r = throughput(url, headers, f"/sandboxes/{name}/exec", {"command": ["echo", "hello"]},
                               max(a.execs, c), c)
                if home is not None and c == 10:
                    r = with_ratio(r, direct(home, "exec", max(a.execs, c), c, name=name))
                out[f"exec_throughput_c{c}"] = r
                print(f"/exec x{r['requests']} @ {c} concurrent:", json.dumps(r), flush=True)
        finally:
            httpx.delete(f"{url}/sandboxes/{name}", headers=headers, timeout=60)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
