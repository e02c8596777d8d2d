"""``python -m agentkernel.oci prepare [IMAGE...]``: get the host ready for the ``oci`` backend ahead of
time (scripts/setup.sh runs it): report missing host pieces with their fix, unpack the local images into
the rootfs cache and have crun compile the seccomp profiles, so the first ``run --backend oci`` is as
fast as every later one. Idempotent: a second run only checks.
"""

from __future__ import annotations

import sys


def prepare(images: list[str]) -> int:
    from ..backends.oci import host_problems
    from ..errors import AgentKernelError
    from ..images import LOCAL_IMAGES
    from . import rootfs, seccomp_oci
    from . import runtime as rt

    found = [r for r in rt.RUNTIMES if rt.binary(r)]
    if not found:
        print("oci: no OCI runtime installed: apt-get install -y crun runc", file=sys.stderr)
        return 1
    status = 0
    for problem, fix in host_problems("crun" if "crun" in found else found[0]):
        print(f"oci: {problem}\n  fix: {fix}", file=sys.stderr)
        status = 1
    for image in images or list(LOCAL_IMAGES):
        try:
            rf = rootfs.resolve(image)
            print(f"    oci rootfs {image}: {rf.path}", file=sys.stderr)
        except AgentKernelError as exc:
            print(
                f"oci: {image}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr
            )
            status = 1
    if "crun" in found:
        crun = rt.require_binary("crun")
        for name in ("default", "restrictive"):
            if seccomp_oci.crun_bpf_b64(name, crun) is None:
                print(
                    f"oci: crun could not precompile the {name} seccomp profile (it will compile it per run)",
                    file=sys.stderr,
                )
    return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "prepare":
        print("usage: python -m agentkernel.oci prepare [IMAGE...]", file=sys.stderr)
        return 2
    return prepare(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
