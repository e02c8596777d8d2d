"""The cgroup v1 grace-period pre-payer (``agentkernel.oci.cgroupwarm``): it writes only this process's own
pid into the cgroup it already is in (membership never changes), ends when told or when its ``until`` path
appears, and is a no-op where there is nothing to warm. The one-shot oci run uses it (its sandbox still
joins every hierarchy)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agentkernel.oci import cgroupwarm
from agentkernel.oci import runtime as rt
from tests.agent.akagent_helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def _v1_hierarchy() -> bool:
    return any(kind == "cgroup" for _mnt, kind, _c in rt.hierarchies())


needs_v1_root = pytest.mark.skipif(os.geteuid() != 0 or not _v1_hierarchy(),
                                   reason="needs root and a cgroup v1 hierarchy")


def _own_cgroups() -> str:
    with open("/proc/self/cgroup") as f:
        return f.read()


@needs_v1_root
def test_the_file_is_our_own_cgroups_procs_in_a_v1_hierarchy():
    path = cgroupwarm.own_procs_file()
    assert path is not None and path.endswith("/cgroup.procs")
    with open(path) as f:
        assert str(os.getpid()) in f.read().split(), "it names the cgroup this process is in"
    assert any(path.startswith(mnt + "/") and kind == "cgroup" for mnt, kind, _ in rt.hierarchies())


@needs_v1_root
def test_writes_keep_membership_and_stop_when_told():
    before = _own_cgroups()
    w = cgroupwarm.start()
    time.sleep(0.05)
    w.stop()
    assert w.error is None
    assert w.writes >= 2, "it keeps writing while it runs"
    n = w.writes
    time.sleep(0.02)
    assert w.writes == n, "no writes after stop()"
    w.stop()  # idempotent
    assert _own_cgroups() == before, "the process's cgroup membership never changes"


@needs_v1_root
def test_the_until_path_ends_it(tmp_path):
    flag = tmp_path / "init.pid"
    w = cgroupwarm.start(until=str(flag))
    time.sleep(0.02)
    flag.write_text("1")
    time.sleep(0.05)
    n = w.writes
    time.sleep(0.03)
    assert w.writes == n, "it ended once the path appeared"
    w.stop()


def test_nothing_to_warm_is_a_no_op(tmp_path):
    w = cgroupwarm.Warmer(None).start()
    w.stop()
    assert w.writes == 0 and w.error is None
    bad = cgroupwarm.Warmer(str(tmp_path / "no-such-dir" / "cgroup.procs")).start()
    bad.stop()
    assert bad.writes == 0 and isinstance(bad.error, OSError)


@needs_v1_root
def test_a_child_process_membership_is_untouched():
    """Only this process's pid is written: a child (in the same cgroups) stays where it is, and after the
    writes both are still in the same cgroups as before."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(f"/proc/{child.pid}/cgroup") as f:
            before = f.read()
        w = cgroupwarm.start()
        time.sleep(0.03)
        w.stop()
        with open(f"/proc/{child.pid}/cgroup") as f:
            assert f.read() == before
    finally:
        child.kill()
        child.wait()


@needs_v1_root
def test_stop_without_waiting_still_ends_the_thread():
    """The daemon's event loop stops it without waiting: the thread ends on its own right after."""
    w = cgroupwarm.start()
    time.sleep(0.02)
    w.stop(wait=False)
    time.sleep(0.05)
    n = w.writes
    time.sleep(0.03)
    assert w.writes == n
    w.stop()  # and a later waiting stop returns at once


def _until(cond) -> bool:
    # a loaded CI machine may not run the writer thread for a while: poll, never a fixed sleep
    return wait_until(cond, timeout=5.0, interval=0.002)


@needs_v1_root
def test_warmers_active_together_share_one_writer_thread(tmp_path):
    """A daemon starting several sandboxes at once: one thread writes for all of them (one write per
    interval, not one per start), each counts the writes made while it runs, and each ends on its own
    (stop or its own ``until``) while the others keep the lock warm."""
    before = _own_cgroups()
    flag = tmp_path / "init.pid"
    a = cgroupwarm.start()
    assert _until(lambda: a.writes >= 1)
    b = cgroupwarm.start(until=str(flag))
    c = cgroupwarm.start()
    writer = a._writer
    assert writer is not None and b._writer is writer and c._writer is writer, "one writer for the three"
    assert list(cgroupwarm._WRITERS.values()) == [writer]
    assert _until(lambda: c.writes >= 2 and b.writes >= 2)
    assert a.writes >= b.writes, "a was written for since before b started"
    flag.write_text("1")  # ends b only
    assert _until(lambda: b not in writer.users)
    nb = b.writes
    a.stop()  # ends a only: c still gets writes
    na, nc = a.writes, c.writes
    assert _until(lambda: c.writes >= nc + 3), "the one still running keeps being written for"
    assert b.writes == nb and a.writes == na, "ended ones get no more writes"
    c.stop()
    b.stop()
    assert writer.finished.acquire(timeout=5), "the writer thread ends with its last warmer"
    writer.finished.release()
    assert cgroupwarm._WRITERS == {}
    d = cgroupwarm.start()  # a later warmer starts a new writer
    assert d._writer is not None and d._writer is not writer
    assert _until(lambda: d.writes >= 2)
    d.stop()
    assert d.error is None
    assert _own_cgroups() == before


@needs_v1_root
def test_a_writer_thread_that_cannot_start_leaves_nothing_behind(monkeypatch):
    """Out of threads: the start fails as it did, and the next warmer gets a writer of its own (it never
    joins one that does not exist, nor waits for it on stop)."""
    real = cgroupwarm._thread.start_new_thread

    def refuse(*_a):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(cgroupwarm._thread, "start_new_thread", refuse)
    with pytest.raises(RuntimeError):
        cgroupwarm.start()
    assert cgroupwarm._WRITERS == {}
    monkeypatch.setattr(cgroupwarm._thread, "start_new_thread", real)
    w = cgroupwarm.start()
    assert _until(lambda: w.writes >= 2)
    w.stop()
