"""Benchmark (not a test): what the egress gateway costs.

1. Cold one-shot overhead: median wall time of `agentkernel run --no-daemon -B BACKEND -- true` with
   network none vs allowlist vs open (gateway already running).
2. Latency the gateway adds to one HTTP request: inside one sandbox, N sequential GETs to a test host
   in a namespace this script creates, through the gateway (allowlist, proxy) and direct (open mode).

Run as root: PYTHONPATH=. .venv/bin/python scripts/bench_egress.py [N]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 15
os.environ.setdefault("AGENTKERNEL_RUNTIME_DIR", tempfile.mkdtemp(prefix="ak-bench-run-"))
os.environ.setdefault("AGENTKERNEL_HOME", tempfile.mkdtemp(prefix="ak-bench-home-"))
os.environ["AGENTKERNEL_NO_DAEMON"] = "1"

from tests.egress import conftest  # noqa: E402  (the test network: a namespace with a test host)

CLIENT = r"""
import sys, time, urllib.request
url, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
op = urllib.request.build_opener(*( [urllib.request.ProxyHandler({})] if mode == "direct" else []))
ts = []
for _ in range(n + 3):
    t = time.perf_counter(); op.open(url, timeout=5).read(); ts.append(time.perf_counter() - t)
ts = sorted(ts[3:]); print(f"{ts[len(ts)//2]*1000:.2f} {ts[int(len(ts)*0.9)]*1000:.2f}")
"""


def ak(*args):
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, text=True)


MODES = (("none", ()), ("allowlist", ("--allow-host", "allowed.test")), ("open", ("--network", "open")))


def cold(backend, n):
    """Median ms per mode; the modes alternate run by run, so load drift hits them alike."""
    ts = {m: [] for m, _ in MODES}
    for _ in range(n):
        for m, flags in MODES:
            t = time.perf_counter()
            r = ak("run", "--no-daemon", "-B", backend, *flags, "--", "true")
            ts[m].append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
    return {m: statistics.median(v) * 1000 for m, v in ts.items()}


def attach_release(n):
    """What the egress layer itself adds: attach + release of one sandbox, in-process (gateway running)."""
    from agentkernel.config import resolve_spec
    from agentkernel.egress.attach import attach, release

    spec = resolve_spec({"allow_host": ["allowed.test"]})
    a, r = [], []
    for i in range(n):
        sid = f"bench-{i:010x}"
        t = time.perf_counter()
        attach(spec, sid)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        release(sid)
        r.append(time.perf_counter() - t)
    return statistics.median(a) * 1000, statistics.median(r) * 1000


def main():
    gen = conftest.make_testnet()
    net = next(gen)
    try:
        ak("run", "--no-daemon", "-B", "oci", "--allow-host", "allowed.test", "--", "true")  # start the gateway
        a, r = attach_release(N)
        print(f"egress attach {a:.1f} ms, release {r:.1f} ms (median of {N}, in-process)")
        print(f"cold one-shot `run -- true`, median of {N}, modes interleaved (ms):")
        for backend in ("oci", "podman", "docker"):
            row = cold(backend, N)
            print(f"  {backend:7s} none {row['none']:.1f}  allowlist {row['allowlist']:.1f} "
                  f"(+{row['allowlist'] - row['none']:.1f})  open {row['open']:.1f} (+{row['open'] - row['none']:.1f})")
        print("HTTP GET inside one sandbox, 200 requests, median / p90 (ms):")
        for label, flags, url, mode in (
                ("via gateway (allowlist, proxy)", ("--allow-host", "allowed.test"), "http://allowed.test/", "proxy"),
                ("via gateway (allowlist, transparent)", ("--allow-host", "allowed.test"), "http://allowed.test/",
                 "direct"),
                ("direct (open mode, no gateway)", ("--network", "open"), f"http://{net.addr}/", "direct")):
            r = ak("run", "--no-daemon", "-B", "oci", "-i", "agentkernel/debian", *flags, "--", "python3", "-c",
                   CLIENT, url, mode, "200")
            print(f"  {label:38s} {r.stdout.strip() or r.stderr.strip()}")
    finally:
        try:
            next(gen)
        except StopIteration:
            pass


if __name__ == "__main__":
    main()
