"""The agent inside a real podman container: PID 1, non-root, no capabilities, no network."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest
from akagent_helpers import run, wait_until

from agentkernel.agent.client import AgentClient
from agentkernel.agent.sync_client import SyncAgentClient
from agentkernel.agent.transport import StdioProcessTransport, UnixSocketTransport
from tests.conftest import skip_unavailable

pytestmark = [pytest.mark.engine("podman")]

TEST_IMAGE = "localhost/ak-agent-test:latest"
ENV = {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin"}


def _podman(*args, check=True, timeout=60):
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def image():
    if not shutil.which("podman"):
        skip_unavailable("podman", "podman is not installed")
    if _podman("image", "exists", "agentkernel/busybox", check=False).returncode == 0:
        return "agentkernel/busybox"
    if _podman("image", "exists", TEST_IMAGE, check=False).returncode == 0:
        return TEST_IMAGE
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        skip_unavailable("podman", "no agentkernel/busybox image and no busybox binary to build one")
    _build_test_image(busybox)
    return TEST_IMAGE


def _build_test_image(busybox: str) -> None:
    """A throwaway busybox rootfs image (used when the lead's agentkernel/busybox is not built yet)."""
    with tempfile.TemporaryDirectory() as d:
        for sub in ("bin", "tmp", "etc", "proc", "sys", "dev", "run"):
            os.makedirs(os.path.join(d, sub))
        os.chmod(os.path.join(d, "tmp"), 0o1777)
        shutil.copy(busybox, os.path.join(d, "bin", "busybox"))
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", os.path.join(d, "bin", a))
        with open(os.path.join(d, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n")
        tar = os.path.join(d, "..", os.path.basename(d) + ".tar")
        subprocess.run(["tar", "-C", d, "-cf", tar, "."], check=True)
        try:
            _podman("import", "--change", 'CMD ["/bin/sh"]', tar, TEST_IMAGE)
        finally:
            os.unlink(tar)


def _ensure_hugetlb():
    if not os.path.ismount("/sys/fs/cgroup/hugetlb") and os.path.isdir("/sys/fs/cgroup"):
        os.makedirs("/sys/fs/cgroup/hugetlb", exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", "/sys/fs/cgroup/hugetlb"], check=False)


@pytest.fixture
def container(image, agent_bin, tmp_path):
    rundir = tmp_path / "run"
    rundir.mkdir()
    os.chmod(rundir, 0o777)  # the agent runs as uid 1000 and creates its socket here
    argv = ["run", "-d", "--rm", "--network", "none", "--memory", "128m", "--pids-limit", "128",
            "-v", f"{agent_bin}:/.ak/ak-agent:ro", "-v", f"{rundir}:/run/ak", "-u", "1000:1000",
            "--cap-drop", "all", "--security-opt", "no-new-privileges", image,
            "/.ak/ak-agent", "serve", "--listen", "/run/ak/agent.sock"]
    r = _podman(*argv, check=False)
    if r.returncode != 0 and "cgroup" in r.stderr:
        _ensure_hugetlb()
        r = _podman(*argv, check=False)
    if r.returncode != 0:
        pytest.fail(f"podman run failed: {r.stderr}")
    cid = r.stdout.strip()
    sock = str(rundir / "agent.sock")
    try:
        assert wait_until(lambda: os.path.exists(sock), 10), _podman("logs", cid, check=False).stderr
        yield cid, sock, rundir
    finally:
        _podman("rm", "-f", "-t", "0", cid, check=False)


def _agent_state(cid: str) -> str:
    """For failure messages: what the agent (PID 1 of the container) is doing."""
    pid = _podman("inspect", "-f", "{{.State.Pid}}", cid, check=False).stdout.strip()
    try:
        with open(f"/proc/{pid}/status") as f:
            state = [line.strip() for line in f if line.startswith(("State", "VmRSS"))]
        with open(f"/proc/{pid}/wchan") as f:
            state.append("wchan " + f.read())
    except OSError as e:
        state = [str(e)]
    return f"agent pid {pid}: {state}"


def test_agent_in_container(container):
    cid, sock, rundir = container
    with SyncAgentClient.connect_unix(sock) as c:
        info = c.info()
        assert info.is_pid1 and info.uid == 1000 and info.gid == 1000
        r = c.exec(["echo", "hello"], ENV)
        assert (r.exit_code, r.stdout) == (0, b"hello\n")
        assert c.exec(["id", "-u"], ENV).stdout == b"1000\n"
        assert c.exec(["sh", "-c", "exit 77"], ENV).exit_code == 77
        assert c.exec(["nope"], ENV).exit_code == 127

    data = os.urandom(5 << 20)

    step = ["connect"]
    client: list = []

    async def files():
        async with await AgentClient.connect(UnixSocketTransport(sock)) as c:
            client.append(c)
            step[0] = "put"
            assert await c.put_file("/run/ak/up/data.bin", data, make_parents=True) == len(data)
            step[0] = "get"
            got = await c.read_file("/run/ak/up/data.bin")
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            step[0] = "stat"
            st = await c.stat("/run/ak/up/data.bin")
            assert st.uid == 1000 and st.size == len(data)
            step[0] = "get-missing"
            with pytest.raises(FileNotFoundError):
                await c.read_file("/nonexistent")
            step[0] = "put-forbidden"
            with pytest.raises(PermissionError):
                await c.put_file("/etc/forbidden", b"x")  # root-owned dir, agent is uid 1000
            step[0] = "tty"
            r = await c.exec(["tty"], env=ENV, tty=True)
            assert r.stdout.startswith(b"/dev/pts/")
            step[0] = "close"

    async def guarded():
        try:
            await asyncio.wait_for(files(), 20)
        except TimeoutError:
            streams = {k: type(v).__name__ for k, v in client[0]._streams.items()} if client else None
            raise AssertionError(f"stalled at step {step[0]}; client streams {streams}; "
                                 f"{_agent_state(cid)}") from None

    run(guarded())
    assert (rundir / "up" / "data.bin").read_bytes() == data

    with SyncAgentClient.connect_unix(sock) as c:
        # OOM: the container has 128 MiB; dd allocates a 400 MiB buffer and the kernel kills it
        r = c.exec(["dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1"], ENV, timeout=20)
        assert r.signal == 9 and not r.timed_out, r
        if c.info().oom_source:
            assert r.oom, r
        assert c.exec(["echo", "still-here"], ENV).stdout == b"still-here\n"


def test_stdio_transport_via_podman_exec(container):
    cid, _, _ = container
    t = StdioProcessTransport(["podman", "exec", "-i", cid, "/.ak/ak-agent", "serve", "--stdio"])
    c = SyncAgentClient.connect(t)
    try:
        assert c.info().stdio
        assert c.exec(["id", "-u"], ENV).stdout == b"1000\n"
    finally:
        c.close()


def test_exec_mode_in_container(image, agent_bin):
    base = ["run", "--rm", "--network", "none", "-v", f"{agent_bin}:/.ak/ak-agent:ro", image, "/.ak/ak-agent",
            "exec", "--"]
    r = _podman(*base, "sh", "-c", "echo hi; exit 7", check=False)
    if r.returncode != 7 and "cgroup" in r.stderr:
        _ensure_hugetlb()
        r = _podman(*base, "sh", "-c", "echo hi; exit 7", check=False)
    assert (r.returncode, r.stdout) == (7, "hi\n"), r.stderr
    r = _podman(*base, "sh", "-c", "kill -TERM $$", check=False)
    assert r.returncode == 143
    r = _podman(*base, "missing-cmd", check=False)
    assert r.returncode == 127 and "ak-agent: missing-cmd: No such file or directory" in r.stderr
