"""The raw `docker run --rm + our flags` baseline: podman-only flags become docker's own (the docker 20.10
CLI refused `--hooks-dir`, so the row had no samples)."""

from __future__ import annotations

import subprocess

from agentkernel.bench.suites.raw import docker_flags
from agentkernel.diskquota import HOOK_ANNOTATION


def test_disk_cap_hook_becomes_storage_opt():
    podman = ["--network", "none", "--read-only", "--read-only-tmpfs=false", "--hooks-dir", "/x/hooks",
              "--annotation", f"{HOOK_ANNOTATION}=512", "--annotation", "other=1", "--user", "1000"]
    assert docker_flags(podman, 4) == ["--network", "none", "--read-only", "--storage-opt", "size=517M",
                                       "--annotation", "other=1", "--user", "1000"]


def test_docker_cli_accepts_the_flags():
    """The docker CLI parses every flag (``--help`` after them: nothing runs)."""
    flags = docker_flags(["--cap-drop", "all", "--hooks-dir", "/x", "--annotation", f"{HOOK_ANNOTATION}=64",
                          "--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges"], 1)
    r = subprocess.run(["docker", "run", *flags, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "unknown flag" not in r.stderr, r.stderr
