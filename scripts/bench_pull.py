"""Benchmark (not a test): cold pull and cached run of a ~50 MB (compressed) image, per backend.

A real registry on loopback (TLS + htpasswd, tests/images/loopback_registry.py) serves a one-layer image
made from agentkernel/debian's rootfs tarball plus a random file, so no engine has its layer yet (a truly
cold pull). For each backend: ``agentkernel images pull`` (cold), the first ``run`` (oci unpacks on pull),
then the median of N cached ``run -- true``, next to the same for the locally built agentkernel/debian
(same machine, same minute: the pulled image must cost no more to run than a local one).

    PYTHONPATH=. .venv/bin/python scripts/bench_pull.py [--runs 5] [--backends oci,podman,docker]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "images"))
from loopback_registry import LoopbackRegistry, write_layout


def unique_layer(base_tar: str) -> bytes:
    import io
    import tarfile

    with open(base_tar, "rb") as f:
        data = f.read()
    # drop the two zero end-of-archive blocks (and padding), append one random file, close again
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        ti = tarfile.TarInfo("unique.bin")
        payload = os.urandom(64 * 1024)
        ti.size, ti.mode = len(payload), 0o644
        dst.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backends", default="oci,podman,docker")
    a = ap.parse_args()
    tars = sorted(glob.glob("/var/cache/agentkernel/images/agentkernel_debian-*.tar"))
    if not tars:
        print("no agentkernel/debian tarball: run agentkernel images build debian", file=sys.stderr)
        return 1
    root = tempfile.mkdtemp(prefix="ak-bench-pull-")
    home, cache = os.path.join(root, "home"), os.path.join(root, "cache")
    env = dict(os.environ, HOME=home, AGENTKERNEL_CACHE=cache, AGENTKERNEL_NO_DAEMON="1")
    pulled = []
    try:
        with LoopbackRegistry() as reg:
            reg.auth_file(os.path.join(home, ".docker", "config.json"))
            rows = []
            for backend in a.backends.split(","):
                layout = os.path.join(root, f"layout-{backend}")
                write_layout(layout, [unique_layer(tars[-1])])
                blob_mb = sum(os.path.getsize(p) for p in glob.glob(f"{layout}/blobs/sha256/*")) / 1e6
                reg.push(f"oci:{layout}", f"bench/debian-{backend}:1")
                ref = reg.ref(f"bench/debian-{backend}:1")
                pulled.append(ref)

                def ak(*args: str) -> float:
                    t = time.monotonic()
                    r = subprocess.run([sys.executable, "-m", "agentkernel", *args], env=env, capture_output=True,
                                       text=True, stdin=subprocess.DEVNULL)
                    if r.returncode != 0:
                        raise SystemExit(f"{args}: {r.stderr}")
                    return time.monotonic() - t

                cold = ak("images", "pull", "-B", backend, ref)
                first = ak("run", "-B", backend, "-i", ref, "--", "true")
                cached = [ak("run", "-B", backend, "-i", ref, "--", "true") for _ in range(a.runs)]
                local = [ak("run", "-B", backend, "-i", "agentkernel/debian", "--", "true") for _ in range(a.runs)]
                rows.append((backend, blob_mb, cold, first, statistics.median(cached), min(cached),
                             statistics.median(local)))
        print(f"{'backend':8} {'image MB':>9} {'cold pull s':>12} {'1st run s':>10} {'cached run ms (median/min)':>28}"
              f" {'local agentkernel/debian run ms (median)':>42}")
        for b, mb, cold, first, med, mn, base in rows:
            print(f"{b:8} {mb:9.1f} {cold:12.2f} {first:10.2f} {med * 1000:18.0f} / {mn * 1000:<7.0f} "
                  f"{base * 1000:>34.0f}")
    finally:
        for ref in pulled:
            subprocess.run(["podman", "rmi", "-f", ref], capture_output=True)
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
