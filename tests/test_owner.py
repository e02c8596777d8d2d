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


def _holder(code: str = "import time; time.sleep(60)") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_lend_to_a_client_and_its_hand_back_keep_one_live_entry(tmp_path, monkeypatch):
    """The daemon lends a member's entry to its lease's client (one rename), the client hands it back
    (one rename, its backend known), the daemon releases it by name: no listing, one entry throughout,
    a live claim at every step."""
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    me = owner.current_owner()
    code = ("import os, sys; from agentkernel import owner; sys.stdin.readline(); "
            "print(owner.hand_back('pool-abc', int(sys.argv[1]), 'oci'), flush=True); sys.stdin.readline()")
    client = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        who = owner.owner_of_pid(client.pid)
        owner.claim("oci", "pool-abc", {"container": "pool-abc"}, me, sole=True)
        assert owner.lend("oci", "pool-abc", who) is True
        (fn,) = os.listdir(owner.journal_dir())
        assert fn == f"oci--pool-abc--{client.pid}.{who['start']}.json"
        assert owner.live_claims() == {("oci", "pool-abc")} and owner.dead_entries() == []
        assert owner.lend("oci", "pool-abc", who) is False  # nothing of ours left to lend
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "True"
        (fn,) = os.listdir(owner.journal_dir())
        assert fn == f"oci--pool-abc--{me['pid']}.{me['start']}.json"
        owner.release("oci", "pool-abc", (me, who))
        assert os.listdir(owner.journal_dir()) == []
    finally:
        client.kill()
        client.wait()


def test_release_of_a_lent_entry_whose_client_died_before_handing_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    me = owner.current_owner()
    client = _holder()
    who = owner.owner_of_pid(client.pid)
    owner.claim("oci", "pool-abc", {"container": "pool-abc"}, me, sole=True)
    assert owner.lend("oci", "pool-abc", who)
    client.kill()  # a SIGKILLed client: no hand_back
    client.wait()
    assert owner.dead_entries() == []  # the content names this (live) process
    owner.release("oci", "pool-abc", (me, who))
    assert os.listdir(owner.journal_dir()) == []


def test_release_lists_the_journal_when_the_entry_is_under_no_name_it_was_given(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    other = _holder()
    try:
        owner.claim("oci", "pool-abc", {"container": "pool-abc"}, owner.owner_of_pid(other.pid))  # e.g. transferred
        owner.claim("oci", "pool-def", {"container": "pool-def"})
        owner.release("oci", "pool-abc", (owner.current_owner(),))
        assert [e["id"] for e in owner.entries()] == ["pool-def"]  # only its own entry went
    finally:
        other.kill()
        other.wait()


def test_a_lent_entry_is_reaped_once_the_lender_and_the_client_are_both_gone(tmp_path, monkeypatch):
    """A daemon SIGKILLed during a lease: while the client lives its entry is a live claim (a new daemon's
    scan spares the member); after the client is gone too, the first command reaps it."""
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path))
    client = _holder()
    try:
        code = ("import sys; from agentkernel import owner; "
                "owner.claim('oci', 'pool-abc', {'container': 'pool-abc'}, sole=True); "
                f"assert owner.lend('oci', 'pool-abc', owner.owner_of_pid({client.pid}))")
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert owner.live_claims() == {("oci", "pool-abc")}  # the lender is dead, its client is not
        assert owner.dead_entries() == []
    finally:
        client.kill()
        client.wait()
    assert owner.live_claims() == set()
    assert [e["id"] for e in owner.dead_entries()] == ["pool-abc"]

