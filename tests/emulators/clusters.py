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
def emulated_clusters(workdir: str):
    """Yields the environment variables that point agentkernel at the two emulators."""
    kube = Emulator().serve_in_thread()
    nomad = NomadEmulator(token=NOMAD_TOKEN).serve_in_thread()
    try:
        kc = kube.kubeconfig(os.path.join(workdir, "kubeconfig"))
        cfg = os.path.join(workdir, "agentkernel.toml")
        with open(cfg, "w") as f:
            f.write('[orchestrator]\nnamespace = "agentkernel"\n')
        yield {"KUBECONFIG": kc, "NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": NOMAD_TOKEN, "AGENTKERNEL_CONFIG": cfg,
               "AGENTKERNEL_BENCH_POD_PIDS_LIMIT": str(kube.emu.pod_pids_limit)}
    finally:
        kube.stop()
        nomad.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="akemu-") as d, emulated_clusters(d) as env:
        argv = [sys.executable, "-m", "agentkernel", "bench", "--suites", "orchestration", "--backends",
                "kubernetes,nomad", *sys.argv[1:]]
        return subprocess.call(argv, env=dict(os.environ, **env))


if __name__ == "__main__":
    sys.exit(main())
