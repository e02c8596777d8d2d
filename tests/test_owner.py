"""Ownership: identities, the journal, and what counts as provably dead."""

from __future__ import annotations

import os
import subprocess
import sys

from agentkernel import owner


def test_current_owner_is_alive_and_a_dead_pid_is_dead():
    me = owner.current_owner()
    assert me["pid"] == os.getpid() and me["start"] > 0 and me["boot"]
    assert not owner.is_dead(me)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = owner.owner_of_pid(p.pid)
    p.wait()
    assert owner.is_dead(dead)


def test_reused_pid_with_other_start_time_is_dead():
    me = owner.current_owner()
    assert owner.is_dead(dict(me, start=me["start"] + 1))
    assert owner.is_dead(dict(me, boot="another-boot"))


def test_other_hosts_are_never_provably_dead():
    me = owner.current_owner()
    assert not owner.is_dead(dict(me, host="elsewhere", pid=999999999))


def test_zombie_owner_is_dead():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    o = owner.owner_of_pid(p.pid)  # alive or zombie; once exited and unreaped it is a zombie
    import time

    time.sleep(0.3)
    assert owner.is_dead(o)
    p.wait()


def test_journal_names_carry_the_owner_and_skip_live_owners_unread(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    path = owner.claim("podman", "run-abc", {"container": "x"})
    assert os.path.basename(path).startswith("podman--run-abc--") and f"--{os.getpid()}." in path
    assert owner.dead_entries() == []
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = owner.owner_of_pid(p.pid)
    p.wait()
    owner.claim("podman", "run-def", {"container": "y"}, dead_owner)
    assert [e["id"] for e in owner.dead_entries()] == ["run-def"]
    # a new claim for the same resource replaces the old entry (handing it to another owner)
    owner.claim("podman", "run-def", {"container": "y"})
    assert owner.dead_entries() == []
    assert sorted(e["id"] for e in owner.entries()) == ["run-abc", "run-def"]
    owner.release("podman", "run-abc")
    owner.release("podman", "run-def")
    assert owner.entries() == []


def test_hand_back_renames_the_claim_to_the_holder_and_keeps_it_reapable(tmp_path, monkeypatch):
    """A lease's client hands its entry to the daemon (``hand_back``): the entry is then skipped unread
    while the holder lives, and reaped as before once both the holder and the client are gone."""
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner.claim("oci", "pool-abc", {"container": "pool-abc"})
        assert owner.hand_back("pool-abc", holder.pid) is True
        (fn,) = os.listdir(owner.journal_dir())
        assert fn == f"oci--pool-abc--{holder.pid}.{owner.process_start_time(holder.pid)}.json"
        assert owner.dead_entries() == []  # the holder lives
        assert owner.hand_back("pool-abc", holder.pid) is False  # nothing of ours left to hand back
        assert [e["owner"]["pid"] for e in owner.entries()] == [os.getpid()]  # the content still names us
    finally:
        holder.kill()
        holder.wait()
    # holder dead, content owner (this process) alive: not provably dead yet
    assert owner.dead_entries() == []
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert owner.hand_back("pool-abc", p.pid) is False  # a dead holder is never handed anything
    owner.release("oci", "pool-abc")
    assert owner.entries() == []
