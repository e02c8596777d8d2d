"""Interactive attach driven through a real PTY: a shell in the sandbox, resize, Ctrl-C, exit status,
asciicast recording with real timing (and input), replay; the websocket route with auth and ownership."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from api_helpers import TOKENS, unique

pytestmark = pytest.mark.engine("podman")


class PtyProc:
    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        self.set_size(rows, cols)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     close_fds=True)
        os.close(slave)
        self.buf = b""

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.buf[-800:]!r}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if r:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"process exited ({self.proc.returncode}) before {needle!r}: {self.buf!r}")
                self.buf += chunk
        i = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)


def _session(p: PtyProc) -> None:
    p.send(b"echo hello-$((6*7))\r")
    p.expect(b"hello-42")
    # resize: the sandbox's PTY follows the local terminal
    p.set_size(33, 101)
    os.killpg(p.proc.pid, signal.SIGWINCH)
    time.sleep(0.5)
    p.send(b"stty size\r")
    p.expect(b"33 101")
    # Ctrl-C interrupts the foreground command, not the shell
    p.send(b"sleep 100; echo not-interrupted\r")
    time.sleep(1.0)
    p.send(b"\x03")
    p.send(b"echo after-$((1+1))\r")
    seen = p.expect(b"after-2")
    assert b"\nnot-interrupted" not in seen  # (the typed line is echoed; its output is not there)
    p.send(b"tty; exit 3\r")


@pytest.fixture
def box(alice):
    name = unique("att")
    assert alice.post("/sandboxes", json={"name": name}).status_code == 201
    yield name
    alice.delete(f"/sandboxes/{name}")


@pytest.fixture
def local_box(server):
    """A sandbox of the local (CLI) tenant: names are per tenant, so the CLI cannot see alice's."""
    name = unique("att")
    env = dict(os.environ)  # the server and the CLI share this session's data dir
    r = subprocess.run([sys.executable, "-m", "agentkernel", "create", name, "--start"], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    yield name
    subprocess.run([sys.executable, "-m", "agentkernel", "rm", name], capture_output=True, env=env)


def test_attach_local_pty_record_replay(local_box, tmp_path):
    box = local_box
    cast = tmp_path / "s.cast"
    p = PtyProc([sys.executable, "-m", "agentkernel", "attach", box, "--record", str(cast), "--record-input"],
                dict(os.environ, TERM="xterm"), rows=24, cols=80)
    _session(p)
    assert p.wait() == 3
    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (80, 24)
    events = [json.loads(x) for x in lines[1:]]
    times = [e[0] for e in events]
    assert times == sorted(times) and times[-1] > 1.0  # real timing, not one blob
    out = "".join(e[2] for e in events if e[1] == "o")
    assert "hello-42" in out and "/dev/pts/" in out
    assert any(e[1] == "i" and "echo hello" in e[2] for e in events) or \
        "echo hello" in "".join(e[2] for e in events if e[1] == "i")
    assert ["r", "101x33"] in [e[1:] for e in events]
    t_hello = next(e[0] for e in events if e[1] == "o" and "hello-42" in e[2])
    t_after = next(e[0] for e in events if e[1] == "o" and "after-2" in e[2])
    assert t_after - t_hello > 1.0
    r = subprocess.run([sys.executable, "-m", "agentkernel", "replay", str(cast), "--speed", "50"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and b"hello-42" in r.stdout and b"after-2" in r.stdout


def test_attach_remote_websocket_pty(server, box):
    env = dict(os.environ, TERM="xterm", AGENTKERNEL_API_KEY=TOKENS["alice"])
    p = PtyProc([sys.executable, "-m", "agentkernel", "attach", box, "--url", server.url], env)
    _session(p)
    assert p.wait() == 3


def test_attach_websocket_auth_and_ownership(server, box):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = server.url.replace("http", "ws") + f"/sandboxes/{box}/attach?cmd=sh&cmd=-c&cmd=echo%20ws-ok%3B%20exit%205"

    async def go():
        with pytest.raises(InvalidStatus):  # no token: refused before the upgrade
            async with connect(url):
                pass
        async with connect(url, additional_headers={"Authorization": f"Bearer {TOKENS['bob']}"}) as ws:
            msg = json.loads(await ws.recv())
            assert msg["type"] == "error" and msg["status"] == 404
        async with connect(url, additional_headers={"Authorization": f"Bearer {TOKENS['alice']}"}) as ws:
            out, final = b"", None
            async for m in ws:
                if isinstance(m, bytes):
                    out += m
                else:
                    final = json.loads(m)
            assert b"ws-ok" in out and final == {"type": "exit", "exit_code": 5, "signal": None, "timed_out": False}

    asyncio.run(asyncio.wait_for(go(), 60))


def test_asciicast_unit(tmp_path):
    from agentkernel.asciicast import Recorder, load, replay

    path = str(tmp_path / "x.cast")
    rec = Recorder(path, width=10, height=5, command="sh")
    rec.output("é".encode()[:1])
    rec.output("é".encode()[1:] + b"x")
    rec.input(b"secret")  # not recorded unless asked
    rec.resize(6, 11)
    rec.close()
    header, events = load(path)
    assert header["width"] == 10 and [e[1:] for e in events] == [["o", "éx"], ["r", "11x6"]]
    import io

    buf, slept = io.BytesIO(), []
    assert replay(path, speed=2.0, max_idle=0.5, out=buf, sleep=slept.append) == 1
    assert buf.getvalue() == "éx".encode()
