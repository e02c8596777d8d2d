"""Issue 11 item 2: the oci one-shot handed the caller's stdout/stderr files to the runtime, which
chowns a container's fds 0-2 to the sandbox uid; the sandbox then reopened a root-only log through
``/proc/1/fd/1``, read it and truncated it. Regular files, terminals and sockets of the caller must reach
the sandbox only through pipes. The attack is performed as written, plus the same for stdin, a pty and
a socket."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys

import pytest

RUNTIMES = ("crun", "runc", "runsc")
SECRET = b"root-only log line: SECRET-1234\n"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], timeout=120, **kw)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stdout_stderr_files_are_not_handed_to_the_sandbox(runtime, tmp_path):
    out, err = tmp_path / "o.txt", tmp_path / "e.txt"
    for f in (out, err):
        f.write_bytes(SECRET)
        os.chmod(f, 0o600)
    # a regular file can be read back and truncated through /proc/1/fd/N (a pipe would block cat: test -f)
    attack = ("for f in /proc/1/fd/1 /proc/1/fd/2; do [ -f $f ] && grep -q SECRET $f && echo LEAKED; done; "
              ": > /proc/1/fd/1; : > /proc/1/fd/2; for f in /proc/1/fd/1 /proc/1/fd/2; do readlink $f; done; echo done")
    with open(out, "ab") as o, open(err, "ab") as e:
        r = _cli("run", "-B", "oci", "-o", f"runtime={runtime}", "--", "sh", "-c", attack, stdout=o, stderr=e)
    for f in (out, err):
        st = os.stat(f)
        assert (st.st_uid, st.st_gid) == (0, 0), f"{f.name} was chowned to {st.st_uid}:{st.st_gid}"
        assert st.st_mode & 0o777 == 0o600
        assert f.read_bytes().startswith(SECRET), f"{f.name} was truncated"
    text = out.read_bytes()
    assert b"LEAKED" not in text, text
    # gVisor shows donated host fds as host:[N]; the host side of them is our pipe either way
    assert b"done" in text and (b"pipe:" in text or (runtime == "runsc" and b"host:" in text)), (
        r.returncode, text, err.read_bytes())


@pytest.mark.parametrize("runtime", ["crun"])
def test_stdin_file_cannot_be_reopened_for_writing(runtime, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(SECRET)
    os.chmod(src, 0o600)
    with open(src, "rb") as i:
        r = _cli("run", "-B", "oci", "-o", f"runtime={runtime}", "--", "sh", "-c",
                 "cat > /dev/null; echo pwned > /proc/1/fd/0; readlink /proc/1/fd/0",
                 stdin=i, capture_output=True)
    st = os.stat(src)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert src.read_bytes() == SECRET
    assert r.stdout.startswith(b"pipe:"), r.stdout  # the sandbox only ever had a pipe of ours


def test_pty_and_socket_are_not_handed_to_the_sandbox(tmp_path):
    master, slave = pty.openpty()
    a, b = socket.socketpair()
    try:
        before = os.fstat(slave)
        r = _cli("run", "-B", "oci", "--", "sh", "-c", "for f in /proc/1/fd/1 /proc/1/fd/2; do readlink $f; done >&2",
                 stdout=slave, stderr=b.fileno())
        after = os.fstat(slave)
        assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
        b.close()
        a.settimeout(5)
        seen = a.recv(4096)
        assert r.returncode == 0
        assert seen.count(b"pipe:") == 2, seen
    finally:
        os.close(master)
        os.close(slave)
        a.close()
