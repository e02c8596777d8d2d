"""Robustness (malformed frames), PID-1 behaviour, `ak-agent exec`, `serve --stdio`, protocol codecs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from akagent_helpers import ENV, run, start_agent, stop_agent, wait_until

from agentkernel.agent import protocol as P
from agentkernel.agent.client import AgentClient
from agentkernel.agent.protocol import AgentConnectionLost
from agentkernel.agent.sync_client import SyncAgentClient
from agentkernel.agent.transport import StdioProcessTransport


def _raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    return s


def _read_all_frames(s: socket.socket) -> list:
    dec = P.FrameDecoder()
    frames = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        frames += dec.feed(data)
    return frames


@pytest.mark.parametrize("garbage", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    pytest.param(struct.pack(">IIBB", P.MAX_PAYLOAD + 1, 0, P.HELLO, 0), id="oversized"),
    pytest.param(P.encode_frame(P.PING, 1, b""), id="no-hello"),
    pytest.param(P.encode_hello()[:-8] + b"XXXX\0\1\0\1", id="bad-magic"),
    pytest.param(P.encode_hello() + struct.pack(">IIBB", 0, 1, P.PING, 7), id="reserved-byte"),
    pytest.param(P.encode_hello() + P.encode_frame(P.EXEC, 1, b"\0\0\0\0\0"), id="truncated-exec"),
    pytest.param(P.encode_hello() + P.encode_frame(P.EXEC, 1, P.encode_exec(["true"], ENV)[:-3]), id="short-env"),
    pytest.param(P.encode_hello() + P.encode_frame(P.EXEC, 1, P.encode_exec(["x"], ENV) + b"\0"), id="trailing"),
    pytest.param(P.encode_hello() + P.encode_frame(P.STAT, 1, b"\0\0\0\0\xff\xff\xff\xff"), id="bad-strlen"),
    pytest.param(P.encode_hello() + P.encode_frame(P.PING, 0, b""), id="stream-0"),
    pytest.param(P.encode_hello() + P.encode_frame(P.SIGNAL, 5, b"\1"), id="short-signal-ignored"),
])
def test_malformed_frames_error_and_close(agent, garbage):
    s = _raw(agent.sock)
    s.sendall(garbage)
    if garbage.endswith(P.encode_frame(P.SIGNAL, 5, b"\1")):
        # a control frame for a stream that does not exist is ignored, connection stays up
        s.sendall(P.encode_frame(P.PING, 9, b"hi"))
        dec = P.FrameDecoder()
        frames = []
        while len(frames) < 2:
            frames += dec.feed(s.recv(4096))
        assert [f[0] for f in frames] == [P.R_HELLO, P.R_PONG]
        s.close()
    else:
        frames = _read_all_frames(s)  # the agent closes the connection
        s.close()
        errs = [f for f in frames if f[0] == P.R_ERROR and f[1] == 0]
        assert errs, frames
        err = P.decode_error(errs[-1][2])
        assert err.errno in (errno.EPROTO, errno.EPROTONOSUPPORT), err
    # the agent survives and serves the next connection
    with SyncAgentClient.connect_unix(agent.sock) as c:
        assert c.exec(["echo", "alive"], ENV).stdout == b"alive\n"


def test_version_negotiation_refused(agent):
    s = _raw(agent.sock)
    s.sendall(P.encode_hello(2, 3))
    frames = _read_all_frames(s)
    s.close()
    assert frames[0][0] == P.R_ERROR
    assert P.decode_error(frames[0][2]).errno == errno.EPROTONOSUPPORT


def test_reused_stream_id_is_protocol_error(agent):
    s = _raw(agent.sock)
    s.sendall(P.encode_hello() + P.encode_frame(P.EXEC, 3, P.encode_exec(["sleep", "5"], ENV))
              + P.encode_frame(P.EXEC, 3, P.encode_exec(["true"], ENV)))
    frames = _read_all_frames(s)
    s.close()
    assert frames[-1][0] == P.R_ERROR and frames[-1][1] == 0


def test_many_abrupt_disconnects(agent):
    for i in range(50):
        s = _raw(agent.sock)
        s.sendall(P.encode_hello() + P.encode_frame(P.EXEC, 1, P.encode_exec(["sleep", "10"], ENV))[: 10 + i])
        s.close()
    with SyncAgentClient.connect_unix(agent.sock) as c:
        c.ping()


def test_ignores_unhandled_signals(agent):
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM, signal.SIGQUIT):
        os.kill(agent.pid, sig)
    time.sleep(0.1)
    assert agent.alive()
    with SyncAgentClient.connect_unix(agent.sock) as c:
        c.ping()


def test_sigterm_stops_agent_and_its_commands(agent_bin, tmp_path):
    sock = str(tmp_path / "a.sock")
    proc = start_agent([agent_bin, "serve", "--listen", sock], sock)
    c = SyncAgentClient.connect_unix(sock)
    pids = []
    errors = []

    def target():
        try:
            c.exec_stream(["sleep", "4326.5"], ENV, on_started=pids.append)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    assert wait_until(lambda: pids, 3)
    proc.terminate()
    assert proc.wait(5) == 0
    t.join(5)
    c.close()
    assert errors and isinstance(errors[0], AgentConnectionLost)
    assert not os.path.exists(sock)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pids[0]}"), 3)


# ------------------------------------------------------------------------------------------------
# PID 1 in a new pid namespace

needs_unshare = pytest.mark.skipif(
    not shutil.which("unshare") or os.geteuid() != 0, reason="needs root and unshare(1) for a pid namespace")

ZOMBIE_SCAN = ("for f in /proc/[0-9]*/stat; do read l < $f 2>/dev/null && echo \"$l\"; done")


def _states(stat_lines: bytes) -> list[tuple[int, str, str]]:
    out = []
    for line in stat_lines.decode().splitlines():
        pid, rest = line.split(" (", 1)
        comm, tail = rest.rsplit(") ", 1)
        out.append((int(pid), comm, tail.split()[0]))
    return out


def _states_ppid(stat_lines: bytes) -> list[tuple[int, str, str, int]]:
    out = []
    for line in stat_lines.decode().splitlines():
        pid, rest = line.split(" (", 1)
        comm, tail = rest.rsplit(") ", 1)
        state, ppid = tail.split()[:2]
        out.append((int(pid), comm, state, int(ppid)))
    return out


@needs_unshare
def test_pid1_reaps_orphans(agent_bin, tmp_path):
    sock = str(tmp_path / "pid1.sock")
    proc = start_agent(["unshare", "--fork", "--pid", "--mount-proc", agent_bin, "serve", "--listen", sock], sock)
    try:
        with SyncAgentClient.connect_unix(sock) as c:
            info = c.info()
            assert info.is_pid1 and info.pid == 1
            # 10 orphaned grandchildren: their parent exits at once, they are re-parented to PID 1. They sleep
            # until killed, so a slow machine cannot make them exit before they are seen (polled with a deadline).
            r = c.exec(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do sh -c 'sleep 600 &'; done; exit 0"], ENV)
            assert r.exit_code == 0

            def sleepers() -> list[tuple[int, int, str]]:
                out = c.exec(["sh", "-c", ZOMBIE_SCAN], ENV).stdout
                return [(p, ppid, st) for p, comm, st, ppid in _states_ppid(out) if comm == "sleep"]

            assert wait_until(lambda: len(sleepers()) == 10, 30), sleepers()
            assert all(ppid == 1 and st != "Z" for _, ppid, st in sleepers()), sleepers()  # alive, PID 1's now
            pids = " ".join(str(p) for p, _, _ in sleepers())
            assert c.exec(["sh", "-c", f"kill {pids}"], ENV).exit_code == 0

            def no_zombies_no_sleepers():
                procs = _states(c.exec(["sh", "-c", ZOMBIE_SCAN], ENV).stdout)
                return not [p for p in procs if p[2] == "Z" or p[1] == "sleep"]

            assert wait_until(no_zombies_no_sleepers, 30)
            # a timed-out tree inside the namespace is gone too
            r = c.exec(["sh", "-c", "sleep 100 & sleep 100"], ENV, timeout=0.3)
            assert r.timed_out

            def only_agent_left():
                procs = _states(c.exec(["sh", "-c", ZOMBIE_SCAN], ENV).stdout)
                # what remains: the agent itself and the `sh` doing the scan, nothing else, no zombie
                return sorted((p[1], p[2]) for p in procs) == [("ak-agent", "S"), ("sh", "R")] or \
                    (len(procs) == 2 and {p[1] for p in procs} == {"ak-agent", "sh"}
                     and all(p[2] != "Z" for p in procs))

            assert wait_until(only_agent_left, 30)
        # PID 1 ignores signals it does not handle (sent from the parent namespace they would still
        # be delivered to a handler-less PID 1 only if they were SIGKILL/SIGSTOP)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            agent_pid = int(f.read().split()[0])
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGPIPE, signal.SIGALRM):
            os.kill(agent_pid, sig)
        time.sleep(0.1)
        with SyncAgentClient.connect_unix(sock) as c:
            c.ping()
        os.kill(agent_pid, signal.SIGTERM)  # handled: clean shutdown
        assert proc.wait(5) == 0
    finally:
        stop_agent(proc)


# ------------------------------------------------------------------------------------------------
# ak-agent exec (tini-like)

def _exec_mode(agent_bin, *argv, **kw):
    return subprocess.run([agent_bin, "exec", "--", *argv], capture_output=True, timeout=20, **kw)


def test_exec_mode_exit_codes(agent_bin, tmp_path):
    for code in (0, 1, 42, 125, 255):
        assert _exec_mode(agent_bin, "sh", "-c", f"exit {code}").returncode == code
    r = _exec_mode(agent_bin, "sh", "-c", "echo out; echo err >&2")
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
    assert _exec_mode(agent_bin, "sh", "-c", "kill -TERM $$").returncode == 143
    assert _exec_mode(agent_bin, "sh", "-c", "kill -KILL $$").returncode == 137
    r = _exec_mode(agent_bin, "no-such-command-q")
    assert r.returncode == 127 and r.stderr == b"ak-agent: no-such-command-q: No such file or directory\n"
    f = tmp_path / "noexec"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    r = _exec_mode(agent_bin, str(f))
    assert r.returncode == 126 and r.stderr == f"ak-agent: {f}: Permission denied\n".encode()
    # stdin passes through, env is inherited in exec mode
    r = subprocess.run([agent_bin, "exec", "--", "sh", "-c", "cat; echo $AKX"], input=b"in\n",
                       capture_output=True, env={"PATH": "/bin:/usr/bin", "AKX": "v"}, timeout=10)
    assert r.stdout == b"in\nv\n"


def test_exec_mode_forwards_signals(agent_bin):
    for sig, script, want in (
        (signal.SIGTERM, "echo ready; exec sleep 30", 128 + 15),
        (signal.SIGUSR1, 'trap "exit 3" USR1; echo ready; while :; do sleep 0.05; done', 3),
        (signal.SIGINT, "echo ready; exec sleep 30", 128 + 2),
        (signal.SIGHUP, 'trap "exit 4" HUP; echo ready; while :; do sleep 0.05; done', 4),
    ):
        p = subprocess.Popen([agent_bin, "exec", "--", "sh", "-c", script],
                             stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(sig)
        assert p.wait(10) == want, (sig, script)
        p.stdout.close()


@needs_unshare
def test_exec_mode_pid1_reaps(agent_bin):
    script = ("sh -c 'sleep 0.1 &'; sh -c 'sleep 0.1 &'; sleep 0.6; "
              f"{ZOMBIE_SCAN} | grep -c ' Z ' || true")
    r = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", agent_bin, "exec", "--", "sh", "-c", script],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"0"


# ------------------------------------------------------------------------------------------------
# serve --stdio

def test_stdio_transport_sync(agent_bin):
    t = StdioProcessTransport([agent_bin, "serve", "--stdio"])
    c = SyncAgentClient.connect(t)
    try:
        assert c.info().stdio
        r = c.exec(["sh", "-c", "echo hello; echo e >&2; exit 5"], ENV)
        assert (r.exit_code, r.stdout, r.stderr) == (5, b"hello\n", b"e\n")
        data = os.urandom(3 << 20)
        assert c.exec(["cat"], ENV, stdin=data).stdout == data
    finally:
        c.close()  # closes the agent's input: it exits
    assert t.proc.returncode == 0


def test_stdio_transport_async(agent_bin):
    async def main():
        t = StdioProcessTransport([agent_bin, "serve", "--stdio"])
        c = await AgentClient.connect(t)
        r = await c.exec(["echo", "hello"], env=ENV)
        assert r.stdout == b"hello\n"
        proc = await c.start(["sleep", "4327.5"], env=ENV, capture=True)
        await proc.started()
        await c.close()  # input closed: the agent kills the command and exits
        assert t.proc.returncode == 0

    run(main())
    from akagent_helpers import procs_with

    assert wait_until(lambda: not procs_with("4327.5"), 3)


# ------------------------------------------------------------------------------------------------
# protocol codecs

def test_frame_codec_roundtrip():
    dec = P.FrameDecoder()
    frames = [P.encode_frame(P.R_STDOUT, 7, bytes(range(256))), P.encode_frame(P.R_EXIT, 7, b"")]
    blob = b"".join(frames)
    got = []
    for i in range(len(blob)):  # byte by byte
        got += dec.feed(blob[i:i + 1])
    assert got == [(P.R_STDOUT, 7, bytes(range(256))), (P.R_EXIT, 7, b"")]
    with pytest.raises(ValueError):
        P.encode_frame(P.STDIN, 1, b"x" * (P.MAX_PAYLOAD + 1))
    with pytest.raises(P.AgentProtocolError):
        P.FrameDecoder().feed(struct.pack(">IIBB", P.MAX_PAYLOAD + 1, 1, 1, 0))


def test_exit_code_mapping():
    assert P.exit_code_for(3) == 3
    assert P.exit_code_for(0, 15) == 143
    assert P.exit_code_for(0, 9, True) == 124
    st = P.ExitStatus(0, 9, timed_out=True)
    assert tuple(st) == (124, 9, True, False, None)


def test_exec_encoding_validation():
    with pytest.raises(TypeError):
        P.encode_exec("echo hi")
    with pytest.raises(ValueError):
        P.encode_exec([])
    with pytest.raises(ValueError):
        P.encode_exec(["x"], {"A=B": "1"})
    with pytest.raises(ValueError):
        P.encode_exec(["x" * (P.MAX_PAYLOAD + 10)])
    assert P.encode_env({"A": "1"}) == P.encode_env(["A=1"]) == [b"A=1"]
