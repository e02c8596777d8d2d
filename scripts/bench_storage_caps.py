"""Per-run cost of the storage caps (docs/security.md, "Storage"). As root, with the storage volume that
scripts/setup.sh mounts. Prints medians; run it on a quiet machine and compare the pairs, not absolutes.

    python scripts/bench_storage_caps.py [N]

1. primitives, N iterations each: a capped btrfs subvolume (create + limit + delete), a tmpfs mount +
   unmount (what the oci layer costs), a plain /dev/shm mkdir + rmdir (uncapped wasm scratch);
2. a wasm one-shot (`echo hi` through aksh, in process): profile default (capped scratch) vs --disk unlimited,
   alternating.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time


def _median_us(fn, n: int) -> float:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1e6)
    return statistics.median(out)


def primitives(n: int) -> None:
    from agentkernel import diskquota

    base = os.path.join(diskquota.volume(), "bench-caps")
    os.makedirs(base, exist_ok=True)

    def subvol(i: int) -> None:
        p = diskquota.make_capped_dir(os.path.join(base, f"s{i}"), 50)
        diskquota.remove_capped_dir(p)

    libc = ctypes.CDLL(None, use_errno=True)
    mp = os.path.join(base, "mnt")
    os.makedirs(mp, exist_ok=True)

    def tmpfs(i: int) -> None:
        if libc.mount(b"tmpfs", mp.encode(), b"tmpfs", 0, b"size=50m,mode=0700") != 0:
            raise OSError(ctypes.get_errno(), "mount")
        if libc.umount2(mp.encode(), 2) != 0:
            raise OSError(ctypes.get_errno(), "umount")

    def shm(i: int) -> None:
        d = f"/dev/shm/ak-bench-{os.getpid()}-{i}"
        os.mkdir(d)
        os.rmdir(d)

    print(f"capped subvolume create+limit+delete: {_median_us(subvol, n):.0f} us")
    print(f"tmpfs mount+umount:                   {_median_us(tmpfs, n):.0f} us")
    print(f"/dev/shm mkdir+rmdir:                 {_median_us(shm, n):.0f} us")
    os.rmdir(mp)
    os.rmdir(base)


def wasm(n: int) -> None:
    from agentkernel.backends.base import ExecRequest
    from agentkernel.backends.wasm import WasmBackend
    from agentkernel.config import resolve_spec

    b = WasmBackend()
    capped = resolve_spec({"backend": "wasm"}, config={}, environ={})
    unlimited = resolve_spec({"backend": "wasm", "disk_mb": "unlimited"}, config={}, environ={})
    req = ExecRequest(["echo", "hi"])
    for s in (capped, unlimited):
        for _ in range(20):
            b.run_sync(s, req)
    res: dict[str, list[float]] = {"capped": [], "unlimited": []}
    for _ in range(n):
        for k, s in (("capped", capped), ("unlimited", unlimited)):
            t = time.perf_counter()
            r = b.run_sync(s, req)
            res[k].append((time.perf_counter() - t) * 1e3)
            assert r.exit_code == 0 and r.stdout == b"hi\n", r
    for k, v in res.items():
        cap = "2048" if k == "capped" else "unlimited"
        print(f"wasm echo hi, {k} (disk_mb={cap}): median {statistics.median(v):.3f} ms")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(f"load average: {os.getloadavg()[0]:.1f}")
    primitives(n)
    wasm(n)
