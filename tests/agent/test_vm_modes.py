"""Agent features the microVM backends use, tested on the host with a real agent process: RESEED,
per-exec and per-agent restriction (no capabilities, no_new_privs, seccomp BPF, user, cgroup), and
``serve --device`` on a device whose peer comes and goes (a pty stands in for the virtio port)."""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest
from akagent_helpers import ENV, start_agent, stop_agent

from agentkernel.agent import protocol as P
from agentkernel.agent.client import AgentClient
from agentkernel.agent.protocol import AgentError
from agentkernel.agent.transport import UnixSocketTransport

STATUS = ["sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; id -u"]


def _fields(out: bytes) -> dict[str, str]:
    d = {}
    for line in out.decode().splitlines():
        k, sep, v = line.partition(":")
        d[k.strip() if sep else "uid"] = v.strip() if sep else k.strip()
    return d


# a classic BPF program: getcwd() fails with EPERM (errno 1), everything else is allowed
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
NR_GETCWD = 79


def _bpf_deny_getcwd() -> bytes:
    ins = [
        (0x20, 0, 0, 0),                        # ld [0] (seccomp_data.nr)
        (0x15, 0, 1, NR_GETCWD),                # jeq #getcwd, deny, allow
        (0x06, 0, 0, SECCOMP_RET_ERRNO | 1),    # ret ERRNO(EPERM)
        (0x06, 0, 0, SECCOMP_RET_ALLOW),        # ret ALLOW
    ]
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (capabilities to drop, RNDADDENTROPY)")
def test_reseed_and_per_exec_restriction(agent):
    async def main():
        async with await AgentClient.connect(UnixSocketTransport(agent.sock)) as c:
            assert await c.reseed(os.urandom(64)) == 64  # credited (root); time 0: the clock is left alone
            with pytest.raises(AgentError):
                await c._request(P.RESEED, b"\0" * 4, (P.R_OK,))  # malformed: no u64 time
            plain = _fields((await c.exec(STATUS, env=ENV)).stdout)
            assert plain["CapEff"] != "0000000000000000" and plain["NoNewPrivs"] == "0"
            r = await c.exec(STATUS, env=ENV, restrict=True)
            f = _fields(r.stdout)
            assert r.exit_code == 0 and f["CapEff"] == f["CapBnd"] == "0000000000000000"
            assert f["NoNewPrivs"] == "1" and f["uid"] == "0"
            r = await c.exec(["sh", "-c", "cat /proc/self/status | grep ^Seccomp:; "
                                    "python3 -c 'import os; os.getcwd()' 2>&1 | tail -1"],
                             env=ENV, seccomp_bpf=_bpf_deny_getcwd())
            assert b"Seccomp:\t2" in r.stdout and b"PermissionError" in r.stdout
            r = await c.exec(STATUS, env=ENV, uid=1000, gid=1000, restrict=True)
            assert _fields(r.stdout)["uid"] == "1000" and _fields(r.stdout)["CapBnd"] == "0000000000000000"

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_agent_policy_applies_to_every_command(agent_bin, tmp_path):
    bpf = tmp_path / "deny.bpf"
    bpf.write_bytes(_bpf_deny_getcwd())
    sock = str(tmp_path / "a.sock")
    proc = start_agent([agent_bin, "serve", "--listen", sock, "--restrict", "--seccomp", str(bpf),
                        "--user", "1000:1000"], sock)
    try:
        async def main():
            async with await AgentClient.connect(UnixSocketTransport(sock)) as c:
                f = _fields((await c.exec(STATUS, env=ENV)).stdout)
                assert f["uid"] == "1000" and f["CapBnd"] == "0000000000000000"
                assert f["NoNewPrivs"] == "1" and f["Seccomp"] == "2"

        asyncio.run(main())
    finally:
        stop_agent(proc)


def _holds(pid: int, path: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def test_serve_device_survives_the_peer_coming_and_going(agent_bin, tmp_path):
    """A pty's master plays the host: sessions start with HELLO, a hang-up in between is not fatal."""
    import subprocess

    master, slave = os.openpty()
    import tty

    tty.setraw(slave)
    path = os.ttyname(slave)
    proc = subprocess.Popen([agent_bin, "serve", "--device", path], stdin=subprocess.DEVNULL)
    try:
        # the master reads EIO while no one holds the slave open: close ours only once the agent has it
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not _holds(proc.pid, path):
            time.sleep(0.01)
        assert _holds(proc.pid, path), "the agent never opened its device"
        os.close(slave)

        def session(n: int) -> None:
            os.write(master, P.encode_hello() + P.encode_frame(P.PING, 1, b"s%d" % n))
            buf, frames, dec = b"", [], P.FrameDecoder()
            while len(frames) < 2:
                buf = os.read(master, 65536)
                frames += dec.feed(buf)
            assert frames[0][0] == P.R_HELLO and frames[1] == (P.R_PONG, 1, b"s%d" % n)

        for n in range(5):  # each HELLO starts a new session on the same open device
            session(n)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
