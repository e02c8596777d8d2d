"""TEST TOOL: both emulators at once, for the orchestration benchmark when no real cluster is configured.

    python -m tests.emulators.clusters [agentkernel bench arguments...]

starts the Kubernetes and Nomad emulators, points KUBECONFIG / NOMAD_ADDR / NOMAD_TOKEN at them and runs
``agentkernel bench --suites orchestration --backends kubernetes,nomad`` plus the given arguments."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

from .kube_apiserver import Emulator
from .nomad_agent import NomadEmulator

NOMAD_TOKEN = "emulator-nomad-acl-token"


@contextlib.contextmanager
def emulated_cluster(backend: str, workdir: str):
    """Starts one emulator ("kubernetes" or "nomad") and yields the environment variables that point
    agentkernel at it (the tests' stand-in for KUBECONFIG / NOMAD_ADDR of a real cluster)."""
    if backend == "kubernetes":
        kube = Emulator().serve_in_thread()
        try:
            cfg = os.path.join(workdir, "agentkernel.toml")
            with open(cfg, "w") as f:  # the emulated kubelet's podPidsLimit, as a real cluster's config says
                f.write(f'[orchestrator]\nnamespace = "agentkernel"\npod_pids_limit = {kube.emu.pod_pids_limit}\n')
            yield {"KUBECONFIG": kube.kubeconfig(os.path.join(workdir, "kubeconfig")), "AGENTKERNEL_CONFIG": cfg,
                   "AGENTKERNEL_BENCH_POD_PIDS_LIMIT": str(kube.emu.pod_pids_limit)}
        finally:
            kube.stop()
    elif backend == "nomad":
        nomad = NomadEmulator(token=NOMAD_TOKEN).serve_in_thread()
        try:
            yield {"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": NOMAD_TOKEN}
        finally:
            nomad.stop()
    else:
        raise ValueError(f"no emulator for {backend!r} (kubernetes, nomad)")


@contextlib.contextmanager
def emulated_clusters(workdir: str):
    """Yields the environment variables that point agentkernel at the two emulators."""
    with emulated_cluster("kubernetes", workdir) as kube, emulated_cluster("nomad", workdir) as nomad:
        yield {**kube, **nomad}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="akemu-") as d, emulated_clusters(d) as env:
        argv = [sys.executable, "-m", "agentkernel", "bench", "--suites", "orchestration", "--backends",
                "kubernetes,nomad", *sys.argv[1:]]
        return subprocess.call(argv, env=dict(os.environ, **env))


if __name__ == "__main__":
    sys.exit(main())
