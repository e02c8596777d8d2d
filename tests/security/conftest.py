"""Helpers for the attack tests: run the real CLI the way an attacked user would, but fenced so that
an attack that succeeds against a broken build cannot take the test machine with it (memory cgroup)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

MEM_ROOT = "/sys/fs/cgroup/memory"


@contextlib.contextmanager
def memory_fence(limit_mb: int):
    """A v1 memory cgroup (no swap) for the processes started inside; removed afterwards."""
    path = os.path.join(MEM_ROOT, f"ak-sectest-{os.getpid()}-{os.urandom(3).hex()}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_mb << 20))
        with contextlib.suppress(OSError), open(os.path.join(path, "memory.memsw.limit_in_bytes"), "w") as f:
            f.write(str(limit_mb << 20))
        yield path
    finally:
        for _ in range(100):
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                os.rmdir(path)
                break
            except OSError:
                import time

                time.sleep(0.05)


def ak_fenced(*args: str, limit_mb: int = 1024, timeout: float = 120, cwd: str | None = None,
              env: dict | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    """``python -m agentkernel ARGS`` inside a memory fence; a hang is reported as TimeoutExpired."""
    e = dict(os.environ)
    if env:
        e.update(env)
    with memory_fence(limit_mb) as cg:
        procs = os.path.join(cg, "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, input=input,
                              timeout=timeout, cwd=cwd, env=e, preexec_fn=enter)


@pytest.fixture
def fenced():
    return ak_fenced
