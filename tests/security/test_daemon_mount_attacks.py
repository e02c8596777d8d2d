"""Issue 11 item 10: with the daemon running, ``--mount-cwd`` mounted the daemon's directory, not the
caller's (pool members were created without the caller's cwd and the pool key ignored it). A run that
mounts a host path must never take a pooled member made for another path. Performed for real: a daemon
started in one directory, runs from two other directories."""

from __future__ import annotations

import json
import os
import tempfile
import time

from tests.conftest import ak


def test_mount_cwd_through_the_daemon_mounts_the_callers_directory():
    root = tempfile.mkdtemp(prefix="ak-sec-mount-")
    env = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"), "AGENTKERNEL_HOME": os.path.join(root, "home"),
           "AGENTKERNEL_NO_DAEMON": "0"}
    dirs = {}
    for name in ("daemon-dir", "caller-a", "caller-b"):
        d = os.path.join(root, name)
        os.makedirs(d)
        with open(os.path.join(d, f"marker-{name}"), "w") as f:
            f.write(name)
        os.chmod(d, 0o755)
        dirs[name] = d
    os.chmod(root, 0o755)
    assert ak("daemon", "start", "--pool-min", "1", env=env, cwd=dirs["daemon-dir"]).returncode == 0
    try:
        seen = {}
        for caller in ("caller-a", "caller-b", "caller-a", "caller-b"):
            r = ak("run", "--mount-cwd", "--", "ls", "/workspace", env=env, cwd=dirs[caller], timeout=120)
            assert r.returncode == 0, r.stderr
            seen.setdefault(caller, []).append(r.stdout.decode().split())
            time.sleep(0.5)  # let the pools refill: later runs are pool hits
        for caller, listings in seen.items():
            for names in listings:
                assert names == [f"marker-{caller}"], (caller, names)
        st = json.loads(ak("daemon", "status", "--json", env=env).stdout)
        assert st["runs"] >= 4  # the runs went through the daemon (not a cold fallback)
    finally:
        ak("daemon", "stop", env=env)
