"""The agent through the blocking client (the CLI fast path's client)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import statistics
import threading
import time

import pytest
from akagent_helpers import ENV, SECRET_ENV, group_members, procs_with, wait_until

from agentkernel.agent import protocol as P
from agentkernel.agent.sync_client import SyncAgentClient

ALL_BYTES = bytes(range(256))


@pytest.fixture
def client(agent):
    c = SyncAgentClient.connect_unix(agent.sock)
    yield c
    c.close()


def test_hello_and_info(client):
    assert client.hello() == "0.1.0"
    info = client.info()
    assert info.protocol_version == P.VERSION
    assert info.pid > 1 and not info.is_pid1
    assert info.max_payload == P.MAX_PAYLOAD
    assert info.uid == os.getuid()


def test_exit_codes_all(client):
    for code in range(256):
        st = client.exec_stream(["sh", "-c", f"exit {code}"], ENV, stdout_fd=None, stderr_fd=None)
        exit_code, sig, timed_out, oom, error = st
        assert (exit_code, sig, timed_out, oom, error) == (code, 0, False, False, None), st


def test_death_by_signal(client):
    st = client.exec_stream(["sh", "-c", "kill -TERM $$"], ENV)
    assert st.signal == 15 and st.exit_code == 143 and st.code == 0 and not st.timed_out


def test_stdout_stderr_binary_separate(client, tmp_path):
    (tmp_path / "a").write_bytes(ALL_BYTES)
    (tmp_path / "b").write_bytes(ALL_BYTES[::-1])
    r = client.exec(["sh", "-c", "cat a; cat b >&2; cat a"], ENV, cwd=str(tmp_path))
    assert r.exit_code == 0
    assert r.stdout == ALL_BYTES * 2
    assert r.stderr == ALL_BYTES[::-1]


def test_stream_to_fds(client, tmp_path):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    err = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT)
    try:
        st = client.exec_stream(["sh", "-c", "printf 'o1'; printf 'e1' >&2; exit 3"], ENV, stdout_fd=out,
                                stderr_fd=err)
    finally:
        os.close(out)
        os.close(err)
    assert st.exit_code == 3
    assert (tmp_path / "out").read_bytes() == b"o1"
    assert (tmp_path / "err").read_bytes() == b"e1"


def test_large_output_slow_consumer(agent, client, tmp_path):
    """64 MiB through a pipe whose reader is deliberately slow: backpressure, exact bytes, bounded agent."""
    block = os.urandom(1 << 20)
    (tmp_path / "block").write_bytes(block)
    want = hashlib.sha256(block * 64).hexdigest()
    r, w = os.pipe()
    got = hashlib.sha256()
    n = [0]

    def reader():
        reads = 0
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            got.update(data)
            n[0] += len(data)
            reads += 1
            if reads % 64 == 0:
                time.sleep(0.005)

    t = threading.Thread(target=reader)
    t.start()
    try:
        st = client.exec_stream(["sh", "-c", "for i in $(seq 64); do cat block; done"], ENV,
                                cwd=str(tmp_path), stdout_fd=w)
    finally:
        os.close(w)
        t.join()
        os.close(r)
    assert st.exit_code == 0
    assert n[0] == 64 << 20 and got.hexdigest() == want
    with open(f"/proc/{agent.pid}/status") as f:
        hwm_kb = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    assert hwm_kb < 16 * 1024, f"agent peak RSS {hwm_kb} KiB: output was buffered, not streamed"


def test_stdin_bytes_large(client):
    data = os.urandom(16 << 20) + ALL_BYTES
    r = client.exec(["sha256sum"], ENV, stdin=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_from_fd_and_eof(client):
    r, w = os.pipe()
    payload = os.urandom(3 << 20)

    def writer():
        mv = memoryview(payload)
        while mv:
            mv = mv[os.write(w, mv[:100000]):]
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    out = []
    st = client.exec_stream(["cat"], ENV, stdin_fd=r, on_output=lambda fd, d: out.append(d))
    t.join()
    os.close(r)
    assert st.exit_code == 0 and b"".join(out) == payload


def test_stdin_closed_when_not_given(client):
    r = client.exec(["cat"], ENV, timeout=5)
    assert r.exit_code == 0 and r.stdout == b"" and not r.timed_out


def test_env_exact_not_inherited(client):
    r = client.exec(["env"], {"A": "1", "B": "x y", "EMPTY": ""})
    assert r.stdout == b"A=1\nB=x y\nEMPTY=\n"
    r = client.exec(["/usr/bin/env"], None)
    assert r.stdout == b""
    r = client.exec(["env"], ENV)
    assert SECRET_ENV.encode() not in r.stdout


def test_path_from_request_env(client, tmp_path):
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho from-my-path\n")
    tool.chmod(0o755)
    r = client.exec(["mytool"], {"PATH": f"{tmp_path}:/bin"})
    assert r.exit_code == 0 and r.stdout == b"from-my-path\n"


def test_cwd(client, tmp_path):
    assert client.exec(["pwd"], ENV, cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    r = client.exec(["pwd"], ENV, cwd=str(tmp_path / "missing"))
    assert r.exit_code == 126 and r.start_failed and "chdir" in r.error and "No such file" in r.error


def test_not_found_127(client):
    r = client.exec(["definitely-not-a-command-xyz"], ENV)
    assert r.exit_code == 127 and r.start_failed and r.errno == 2
    assert r.error == "definitely-not-a-command-xyz: No such file or directory"
    assert client.exec(["/nonexistent/bin/x"], ENV).exit_code == 127


def test_not_executable_126(client, tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    f.chmod(0o644)
    r = client.exec([str(f)], ENV)
    assert r.exit_code == 126 and r.start_failed and "Permission denied" in r.error
    r = client.exec([str(tmp_path)], ENV)  # a directory
    assert r.exit_code == 126


def test_timeout_kills_whole_group(client):
    marker = "4321.25"
    pids = []
    t = time.monotonic()
    st = client.exec_stream(["sh", "-c", f"sleep {marker} & sleep {marker}"], ENV, timeout=0.5,
                            on_started=pids.append)
    elapsed = time.monotonic() - t
    assert st.timed_out and st.signal == 9 and st.exit_code == 124
    assert 0.4 < elapsed < 5
    assert wait_until(lambda: not procs_with(marker) and not group_members(pids[0]), 3), \
        (procs_with(marker), group_members(pids[0]))


def test_signal_forwarding(client):
    timer = threading.Timer(0.3, client.forward_signal, (signal.SIGTERM,))
    timer.start()
    st = client.exec_stream(["sleep", "30"], ENV)
    timer.join()
    assert st.signal == signal.SIGTERM and st.exit_code == 143


def test_tty(client):
    r = client.exec(["tty"], ENV, tty=True)
    assert r.exit_code == 0 and r.stdout.startswith(b"/dev/pts/")
    r = client.exec(["stty", "size"], ENV, tty=True, tty_size=(33, 99))
    assert r.stdout.strip() == b"33 99"
    r = client.exec(["sh", "-c", "echo out; echo err >&2"], ENV, tty=True)
    assert r.stdout == b"out\r\nerr\r\n" and r.stderr == b""


def test_output_limit(client):
    r = client.exec(["sh", "-c", "head -c 100000 /dev/zero; echo x >&2"], ENV, output_limit=1000)
    assert r.stdout == b"\0" * 1000 and r.stdout_truncated and not r.stderr_truncated
    assert r.stderr == b"x\n" and r.exit_code == 0


def test_disconnect_kills_command(agent):
    marker = "4322.25"
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent.sock)
    s.sendall(P.encode_hello() + P.encode_frame(P.EXEC, 7, P.encode_exec(["sleep", marker], ENV)))
    dec = P.FrameDecoder()
    frames = []
    while not any(f[0] == P.R_STARTED for f in frames):
        frames += dec.feed(s.recv(4096))
    pid = P.decode_u32(next(f[2] for f in frames if f[0] == P.R_STARTED))
    assert wait_until(lambda: procs_with(marker), 3)
    s.close()
    assert wait_until(lambda: not group_members(pid) and not procs_with(marker), 3)


def test_ping_latency_sanity(client):
    client.ping()
    ts = []
    for _ in range(200):
        t = time.perf_counter()
        client.ping(b"x" * 16)
        ts.append(time.perf_counter() - t)
    ex = []
    for _ in range(50):
        t = time.perf_counter()
        client.exec_stream(["echo", "hello"], ENV, stdout_fd=None)
        ex.append(time.perf_counter() - t)
    print(f"\nping median {statistics.median(ts) * 1e3:.3f} ms; exec echo median "
          f"{statistics.median(ex) * 1e3:.3f} ms")
    assert statistics.median(ts) < 1.0  # sanity only, not a speed assertion


def test_sequential_connections(agent):
    for i in range(50):
        with SyncAgentClient.connect_unix(agent.sock) as c:
            assert c.exec(["echo", str(i)], ENV).stdout == f"{i}\n".encode()


def test_forward_signal_from_a_real_handler(client):
    """The CLI pattern: a Python signal handler calls forward_signal while exec_stream waits in poll."""
    old = signal.signal(signal.SIGUSR2, lambda s, f: client.forward_signal(signal.SIGINT))
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        st = client.exec_stream(["sleep", "30"], ENV)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert st.signal == signal.SIGINT and st.exit_code == 130


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_uid_gid(client):
    r = client.exec(["sh", "-c", "id -u; id -g; id -G"], ENV, uid=65534, gid=65534)
    assert r.stdout == b"65534\n65534\n65534\n"
    r = client.exec(["id", "-u"], ENV, uid=1000)
    assert r.stdout == b"1000\n"


def test_kill_group_on_exit(client):
    m1, m2 = "4328.25", "4329.25"
    # by default a background process outlives the command (like docker exec) ...
    r = client.exec(["sh", "-c", f"sleep {m1} >/dev/null 2>&1 & echo bg"], ENV)
    assert r.stdout == b"bg\n"
    assert wait_until(lambda: procs_with(m1), 3)
    for pid in procs_with(m1):
        os.kill(pid, signal.SIGKILL)
    # ... unless the exec asks for its process group to be killed when it exits
    r = client.exec(["sh", "-c", f"sleep {m2} >/dev/null 2>&1 & echo bg"], ENV, kill_group_on_exit=True)
    assert r.stdout == b"bg\n"
    assert wait_until(lambda: not procs_with(m2), 3)


def test_socket_mode(agent_bin, tmp_path):
    from akagent_helpers import start_agent, stop_agent

    sock = str(tmp_path / "m.sock")
    proc = start_agent([agent_bin, "serve", "--listen", sock, "--socket-mode", "0600"], sock)
    try:
        assert os.stat(sock).st_mode & 0o777 == 0o600
        # a stale socket file is replaced by a new agent
        stop_agent(proc)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(sock)  # leave a stale socket behind
        proc = start_agent([agent_bin, "serve", "--listen", sock], sock)
        with SyncAgentClient.connect_unix(sock) as c:
            c.ping()
    finally:
        stop_agent(proc)


def test_background_writer_does_not_delay_exit(client):
    """A background process that keeps the output pipe open and floods it must not hold back EXIT."""
    t = time.monotonic()
    r = client.exec(["sh", "-c", "yes >/dev/stdout & echo done; exit 5"], ENV, kill_group_on_exit=True)
    assert r.exit_code == 5 and b"done\n" in r.stdout
    t2 = time.monotonic()
    r = client.exec(["sh", "-c", "sleep 4330.5 & echo done"], ENV)  # holds the pipes, writes nothing
    assert r.exit_code == 0 and r.stdout == b"done\n"
    assert time.monotonic() - t2 < 2 and time.monotonic() - t < 4
    # the background sleep outlived the command; its pipes are closed
    pids = procs_with("4330.5")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
