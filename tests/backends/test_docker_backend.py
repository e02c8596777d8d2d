"""The docker backend against the real dockerd: the plan rendered as Engine API JSON, the hardening
really applied inside a running container, the engine operations of the agent-container base class,
and the synchronous one-shot (``run_attached_sync``) the CLI uses without the daemon.

One-shot runs write straight to fds 0/1/2, so each runs in a fresh Python process (as the CLI does)
with pipes for stdio; that process also proves the path never imports asyncio.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from agentkernel.backends import _container
from agentkernel.backends._container import CONTAINER_CONTROLS
from agentkernel.backends.base import Stdio, check_policy
from agentkernel.backends.docker import DockerBackend, create_body
from agentkernel.backends.docker_api import SyncClient
from agentkernel.errors import AlreadyExists, NotFound
from agentkernel.owner import current_owner
from agentkernel.spec import SandboxSpec
from tests.backends.test_docker_api import _docker_up, docker_image_or_skip
from tests.conftest import skip_unavailable

pytestmark = [pytest.mark.engine("docker"), pytest.mark.timeout(60)]

PREFIX = f"akdb{uuid.uuid4().hex[:6]}"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = bytes(range(256))

# The one-shot, as the CLI runs it: argv[1] is a JSON job; exit status = the container's (124 = timeout).
HELPER = r"""
import json, os, sys, time
job = json.loads(sys.argv[1])
from agentkernel.backends import _container
from agentkernel.backends.base import Stdio
from agentkernel.backends.docker import DockerBackend
from agentkernel.owner import current_owner
from agentkernel.spec import SandboxSpec
spec = SandboxSpec.from_dict(job["spec"])
plan = _container.plan(spec, sandbox_id=job["id"], owner=current_owner(), container_name=job["name"],
                       argv=job["argv"], agent_bin=None, cwd=job.get("cwd"), interactive=job["interactive"])
t0 = time.monotonic()
rc = DockerBackend().run_attached_sync(plan, timeout=job["timeout"], stdio=Stdio(forward_stdin=job["forward_stdin"]))
with open(job["report"], "w") as f:
    json.dump({"rc": rc, "asyncio": "asyncio" in sys.modules, "seconds": time.monotonic() - t0}, f)
sys.exit(124 if rc is None else rc)
"""


@pytest.fixture(scope="session")
def image():
    return docker_image_or_skip()


def _mine() -> list[dict]:
    with SyncClient() as c:
        cs = c.json("GET", "/containers/json",
                    params={"all": True, "filters": {"label": ["agentkernel.managed=true"]}})
    return [x for x in cs if x["Labels"].get("agentkernel.sandbox-id", "").startswith(PREFIX)]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    left = _mine()
    with SyncClient() as c:
        for x in left:
            c.request("DELETE", f"/containers/{x['Id']}", params={"force": True}, ok=(404, 409))
    assert not left, f"containers left behind: {[x['Names'] for x in left]}"


def _spec(image: str, **policy_resources) -> SandboxSpec:
    d = SandboxSpec().to_dict()
    d["image"] = image
    d["backend"] = "docker"
    for k, v in policy_resources.items():
        if k in d["policy"]:
            d["policy"][k] = v
        elif k in d["resources"]:
            d["resources"][k] = v
        else:
            d[k] = v
    return SandboxSpec.from_dict(d)


class OneShot:
    def __init__(self, proc: subprocess.Popen, report: str, sid: str) -> None:
        self.proc, self.report, self.id = proc, report, sid

    def finish(self, input: bytes | None = None, timeout: float = 40):
        out, err = self.proc.communicate(input, timeout=timeout)
        with open(self.report) as f:
            rep = json.load(f)
        assert rep["asyncio"] is False, "the one-shot path imported asyncio"
        return self.proc.returncode, out, err, rep


def start_oneshot(tmp_path, spec: SandboxSpec, argv: list[str], *, timeout: float | None = None,
                  stdin: bool = False, forward_stdin: bool | None = None, cwd: str | None = None) -> OneShot:
    sid = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    report = str(tmp_path / f"{sid}.json")
    job = {"spec": spec.to_dict(), "id": sid, "name": f"agentkernel-{sid}", "argv": argv, "timeout": timeout,
           "interactive": stdin, "forward_stdin": stdin if forward_stdin is None else forward_stdin,
           "report": report, "cwd": cwd}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HELPER, json.dumps(job)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd or REPO)
    return OneShot(proc, report, sid)


def oneshot(tmp_path, spec, argv, input: bytes | None = None, **kw):
    return start_oneshot(tmp_path, spec, argv, **kw).finish(input)


def _printf_all_bytes(reverse: bool = False) -> str:
    vals = range(255, -1, -1) if reverse else range(256)
    return "".join(f"\\{v:03o}" for v in vals)


# ---- the plan as Engine API JSON (no engine needed) -----------------------------------------------------


def test_create_body_renders_the_plan():
    spec = _spec("agentkernel/busybox", read_only_root=True, seccomp="restrictive", memory_mb=128, vcpus=0.5,
                 pids=64, disk_mb=16, env={"A": "1"}, network=True)
    p = _container.plan(spec, sandbox_id="x1", owner=current_owner(), container_name="agentkernel-x1",
                        argv=["echo", "hi"], interactive=True)
    b = create_body(p, network="agentkernel", oneshot=True)
    hc = b["HostConfig"]
    assert b["Entrypoint"] == ["echo"] and b["Cmd"] == ["hi"]
    assert b["User"] == "1000:1000" and b["Env"] == ["A=1"] and b["WorkingDir"] == "/workspace"
    assert b["Labels"]["agentkernel.managed"] == "true" and b["Labels"]["agentkernel.sandbox-id"] == "x1"
    assert b["OpenStdin"] and b["StdinOnce"] and b["AttachStdin"] and not b["Tty"]
    assert hc["CapDrop"] == ["ALL"] and hc["SecurityOpt"][0] == "no-new-privileges"
    assert hc["SecurityOpt"][1].startswith("seccomp={") and json.loads(hc["SecurityOpt"][1][8:])["syscalls"]
    assert hc["Memory"] == hc["MemorySwap"] == 128 << 20
    assert hc["NanoCpus"] == 500_000_000 and hc["PidsLimit"] == 64
    assert hc["ReadonlyRootfs"] is True and set(hc["Tmpfs"]) == {"/tmp", "/workspace"}
    assert "size=16m" in hc["Tmpfs"]["/tmp"]
    assert hc["NetworkMode"] == "agentkernel"
    default = _container.plan(_spec("agentkernel/busybox"), sandbox_id="x2", owner=current_owner(),
                              container_name="n", argv=["true"])
    b2 = create_body(default, network="none", oneshot=False)
    # the default filter: the engine's own plus no namespace creation (issue 11 item 8)
    opts = b2["HostConfig"]["SecurityOpt"]
    assert opts[0] == "no-new-privileges" and opts[1].startswith("seccomp={")
    assert any("unshare" in r["names"] for r in json.loads(opts[1][8:])["syscalls"] if r["action"] != "SCMP_ACT_ALLOW")
    assert b2["Cmd"] == [] and not b2["OpenStdin"] and "LogConfig" not in b2["HostConfig"]
    assert b2["NetworkDisabled"] is True and b2["HostConfig"]["NetworkMode"] == "none"
    assert b["NetworkDisabled"] is False


def test_capabilities_are_the_container_controls():
    assert DockerBackend.capabilities.controls == frozenset(CONTAINER_CONTROLS) | {"network_allowlist",
                                                                                  "secret_injection", "disk_rootfs"}
    check_policy(_spec("x", read_only_root=True, seccomp="restrictive", disk_mb=10, network=True),
                 DockerBackend.capabilities, "docker")


# ---- probe ----------------------------------------------------------------------------------------------


def test_probe(image, monkeypatch, tmp_path):
    a = DockerBackend.probe()
    assert a.available, a.reason
    assert a.details["api_version"] >= "1.41"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")
    a = DockerBackend.probe()
    assert not a.available and "does not exist" in a.reason
    assert a.fix == "start dockerd: bash scripts/setup.sh"
    monkeypatch.setenv("DOCKER_HOST", "ssh://somewhere")
    a = DockerBackend.probe()
    assert not a.available and "not a unix socket" in a.reason


# ---- one-shot -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_oneshot_exit_codes(image, tmp_path, code):
    rc, out, err, rep = oneshot(tmp_path, _spec(image), ["sh", "-c", f"exit {code}"])
    assert rc == code and rep["rc"] == code and out == b"" and err == b""


def test_oneshot_binary_stdout_stderr_separate(image, tmp_path):
    cmd = f"printf '{_printf_all_bytes()}'; printf '{_printf_all_bytes(True)}' >&2; printf e >&2; printf o"
    rc, out, err, _ = oneshot(tmp_path, _spec(image), ["sh", "-c", cmd])
    assert rc == 0
    assert out == ALL + b"o"
    assert err == ALL[::-1] + b"e"


def test_oneshot_stdin_forwarded_until_eof(image, tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 3) + ALL
    rc, out, err, _ = oneshot(tmp_path, _spec(image), ["sh", "-c", "cat; printf END >&2"], input=data,
                              stdin=True)
    assert rc == 0 and out == data and err == b"END"
    # stdin attached but not forwarded: the container sees EOF at once (cat does not hang)
    rc, out, _, _ = oneshot(tmp_path, _spec(image), ["cat"], input=b"not sent", stdin=True,
                            forward_stdin=False)
    assert rc == 0 and out == b""


def test_oneshot_output_streams_before_exit(image, tmp_path):
    job = start_oneshot(tmp_path, _spec(image), ["sh", "-c", "echo first; read x; echo second"], stdin=True)
    assert job.proc.stdout.readline() == b"first\n"  # arrives while the command still runs
    job.proc.stdin.write(b"go\n")
    job.proc.stdin.flush()
    assert job.proc.stdout.readline() == b"second\n"
    rc, out, _, _ = job.finish()
    assert rc == 0 and out == b""


def test_oneshot_missing_command_is_127(image, tmp_path):
    rc, _, err, _ = oneshot(tmp_path, _spec(image), ["no-such-command-here"])
    assert rc == 127 and b"no-such-command-here" in err


def test_oneshot_signal_death_is_128_plus_n(image, tmp_path):
    job = start_oneshot(tmp_path, _spec(image), ["sh", "-c", "echo up; exec sleep 60"])
    assert job.proc.stdout.readline() == b"up\n"
    with SyncClient() as c:
        c.request("POST", f"/containers/agentkernel-{job.id}/kill", params={"signal": "SIGKILL"})
    rc, _, _, rep = job.finish()
    assert rc == 128 + signal.SIGKILL and rep["rc"] == 137


def test_oneshot_sigint_is_forwarded_and_the_run_continues(image, tmp_path):
    script = 'trap "echo got-int; exit 130" INT; echo ready; while :; do sleep 0.1; done'
    job = start_oneshot(tmp_path, _spec(image), ["sh", "-c", script], timeout=30)
    assert job.proc.stdout.readline() == b"ready\n"
    job.proc.send_signal(signal.SIGINT)
    rc, out, err, rep = job.finish()
    assert out == b"got-int\n", err
    assert rc == 130 and rep["rc"] == 130


def test_oneshot_timeout_kills_and_removes(image, tmp_path):
    t0 = time.monotonic()
    rc, out, _, rep = oneshot(tmp_path, _spec(image), ["sh", "-c", "echo before; sleep 60"], timeout=1.0)
    assert rc == 124 and rep["rc"] is None and out == b"before\n"
    assert time.monotonic() - t0 < 15
    assert not _mine()


def test_oneshot_name_conflict_leaves_the_other_container(image, tmp_path):
    sid = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    name = f"agentkernel-{sid}"
    with SyncClient() as c:
        c.json("POST", "/containers/create", params={"name": name},
               body={"Image": image,
                     "Labels": {"agentkernel.managed": "true", "agentkernel.sandbox-id": sid}})
    try:
        p = _container.plan(_spec(image), sandbox_id=sid, owner=current_owner(), container_name=name,
                            argv=["true"])
        with pytest.raises(AlreadyExists):
            DockerBackend().run_attached_sync(p, timeout=None, stdio=Stdio(forward_stdin=False))
        with SyncClient() as c:
            assert c.request("GET", f"/containers/{name}/json").status == 200  # not ours: not removed
    finally:
        DockerBackend().force_remove_sync(name)


def test_oneshot_unknown_image_is_not_found():
    if _docker_up():
        skip_unavailable("docker", "dockerd is not reachable")
    p = _container.plan(_spec("agentkernel/no-such-image"), sandbox_id=f"{PREFIX}img", owner=current_owner(),
                        container_name=f"agentkernel-{PREFIX}img", argv=["true"])
    with pytest.raises(NotFound, match="No such image"):
        DockerBackend().run_attached_sync(p, timeout=None, stdio=Stdio(forward_stdin=False))


# ---- hardening, observed from inside a running container -------------------------------------------------

PROBE = r"""
grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
echo "uid=$(id -u) gid=$(id -g)"
echo "mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
echo "memsw=$(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes)"
echo "pids=$(cat /sys/fs/cgroup/pids/pids.max)"
echo "cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)/$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
echo "links=$(ls /sys/class/net | tr '\n' ' ')"
echo "netns=$(readlink /proc/self/ns/net)"
echo "hostname=$(hostname)"
(nc -l -p 7777 -w 3 >/tmp/lo &) ; sleep 0.2; echo via-lo | nc -w 1 127.0.0.1 7777; sleep 0.1
echo "lo=$(cat /tmp/lo)"
touch /rootfile 2>/dev/null && echo root=writable || echo root=readonly
echo data > /tmp/f && echo tmp=writable || echo tmp=readonly
echo data > /workspace/f && echo workspace=writable || echo workspace=readonly
dd if=/dev/zero of=/tmp/big bs=1M count=40 2>/dev/null && echo tmpcap=none || echo tmpcap=enforced
echo "env=$GREETING"
linux32 true 2>/dev/null && echo personality=allowed || echo personality=denied
"""


def _kv(out: bytes) -> dict[str, str]:
    kv = {}
    for line in out.decode().splitlines():
        k, _, v = line.replace(":\t", "=").partition("=")
        kv[k.strip()] = v.strip()
    return kv


def test_hardening_applied_in_running_container(image, tmp_path):
    spec = _spec(image, read_only_root=True, seccomp="restrictive", memory_mb=96, pids=48, vcpus=0.5,
                 disk_mb=16, env={"GREETING": "hello world"})
    rc, out, err, _ = oneshot(tmp_path, spec, ["sh", "-c", PROBE])
    assert rc == 0, err
    kv = _kv(out)
    assert kv["CapEff"] == kv["CapPrm"] == kv["CapBnd"] == "0000000000000000"
    assert kv["NoNewPrivs"] == "1" and kv["Seccomp"] == "2"
    assert kv["uid"] == "1000 gid=1000"
    assert int(kv["mem"]) == int(kv["memsw"]) == 96 << 20
    assert kv["pids"] == "48" and kv["cpu"] == "50000/100000"
    assert kv["links"] == "lo" and kv["lo"] == "via-lo"  # loopback is up
    assert kv["netns"] != os.readlink("/proc/self/ns/net") and kv["hostname"] == "sandbox"
    assert kv["root"] == "readonly" and kv["tmp"] == "writable" and kv["workspace"] == "writable"
    assert kv["tmpcap"] == "enforced"  # 40 MiB does not fit the 16 MiB tmpfs
    assert kv["env"] == "hello world"
    assert kv["personality"] == "denied"  # the restrictive filter: the engine's default allows it


def test_default_policy_and_mount_cwd(image, tmp_path):
    (tmp_path / "hostfile").write_bytes(b"from the host")
    tmp_path.chmod(0o777)  # the sandbox user (uid 1000) must be able to write the caller's directory
    spec = _spec(image, mount_cwd=True)
    script = ("grep Seccomp: /proc/self/status; cat hostfile; pwd; echo w > written && echo ok; "
              "linux32 true && echo personality=allowed")
    rc, out, err, _ = oneshot(tmp_path, spec, ["sh", "-c", script], cwd=str(tmp_path))
    assert rc == 0, err
    want = ["Seccomp:\t2", "from the host/workspace", "ok", "personality=allowed"]
    assert out.decode().splitlines() == want
    assert (tmp_path / "written").read_bytes() == b"w\n"


def test_memory_limit_oom_kills(image, tmp_path):
    spec = _spec(image, memory_mb=32)
    # tail buffers one 200 MiB "line": more than the limit
    rc, _, _, _ = oneshot(tmp_path, spec, ["sh", "-c", "head -c 200000000 /dev/zero | tail -n 1 >/dev/null"])
    assert rc == 128 + signal.SIGKILL


def test_full_network_without_host_access(image, tmp_path):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    script = ("ls /sys/class/net | tr '\\n' ' '; echo; ip route | grep -q '^default' && echo route=default; "
              f"gw=$(ip route | awk '/default/{{print $3}}'); nc -w 2 $gw {port} </dev/null "
              "&& echo host=open || echo host=blocked")
    try:
        # network modes go through the egress namespace, which the CLI's one-shot path attaches
        from tests.conftest import ak

        r = ak("run", "--no-daemon", "-B", "docker", "-i", image, "--network", "--", "sh", "-c", script)
        rc, out, err = r.returncode, r.stdout, r.stderr
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing ever connected to the host's listener
    finally:
        srv.close()
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split() == ["eth0", "lo"]
    assert "route=default" in lines and "host=blocked" in lines
    # the network is the egress namespace (tests/egress/ attacks it), not a docker bridge


# ---- engine operations of the agent-container base ---------------------------------------------------------


def test_engine_operations_lifecycle(image):
    sid = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    name = f"agentkernel-{sid}"
    p = _container.plan(_spec(image, memory_mb=64), sandbox_id=sid, owner=current_owner(),
                        container_name=name, argv=["sleep", "300"])

    async def main():
        b = DockerBackend()
        try:
            cid = await b._engine_create(p)
            assert len(cid) == 64
            assert (await b._engine_state(name))[0] == "created"
            with pytest.raises(AlreadyExists):
                await b._engine_create(p)
            await b._engine_start(name)
            await b._engine_start(name)  # already running: not an error
            assert (await b._engine_state(name))[0] == "running"
            infos = [i for i in await b.list() if i.id == sid]
            assert len(infos) == 1 and infos[0].handle == {"container": name, "container_id": cid}
            assert infos[0].status == "running"
            assert infos[0].labels["agentkernel.owner.pid"] == str(os.getpid())
            t0 = time.monotonic()
            await b._engine_stop(name)  # sleep ignores SIGTERM as PID 1: killed after the 2 s grace
            assert time.monotonic() - t0 < 10
            state, details = await b._engine_state(name)
            assert state == "stopped" and details == {"oom_killed": False, "exit_code": 137}
            await b._engine_remove(name)
            await b._engine_remove(name)  # missing is fine
            assert (await b._engine_state(name)) == ("missing", {})
            with pytest.raises(NotFound):
                await b._engine_start(name)
        finally:
            await b._engine_remove(name)
            await b.aclose()

    asyncio.run(main())


def test_engine_reports_oom_kill(image):
    sid = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    name = f"agentkernel-{sid}"
    p = _container.plan(_spec(image, memory_mb=32), sandbox_id=sid, owner=current_owner(),
                        container_name=name, argv=["sh", "-c", "head -c 200000000 /dev/zero | tail -n 1"])

    async def main():
        b = DockerBackend()
        try:
            await b._engine_create(p)
            await b._engine_start(name)
            # up to 60 s: on a loaded host the memory cgroup reclaims (here: the btrfs-backed executable's
            # pages) for several seconds before the OOM killer acts (6.5 s and >10 s seen, 2 s on overlay2)
            for _ in range(1200):
                state, details = await b._engine_state(name)
                if state == "stopped":
                    return details
                await asyncio.sleep(0.05)
            raise AssertionError("the container did not stop")
        finally:
            await b._engine_remove(name)
            await b.aclose()

    details = asyncio.run(main())
    assert details["oom_killed"] is True


def test_agent_sandbox_lifecycle_with_full_network(image):
    """The whole Backend interface on docker: the agent as PID 1, exec and files over its socket."""
    from agentkernel import paths

    if paths.agent_binary() is None:
        skip_unavailable("docker", "the in-sandbox agent is not built (make -C agent)")
    pytest.importorskip("agentkernel.backends._agentexec")
    from agentkernel.backends.base import ExecRequest

    spec = _spec(image, network=True)
    sid = f"{PREFIX}{uuid.uuid4().hex[:8]}"

    async def main():
        b = DockerBackend()
        ref = await b.create(spec, sandbox_id=sid, owner=current_owner())
        try:
            assert await b.status(ref) == "created"
            await b.start(ref)
            assert await b.status(ref) == "running"
            script = "ls /sys/class/net | tr '\\n' ' '; printf e >&2; exit 7"
            r = await b.exec(ref, ExecRequest(["sh", "-c", script]))
            assert (r.exit_code, r.stdout, r.stderr) == (7, b"eth0 lo ", b"e")
            await b.write_file(ref, "/tmp/f", ALL)
            assert b"".join([c async for c in b.read_file(ref, "/tmp/f")]) == ALL
            await b.stop(ref)
            assert await b.status(ref) == "stopped"
            await b.remove(ref)
            assert await b.status(ref) == "missing"
        finally:
            await b.remove(ref)
            await b.aclose()

    asyncio.run(main())
