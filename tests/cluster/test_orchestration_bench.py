"""The orchestration benchmark suite runs end to end (quick sizes) against the configured clusters, or the
emulators when none is configured, and records every table of the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REAL_K8S, REAL_NOMAD

pytestmark = [pytest.mark.wire, pytest.mark.timeout(300)]


def test_orchestration_suite_quick(tmp_path):
    from .conftest import _need_podman

    env = dict(os.environ)
    env.pop("AGENTKERNEL_HOME", None)
    out = tmp_path / "results"
    # the bench times `agentkernel` as installed; here it must be this checkout's code, as `python -m`
    shim = ("import sys; import agentkernel.bench.harness as h; h._cli_argv = lambda: [sys.executable, '-m', "
            "'agentkernel']; from agentkernel.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", shim, "bench", "--suites", "orchestration", "--backends", "kubernetes,nomad",
            "--quick", "--no-charts", "--no-progress", "--out", str(out)]
    if REAL_K8S and REAL_NOMAD:
        r = subprocess.run(argv, env=env, capture_output=True, timeout=280)
    else:
        _need_podman()
        from tests.emulators.clusters import emulated_clusters

        with emulated_clusters(str(tmp_path)) as extra:
            r = subprocess.run(argv, env=dict(env, **extra), capture_output=True, timeout=280)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads(next(out.glob("bench-*.json")).read_text())
    ms = {m["id"]: m for m in doc["measurements"]}
    for backend in ("kubernetes", "nomad"):
        for name in ("lifecycle_create", "lifecycle_start", "lifecycle_exec", "lifecycle_stop", "lifecycle_total",
                     "exec_sequential", "scale5_create", "scale5_start", "scale5_parallel_exec", "oneshot"):
            m = ms[f"orchestration/{backend}/{name}"]
            assert m["available"] and m["failures"] == 0 and m["samples_ms"], (backend, name, m.get("errors"))
        res = doc["results"]["orchestration"][backend]
        assert res["scale"][0]["running"] == 5 and res["scale"][0]["exec_ok"] == 5
