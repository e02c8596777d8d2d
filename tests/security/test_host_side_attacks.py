"""Issue 11 items 9 and 12: attacks on the host side of file copies and agent connections.

9: ``cp`` downloads wrote through ``<target>.agentkernel-<pid>.part`` with a plain ``open()``: a local
user who can write the target's directory planted that name as a symlink to a root-owned file, and root's
``cp`` overwrote it. 12: a sandbox replaced ``/.ak/run/agent.sock`` (its own run dir) with a symlink to a
host socket, and the host (root) connected there on the next exec. Both are performed for real."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import ak

BACKENDS = ("podman", "oci", "docker")


@pytest.fixture
def named(request):
    made = []

    def make(backend: str) -> str:
        name = f"sec-{backend}-{os.urandom(3).hex()}"
        r = ak("create", name, "-B", backend, "--start", timeout=180)
        assert r.returncode == 0, r.stderr
        made.append(name)
        return name

    yield make
    for n in made:
        ak("rm", n, timeout=180)


@pytest.mark.parametrize("backend", ["podman"])
def test_cp_download_does_not_write_through_planted_symlink(backend, named, tmp_path):
    name = named(backend)
    r = ak("exec", name, "--", "sh", "-c", "echo sandbox-data > /tmp/f", timeout=60)
    assert r.returncode == 0, r.stderr
    victim = tmp_path / "victim"
    victim.write_text("root-owned secret\n")
    os.chmod(victim, 0o600)
    userdir = tmp_path / "userdir"  # a directory another local user (uid 1000) owns
    userdir.mkdir()
    os.chown(userdir, 1000, 1000)
    target = userdir / "out.txt"
    # the attacker predicts the CLI's pid: the exec keeps the shell's $$
    plant = (f"ln -s {shlex.quote(str(victim))} {shlex.quote(str(target))}.agentkernel-$$.part && "
             f"chown -h 1000:1000 {shlex.quote(str(target))}.agentkernel-$$.part && "
             f"exec {shlex.quote(sys.executable)} -m agentkernel cp {name}:/tmp/f {shlex.quote(str(target))}")
    r = subprocess.run(["sh", "-c", plant], capture_output=True, timeout=120)
    assert victim.read_text() == "root-owned secret\n", "cp wrote through the planted symlink"
    assert r.returncode == 0, r.stderr
    assert target.read_text() == "sandbox-data\n"
    assert not os.path.islink(target)
    leftovers = [p for p in os.listdir(userdir) if p.endswith(".part") and not os.path.islink(userdir / p)]
    assert leftovers == []


class _Listener:
    """A host unix socket standing for something root must never be steered into (an engine socket)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self.stop = True
        self.t.join(2)
        self.sock.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_agent_socket_symlink_is_not_connected(backend, named, tmp_path):
    name = named(backend)
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    evil = str(evil_dir / "engine.sock")
    lst = _Listener(evil)
    try:
        r = ak("exec", name, "--", "sh", "-c", f"rm -f /.ak/run/agent.sock && ln -s {evil} /.ak/run/agent.sock",
               timeout=60)
        assert r.returncode == 0, r.stderr
        r = ak("exec", name, "--", "true", timeout=60)
        assert r.returncode != 0  # the sandbox broke its own agent: exec fails, clearly
        assert b"Traceback" not in r.stderr, r.stderr
    finally:
        lst.close()
    assert lst.accepted == 0, "the host connected to the socket the sandbox pointed agent.sock at"
