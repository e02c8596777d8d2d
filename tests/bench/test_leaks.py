"""The leak check: it catches a deliberately leaked labelled container, journal entries and run dirs,
and tells other live owners' resources apart."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from agentkernel.bench import leaks


def _podman_ok() -> bool:
    if shutil.which("podman") is None:
        return False
    r = subprocess.run(["podman", "image", "exists", "agentkernel/busybox"], capture_output=True)
    return r.returncode == 0


@pytest.mark.engine("podman")
@pytest.mark.skipif(not _podman_ok(), reason="podman with agentkernel/busybox is needed")
def test_leak_check_catches_a_leaked_labelled_container(tmp_path):
    scope = leaks.LeakScope(runtime_dirs=[str(tmp_path / "run")], homes=[str(tmp_path / "home")],
                            tmp_root=str(tmp_path), run_id="20990101T000000Z-000000")
    base = leaks.snapshot(scope)
    name = f"akbench-leaktest-{os.urandom(4).hex()}"
    r = subprocess.run(["podman", "run", "-d", "--label", "agentkernel.managed=true", "--name", name,
                        "agentkernel/busybox", "sleep", "120"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        t0 = time.monotonic()
        rep = leaks.check(scope, base, settle_s=1.0, label="deliberate leak")
        assert time.monotonic() - t0 < 20
        assert not rep["clean"]
        found = [x for x in rep["leaks"] if x["category"] == "podman_containers" and x["key"] == cid]
        assert found, leaks.format_report(rep)
        assert found[0]["info"]["name"] == name
        assert found[0]["kind"] == "unattributed"  # no owner labels: nobody can claim it
        assert name in leaks.format_report(rep)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", cid], capture_output=True, timeout=120)
    rep = leaks.check(scope, base, settle_s=0)
    assert not [x for x in rep["leaks"] if x["key"] == cid]


def test_leak_check_sees_journal_entries_run_dirs_and_store_rows(tmp_path):
    rt, home = tmp_path / "run", tmp_path / "home"
    (rt / "owned").mkdir(parents=True)
    (rt / "sb").mkdir()
    home.mkdir()
    scope = leaks.LeakScope(runtime_dirs=[str(rt)], homes=[str(home)], tmp_root=str(tmp_path),
                            run_id="20990101T000000Z-111111")
    base = leaks.snapshot(scope)
    (rt / "owned" / "podman--run-0123456789--1.5.json").write_text(
        '{"backend": "podman", "id": "run-0123456789", "handle": {}, "owner": {"pid": 1}}')
    (rt / "sb" / "0123456789").mkdir()  # backends/_container.sandbox_run_dir
    import sqlite3

    con = sqlite3.connect(home / "state.db")
    con.execute("create table sandboxes_v2 (owner text, name text, id text, backend text, state text)")
    con.execute("insert into sandboxes_v2 values ('local', 'left-behind', 'left-behind-01', 'podman', 'running')")
    con.commit()
    con.close()
    rep = leaks.check(scope, base, settle_s=0)
    # (other users of this machine may leak meanwhile: those are unattributed, not ours)
    cats = sorted(x["category"] for x in rep["leaks"] if x["attributed"])
    assert cats == ["journal", "run_dirs", "store"], leaks.format_report(rep)
    assert rep["attributed_count"] == 3 and not rep["clean"]
    removed = leaks.cleanup(rep)
    assert len(removed) == 2  # journal entry and run dir; store rows are reported, not deleted
    assert not (rt / "sb" / "0123456789").exists()


def test_classification_of_owners(tmp_path):
    scope = leaks.LeakScope(tmp_root=str(tmp_path), run_id="20990101T000000Z-abcdef", own_pids={12345678})
    host = os.uname().nodename
    me = {"agentkernel.owner.pid": str(os.getpid()), "agentkernel.owner.host": host}
    assert leaks.classify("podman_containers", "c1", {"labels": me}, scope) == "foreign"  # alive, not ours
    ours = {"agentkernel.owner.pid": "12345678", "agentkernel.owner.host": host}
    assert leaks.classify("podman_containers", "c2", {"labels": ours}, scope) == "ours"
    dead = {"agentkernel.owner.pid": "999999999", "agentkernel.owner.host": host}
    assert leaks.classify("podman_containers", "c3", {"labels": dead}, scope) == "unattributed"
    tagged = {"agentkernel.bench-run": "20990101T000000Z-abcdef"}
    assert leaks.classify("docker_containers", "c4", {"labels": tagged}, scope) == "ours"
    assert leaks.classify("podman_containers", "c5", {"labels": {}}, scope) == "unattributed"


def test_a_reused_pid_is_not_ours_and_is_never_killed(tmp_path):
    """On a busy machine a pid the bench spawned (and that exited) is reused by someone else's process:
    the leak check must not call that process ours, and cleanup must not kill it."""
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the bench recorded this pid with another start time (its own, long-exited process)
        scope = leaks.LeakScope(tmp_root=str(tmp_path), own_pids={other.pid}, own_starts={other.pid: 1})
        info = {"pid": other.pid, "cmdline": "qemu-system-x86_64 -name someone-else"}
        assert leaks.classify("qemu_processes", f"pid:{other.pid}", info, scope) == "unattributed"
        rep = {"leaks": [{"category": "qemu_processes", "key": f"pid:{other.pid}", "info": info, "attributed": True}]}
        assert leaks.cleanup(rep, scope) == [] and leaks.cleanup(rep) == []
        assert other.poll() is None  # still alive
        from agentkernel.owner import process_start_time

        mine = leaks.LeakScope(tmp_root=str(tmp_path), own_pids={other.pid},
                               own_starts={other.pid: process_start_time(other.pid)})
        assert leaks.classify("qemu_processes", f"pid:{other.pid}", info, mine) == "ours"
    finally:
        other.kill()
        other.wait()


def test_a_temp_dir_named_by_a_live_process_is_foreign(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "akb-otherrun"
    d.mkdir()
    scope = leaks.LeakScope(tmp_root=str(tmp_path / "mine"))
    assert leaks.classify("temp_dirs", str(d), {"path": str(d)}, scope) == "unattributed"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(d / "run")})
    try:
        assert leaks.classify("temp_dirs", str(d), {"path": str(d)}, scope) == "foreign"
    finally:
        other.kill()
        other.wait()


def test_a_cgroup_with_processes_of_another_installation_is_foreign(tmp_path):
    with open("/proc/self/cgroup") as f:
        me = f.read().splitlines()
    path = next((ln.split(":", 2)[2] for ln in me if ln.split(":")[1] in ("memory", "")), None)
    base = f"/sys/fs/cgroup/memory{path}" if os.path.isdir(f"/sys/fs/cgroup/memory{path}") else f"/sys/fs/cgroup{path}"
    if not os.path.exists(os.path.join(base, "cgroup.procs")):
        pytest.skip("no readable cgroup for this process")
    scope = leaks.LeakScope(runtime_dirs=[str(tmp_path / "mine" / "run")], tmp_root=str(tmp_path / "mine"))
    # a cgroup holding live processes none of which use our runtime dir: someone else's live sandbox
    assert leaks.classify("cgroups", "x", {"paths": [base]}, scope) == "foreign"
    empty = tmp_path / "cg"
    empty.mkdir()
    (empty / "cgroup.procs").write_text("")
    assert leaks.classify("cgroups", "y", {"paths": [str(empty)]}, scope) == "unattributed"


def test_another_bench_runs_resource_is_foreign(tmp_path):
    scope = leaks.LeakScope(tmp_root=str(tmp_path), run_id="20990101T000000Z-abcdef")
    other = {"agentkernel.bench-run": "20990101T000000Z-999999", "agentkernel.owner.pid": "999999999"}
    assert leaks.classify("podman_containers", "c6", {"labels": other}, scope) == "foreign"
