"""The ``oci`` backend against the real runtimes (crun, runc, runsc): nothing is mocked.

Every behaviour test is parametrized over the runtimes installed here. One-shot runs
(``run_oneshot``, the CLI's daemon-less path) write straight to fds 0/1/2, so each runs in a fresh
Python process with pipes for stdio, as the CLI would; that process also proves the path never imports
asyncio. Named sandboxes go through the backend's async API (agent as PID 1, exec and files through it).
After every test nothing of the test's sandboxes may be left: no runtime state, cgroups, mounts, bundles.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from agentkernel import owner, paths
from agentkernel.backends.base import ExecRequest, Stdio
from agentkernel.backends.oci import OCIBackend, host_problems
from agentkernel.errors import (
    BackendUnavailable,
    NotFound,
    SandboxError,
    ValidationError,
)
from agentkernel.oci import bundle, rootfs, seccomp_oci
from agentkernel.oci import runtime as rt
from agentkernel.spec import SandboxSpec
from tests.conftest import skip_unavailable

pytestmark = [pytest.mark.engine("oci"), pytest.mark.timeout(90)]

IMAGE = "agentkernel/busybox"
PREFIX = f"akoci{uuid.uuid4().hex[:5]}"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIMES = [r for r in rt.RUNTIMES if rt.binary(r)]
ALL = bytes(range(256))

HELPER = r"""
import json, os, sys
job = json.loads(sys.argv[1])
from agentkernel.backends.oci import OCIBackend, host_problems
from agentkernel.backends.base import Stdio
from agentkernel.oneshot import run_outcome
from agentkernel.outcome import exit_code, notes
from agentkernel.spec import SandboxSpec
spec = SandboxSpec.from_dict(job["spec"])
b = OCIBackend(spec.options)
out = run_outcome(b, spec, job["argv"], Stdio(forward_stdin=job["stdin"]), job["timeout"], sandbox_id=job["id"])
rc = exit_code(out)
note = "; ".join(notes(out, timeout=job["timeout"], memory_mb=spec.resources.memory_mb)) or None
with open(job["report"], "w") as f:
    json.dump({"rc": rc, "note": note, "asyncio": "asyncio" in sys.modules}, f)
sys.exit(rc)
"""


def _sid(tag: str = "t") -> str:
    return f"{PREFIX}-{tag}-{uuid.uuid4().hex[:6]}"


def _spec(runtime: str, **kw) -> SandboxSpec:
    spec = SandboxSpec(backend="oci", image=IMAGE, options={"runtime": runtime})
    pol = {
        k: kw.pop(k) for k in list(kw) if k in ("read_only_root", "seccomp", "network", "user", "mount_cwd")
    }
    res = {k: kw.pop(k) for k in list(kw) if k in ("memory_mb", "pids", "vcpus", "disk_mb")}
    if pol:
        spec = spec.replace(policy=spec.policy.replace(**pol))
    if res:
        spec = spec.replace(resources=spec.resources.replace(**res))
    return spec.replace(**kw) if kw else spec


class OneShot:
    def __init__(self, rc: int, stdout: bytes, stderr: bytes, report: dict, sid: str, seconds: float) -> None:
        self.rc, self.stdout, self.stderr = rc, stdout, stderr
        self.report, self.sid, self.seconds = report, sid, seconds


def oneshot(
    runtime: str,
    argv: list[str],
    *,
    stdin: bytes | None = None,
    timeout: float | None = None,
    tmp_path=None,
    **spec_kw,
) -> OneShot:
    sid = _sid("run")
    report = os.path.join(str(tmp_path or "/tmp"), f"{sid}.json")
    job = {
        "spec": _spec(runtime, **spec_kw).to_dict(),
        "argv": argv,
        "id": sid,
        "timeout": timeout,
        "stdin": stdin is not None,
        "report": report,
    }
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", HELPER, json.dumps(job)],
        input=stdin or b"",
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    seconds = time.monotonic() - t0
    try:
        with open(report) as f:
            rep = json.load(f)
        os.unlink(report)
    except OSError:
        rep = {}
    return OneShot(p.returncode, p.stdout, p.stderr, rep, sid, seconds)


def assert_no_leftovers(sid: str) -> None:
    left = rt.leftovers(sid)
    assert not any(left.values()), f"left behind by {sid}: {left}"
    for r in RUNTIMES:
        assert sid not in {c.get("id") for c in rt.list_containers(r)}, f"{r} list still has {sid}"


def _ours() -> list[str]:
    try:
        return [n for n in os.listdir(rt.bundles_dir()) if n.startswith(PREFIX)]
    except OSError:
        return []


@pytest.fixture(scope="session", autouse=True)
def image_ready():
    if not RUNTIMES:
        skip_unavailable("oci", "no OCI runtime installed (bash scripts/setup.sh)")
    problems = host_problems(RUNTIMES[0])
    if problems:
        skip_unavailable("oci", f"host not prepared: {problems[0][0]} ({problems[0][1]})")
    try:
        rootfs.resolve(IMAGE, quiet=True)
    except NotFound as exc:
        skip_unavailable("oci", f"{exc} ({exc.hint})")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    left = _ours()
    for sid in left:
        rt.destroy(sid)
    assert not left, f"bundles left behind: {left}"


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    return request.param


def _agent_or_skip() -> None:
    if paths.agent_binary() is None:
        skip_unavailable("oci", "the agent is not built (make -C agent)")


def run(coro):
    return asyncio.run(coro)


# ---- one-shot: exact results ------------------------------------------------------------------------


def test_exit_codes_and_signals(runtime, tmp_path):
    for code in (0, 1, 2, 42, 125, 126, 127, 128, 200, 255):
        r = oneshot(runtime, ["sh", "-c", f"exit {code}"], tmp_path=tmp_path)
        assert r.rc == code, (code, r.stderr)
        assert r.report["asyncio"] is False
    for sig, code in (
        (signal.SIGTERM, 143),
        (signal.SIGKILL, 137),
        (signal.SIGSEGV, 139),
        (signal.SIGINT, 130),
    ):
        r = oneshot(runtime, ["sh", "-c", f"kill -{int(sig)} $$"], tmp_path=tmp_path)
        assert r.rc == code, (sig, r.stderr)
        # the one renderer names a signal death unless the user sent it on purpose (INT, TERM)
        quiet = sig in (signal.SIGTERM, signal.SIGINT)
        assert r.report["note"] == (None if quiet else f"the command was killed by signal {int(sig)}")
        assert_no_leftovers(r.sid)


def test_binary_stdio_separated_and_stdin(runtime, tmp_path):
    # all 256 byte values through stdin -> stdout, and different bytes on stderr
    data = ALL * 64 + os.urandom(100_000)
    r = oneshot(runtime, ["sh", "-c", "cat; printf '\\000\\377\\001err' >&2"], stdin=data, tmp_path=tmp_path)
    assert r.rc == 0, r.stderr
    assert r.stdout == data
    assert r.stderr == b"\x00\xff\x01err"
    r = oneshot(runtime, ["sh", "-c", "head -c 5 /dev/zero; echo -n X >&2; exit 9"], tmp_path=tmp_path)
    assert (r.rc, r.stdout, r.stderr) == (9, b"\0" * 5, b"X")
    # without forwarded stdin the command reads EOF at once
    r = oneshot(runtime, ["sh", "-c", "cat; echo done"], tmp_path=tmp_path)
    assert (r.rc, r.stdout) == (0, b"done\n")


def test_timeout_kills_the_whole_tree(runtime, tmp_path):
    r = oneshot(
        runtime, ["sh", "-c", "setsid sleep 100 & (sleep 100 &) ; sleep 100"], timeout=1.5, tmp_path=tmp_path
    )
    assert r.rc == 124
    assert "timed out" in (r.report.get("note") or "")
    assert r.seconds < 20
    assert_no_leftovers(r.sid)


def test_oom_reported(runtime, tmp_path):
    hog = 'x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x="$x$x"; done'
    r = oneshot(runtime, ["sh", "-c", hog], memory_mb=32, tmp_path=tmp_path)
    assert r.rc == 137, r.stderr
    assert "out-of-memory" in (r.report.get("note") or ""), r.report
    # a normal run under the same limit is not reported as OOM
    r = oneshot(runtime, ["sh", "-c", "head -c 8000000 /dev/zero | wc -c"], memory_mb=32, tmp_path=tmp_path)
    assert r.rc == 0 and r.report.get("note") is None, r.report


def _host_address() -> str:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for line in out.stdout.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    pytest.skip("this host has no non-loopback IPv4 address")


def test_no_network(runtime, tmp_path):
    addr = _host_address()
    srv = socket.socket()
    srv.bind((addr, 0))
    srv.listen(8)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    try:
        script = (
            f"cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; "
            f"if echo hi | nc -w 2 {addr} {port}; then echo CONNECTED; else echo refused; fi"
        )
        r = oneshot(runtime, ["sh", "-c", script], tmp_path=tmp_path)
        lines = r.stdout.decode().split()
        assert "CONNECTED" not in lines and "refused" in lines, r.stdout + r.stderr
        assert [x for x in lines if x not in ("refused",)] == ["lo"], lines
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


def test_network_and_disk_cap_accepted(runtime):
    b = OCIBackend({"runtime": runtime})
    b.check(_spec(runtime, network=True))  # every runtime joins the egress namespace (runsc: --network=host there)
    b.check(_spec(runtime, disk_mb=10))  # a writable root is capped on oci (tmpfs layer: issue 11 item 11)


def test_read_only_root_and_tmpfs(runtime, tmp_path):
    script = (
        "touch /etc/x 2>/dev/null && echo ROOT-WRITABLE; echo a > /tmp/a && cat /tmp/a; "
        "echo b > /workspace/b && cat /workspace/b; "
        "dd if=/dev/zero of=/tmp/big bs=1M count=12 2>/dev/null || echo tmpfs-full"
    )
    r = oneshot(runtime, ["sh", "-c", script], read_only_root=True, disk_mb=8, tmp_path=tmp_path)
    assert r.rc == 0, r.stderr
    assert r.stdout.split() == [b"a", b"b", b"tmpfs-full"], r.stdout


def test_writable_root_is_private(runtime, tmp_path):
    # as uid 0 (still without any capability) the image's own files are writable: in the sandbox's layer
    r = oneshot(
        runtime,
        ["sh", "-c", "echo x > /etc/added && cat /etc/added && rm /bin/cat && echo gone"],
        user="0:0",
        tmp_path=tmp_path,
    )
    assert (r.rc, r.stdout) == (0, b"x\ngone\n"), r.stderr
    # the cached image root is untouched for the next sandbox
    r = oneshot(
        runtime, ["sh", "-c", "test ! -e /etc/added && test -e /bin/cat && echo pristine"], tmp_path=tmp_path
    )
    assert r.stdout == b"pristine\n"
    rf = rootfs.resolve(IMAGE, quiet=True)
    assert not os.path.exists(os.path.join(rf.path, "etc", "added"))


def test_hardening_inside(runtime, tmp_path):
    script = (
        "id -u; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status | tr -s '\\t ' ' '; "
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNTED; hostname"
    )
    r = oneshot(runtime, ["sh", "-c", script], tmp_path=tmp_path)
    out = r.stdout.decode().splitlines()
    assert out[0] == "1000" and out[1] == "1000", out
    assert "CapEff: 0000000000000000" in out and "CapBnd: 0000000000000000" in out, out
    assert "NoNewPrivs: 1" in out or runtime == "runsc", out  # gVisor's /proc has no NoNewPrivs line
    assert "MOUNTED" not in out and out[-1] == "sandbox", out
    if runtime != "runsc":  # gVisor applies the filter inside its own kernel, /proc does not show it
        r = oneshot(runtime, ["sh", "-c", "grep Seccomp: /proc/self/status"], tmp_path=tmp_path)
        assert r.stdout.split() == [b"Seccomp:", b"2"]


def test_pids_limit_stops_a_fork_bomb(runtime, tmp_path):
    # count processes with shell built-ins only: at the limit nothing else can fork
    # (a shell dies when it cannot fork: the loop runs in a subshell that hits the limit)
    script = (
        "(i=0; while [ $i -lt 300 ]; do sleep 30 & i=$((i+1)); done) 2>/dev/null; "
        "set -- /proc/[0-9]*; echo $#"
    )
    r = oneshot(runtime, ["sh", "-c", script], pids=48, timeout=20, tmp_path=tmp_path)
    if runtime == "runsc" and r.rc != 0:
        # gVisor on ptrace backs every address space with a host stub process, so the host pids limit
        # counts them, and this runsc (2022) panics ("inactive address space") when it cannot create
        # one: the whole sandbox dies. The bomb is stopped, the host survives; we check nothing leaks.
        assert r.stdout == b"", r.stdout
    else:
        assert r.rc == 0, r.stderr
        assert int(r.stdout.split()[-1]) <= 48, r.stdout
    assert_no_leftovers(r.sid)
    bomb = "b() { b | b & }; b; sleep 3; echo survived"
    r = oneshot(runtime, ["sh", "-c", bomb], pids=48, timeout=15, tmp_path=tmp_path)
    # 0: the shell got its last forks; 2: it could not fork `sleep`/`echo` at the limit; 124: still bombing
    # at the timeout (then everything was killed). Any of them is a contained bomb.
    assert r.rc in (0, 2, 124) or (runtime == "runsc" and r.rc != 0), r.stderr[-300:]
    assert_no_leftovers(r.sid)
    assert subprocess.run(["true"]).returncode == 0  # the host still forks


# ---- faults ---------------------------------------------------------------------------------------------


def test_sigkill_of_the_cli_then_reap_leaves_nothing(runtime, tmp_path):
    sid = _sid("kill")
    job = {
        "spec": _spec(runtime).to_dict(),
        "argv": ["sleep", "100"],
        "id": sid,
        "timeout": None,
        "stdin": False,
        "report": str(tmp_path / "r.json"),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", HELPER, json.dumps(job)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not rt.cgroup_pids(sid) or not os.path.exists(os.path.join(rt.bundle_dir(sid), "init.pid")):
        assert time.monotonic() < deadline, "the sandbox never started"
        assert child.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)
    child.kill()
    child.wait()
    # the owner's death watcher removes the sandbox at once (issue 11 item 14), before any other command
    deadline = time.monotonic() + 30
    while (rt.cgroup_pids(sid) or [e for e in owner.entries() if e["id"] == sid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rt.cgroup_pids(sid), "the sandbox outlived its killed owner"
    owner.reap_dead()
    assert_no_leftovers(sid)
    with open("/proc/self/mountinfo") as f:  # its own mounts (the run dir is shared with other tests' pools)
        mounts = f.read()
    assert rt.bundle_dir(sid) + "/" not in mounts and rt.bundle_dir(sid) + " " not in mounts
    assert not [e for e in owner.entries() if e["id"] == sid]


def test_runtime_failing_mid_start_leaves_nothing(runtime, tmp_path, monkeypatch):
    # a bind mount whose source does not exist: the runtime fails after creating cgroups, namespaces, state
    orig = bundle.standard_mounts
    monkeypatch.setattr(
        bundle,
        "standard_mounts",
        lambda r: [
            *orig(r),
            {"destination": "/bogus", "type": "bind", "source": "/nonexistent-ak-src", "options": ["rbind"]},
        ],
    )
    b = OCIBackend({"runtime": runtime})
    sid = _sid("fail")
    # run in-process: the error must surface as SandboxError and the clean-up must be complete
    fd = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        with pytest.raises(SandboxError, match="could not start"):
            b.run_oneshot(_spec(runtime), ["true"], Stdio(forward_stdin=False), None, sandbox_id=sid,
                         owner=owner.current_owner())
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    assert_no_leftovers(sid)
    assert not [e for e in owner.entries() if e["id"] == sid]


def test_missing_runtime_binary(monkeypatch):
    monkeypatch.setitem(rt._CANDIDATES, "runc", ("/nonexistent/runc",))
    monkeypatch.setenv("PATH", "/nonexistent")
    b = OCIBackend({"runtime": "runc"})
    with pytest.raises(BackendUnavailable, match="runc") as ei:
        b.run_oneshot(_spec("runc"), ["true"], Stdio(forward_stdin=False), None, sandbox_id=_sid("nobin"),
                     owner=owner.current_owner())
    assert "apt-get install" in (ei.value.hint or "")


def test_bad_option_and_unknown_image():
    from agentkernel.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime"):
        OCIBackend({"runtime": "lxc"})
    with pytest.raises(ConfigError, match="no option"):
        OCIBackend({"engine": "x"})
    with pytest.raises(NotFound) as ei:
        rootfs.resolve("example.invalid/nothing:1", quiet=True)
    assert ei.value.hint


def test_unpack_into_a_fresh_cache_through_symlinks(tmp_path, monkeypatch, capfd):
    # a fresh cache (the image is not unpacked yet) reached through symlinked paths: runc needs
    # absolute, resolved rootfs paths; the unpack prints progress
    real_cache, real_run = tmp_path / "cache-real", tmp_path / "run-real"
    real_cache.mkdir()
    real_run.mkdir()
    os.symlink(real_cache, tmp_path / "cache")
    os.symlink(real_run, tmp_path / "run")
    monkeypatch.setenv("AGENTKERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AGENTKERNEL_RUNTIME_DIR", str(tmp_path / "run"))
    rf = rootfs.resolve(IMAGE)
    assert "unpacking" in capfd.readouterr().err
    assert rf.path == os.path.realpath(rf.path) and rf.path.startswith(str(real_cache))
    assert os.path.isfile(os.path.join(rf.path, "bin", "busybox"))
    assert rootfs.lookup_cached(IMAGE).path == rf.path  # second time: no unpack
    for r in RUNTIMES:
        if r == "runsc":
            continue
        r1 = oneshot(r, ["sh", "-c", "echo ok"], tmp_path=tmp_path, read_only_root=True)
        r2 = oneshot(r, ["sh", "-c", "echo ok > /workspace/x && cat /workspace/x"], tmp_path=tmp_path)
        assert (r1.rc, r1.stdout, r2.rc, r2.stdout) == (0, b"ok\n", 0, b"ok\n"), (r, r1.stderr, r2.stderr)
    for n in os.listdir(rt.bundles_dir()) if os.path.isdir(rt.bundles_dir()) else []:
        rt.destroy(n)


# ---- seccomp and the bundle ----------------------------------------------------------------------------


def test_seccomp_conversion_matches_podman():
    import shutil

    from agentkernel import seccomp

    mine = seccomp_oci.convert(seccomp.load_default_profile())
    assert mine["architectures"][0] == "SCMP_ARCH_X86_64" or os.uname().machine != "x86_64"
    names = {n for r in mine["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert "bpf" not in names and "chroot" not in names and "read" in names  # caps rules dropped
    if not shutil.which("podman") or not rootfs._inspect("podman", IMAGE):
        return
    name = f"{PREFIX}-sc"
    cid = subprocess.run(
        ["podman", "create", "--name", name, "--cap-drop", "all", IMAGE, "true"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        subprocess.run(["podman", "init", name], capture_output=True, check=True)
        from agentkernel.enginestore import podman_storage

        driver, graphroot = podman_storage()
        with open(f"{graphroot}/{driver}-containers/{cid}/userdata/config.json") as f:
            theirs = json.load(f)["linux"]["seccomp"]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot read podman's generated config here")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    assert mine == theirs


def test_restrictive_seccomp_enforced(runtime, tmp_path):
    r = oneshot(
        runtime,
        ["sh", "-c", "unshare -U true 2>/dev/null && echo UNSHARED; echo done"],
        seccomp="restrictive",
        tmp_path=tmp_path,
    )
    assert r.stdout == b"done\n", r.stdout + r.stderr


def test_crun_uses_precompiled_filter():
    if "crun" not in RUNTIMES:
        pytest.skip("crun not installed")
    b64 = seccomp_oci.crun_bpf_b64("default", rt.require_binary("crun"))
    assert b64 and len(b64) > 1000
    import base64

    assert len(base64.b64decode(b64)) % 8 == 0


# ---- named sandboxes -----------------------------------------------------------------------------------


def test_named_lifecycle_exec_and_files(runtime, tmp_path):
    _agent_or_skip()

    async def go():
        b = OCIBackend({"runtime": runtime})
        sid = _sid("named")
        spec = _spec(runtime, name="lifecycle")
        ref = await b.create(spec, sandbox_id=sid, owner=owner.current_owner())
        try:
            assert await b.status(ref) == "created"
            await b.start(ref)
            assert await b.status(ref) == "running"
            codes = range(256) if runtime != "runsc" else (0, 1, 7, 42, 126, 127, 128, 255)
            for code in codes:
                r = await b.exec(ref, ExecRequest(["sh", "-c", f"exit {code}"]))
                assert r.exit_code == code
            r = await b.exec(ref, ExecRequest(["sh", "-c", "kill -TERM $$"]))
            assert (r.exit_code, r.signal) == (143, signal.SIGTERM)
            r = await b.exec(ref, ExecRequest(["cat"], stdin=ALL))
            assert r.stdout == ALL and r.exit_code == 0
            r = await b.exec(ref, ExecRequest(["sh", "-c", "sleep 100 & sleep 100"], timeout=1))
            assert r.timed_out
            # files both ways: 50 MB by hash, a symlink that cannot escape, '..' refused
            big = os.urandom(50 << 20)
            assert await b.write_file(ref, "/workspace/big.bin", big) == len(big)
            r = await b.exec(ref, ExecRequest(["sha256sum", "/workspace/big.bin"]))
            assert r.stdout.split()[0].decode() == hashlib.sha256(big).hexdigest()
            got = hashlib.sha256()
            async for chunk in b.read_file(ref, "/workspace/big.bin"):
                got.update(chunk)
            assert got.hexdigest() == hashlib.sha256(big).hexdigest()
            # (a symlink to "/" itself trips a gVisor 2022 path-walk bug, EISDIR even for cat inside)
            await b.exec(ref, ExecRequest(["ln", "-s", "/etc", "/tmp/etc-link"]))
            passwd = b"".join([c async for c in b.read_file(ref, "/tmp/etc-link/passwd")])
            with open("/etc/passwd", "rb") as f:
                host_passwd = f.read()
            assert b"sandbox:x:1000" in passwd and passwd != host_passwd  # the sandbox's own /etc
            for bad in ("/tmp/../etc/passwd", "relative/path"):
                with pytest.raises(ValidationError):
                    await b.write_file(ref, bad, b"x")
            with pytest.raises(NotFound):
                async for _ in b.read_file(ref, "/no/such/file"):
                    pass
            # stop + start keeps the sandbox's writable layer
            await b.exec(ref, ExecRequest(["sh", "-c", "echo kept > /workspace/marker"]))
            await b.stop(ref)
            assert await b.status(ref) == "stopped"
            assert not rt.cgroup_pids(sid)
            # runsc keeps its own log in the bundle, which says why the sandbox stopped (the agent's exit)
            reason = rt.exit_reason(sid)
            assert ("exit" in reason) if runtime == "runsc" else reason is None, reason
            await b.start(ref)
            r = await b.exec(ref, ExecRequest(["cat", "/workspace/marker"]))
            assert r.stdout == b"kept\n"
            infos = {i.id: i for i in await b.list()}
            assert infos[sid].status == "running" and infos[sid].name == "lifecycle"
        finally:
            await b.remove(ref)
        assert await b.status(ref) == "missing"
        assert_no_leftovers(sid)
        await b.remove(ref)  # idempotent

    run(go())


def test_runsc_survives_many_concurrent_processes():
    """gVisor's own host tasks (sentry threads, a ptrace stub per guest process) count against the container
    cgroup's pids limit: with the guest's limit used as is, 20 concurrent execs (40 guest processes, ~300
    host tasks) made the sentry panic and the sandbox die. The host limit is scaled for runsc."""
    _agent_or_skip()
    if rt.binary("runsc") is None:
        pytest.skip("no runsc")
    from agentkernel.oci import bundle

    assert bundle.host_pids_limit("crun", 256) == 256
    assert bundle.host_pids_limit("runsc", 256) > 256

    async def go():
        b = OCIBackend({"runtime": "runsc"})
        sid = _sid("many")
        ref = await b.create(_spec("runsc", name="many"), sandbox_id=sid, owner=owner.current_owner())
        try:
            await b.start(ref)
            rs = await asyncio.gather(*(b.exec(ref, ExecRequest(["sh", "-c", f"sleep 1; echo {i}"]))
                                        for i in range(20)))
            assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(20)]
            assert await b.status(ref) == "running"
        finally:
            await b.remove(ref)
        assert_no_leftovers(sid)

    run(go())


def test_exit_reason_reads_the_last_line_that_says_why():
    sid = _sid("reason")
    os.makedirs(rt.bundle_dir(sid))
    log = os.path.join(rt.bundle_dir(sid), "runsc-boot.log")
    try:
        assert rt.exit_reason(sid) is None  # no log: not runsc, or it never started
        head = "I1203 10:45:50.900513    3796 loader.go:689] Process should have started...\n"
        lines = [head, 'W1203 10:45:50.9    3796 vfs.go:761] ignoring unknown mount option "mode=01777"\n']
        with open(log, "w") as f:
            f.writelines(lines)
        assert rt.exit_reason(sid) is None  # a warning is not a reason; the log just ends (SIGKILLed sandbox)
        lines += ["I1203 10:45:50.921273    3796 loader.go:924] Gofer socket disconnected, killing container \"x\"\n",
                  "I1203 10:45:50.922267    3796 boot.go:389] application exiting with exit status 137\n",
                  "I1203 10:45:50.922406    3796 watchdog.go:221] Stopping watchdog\n",
                  "I1203 10:45:50.922635    3796 main.go:266] Exiting with status: 35072\n"]
        with open(log, "w") as f:
            f.writelines(lines)
        assert rt.exit_reason(sid) == "application exiting with exit status 137"
        with open(log, "a") as f:
            f.write("E1203 10:45:51.0    3796 x.go:1] something failed\nnot a log line]\n")
        assert rt.exit_reason(sid) == "something failed"
        with open(log, "a") as f:  # the sentry's panic and its goroutine dump
            f.write("panic: error initializing first thread: resource temporarily unavailable\n\n"
                    "goroutine 47 [running]:\npanic({0xe7f040, 0xc0003ff230})\n")
        assert rt.exit_reason(sid) == "panic: error initializing first thread: resource temporarily unavailable"
    finally:
        rt.rmtree(rt.bundle_dir(sid))


def test_named_oom_reported(runtime):
    _agent_or_skip()

    async def go():
        b = OCIBackend({"runtime": runtime})
        sid = _sid("noom")
        ref = await b.create(_spec(runtime, memory_mb=48), sandbox_id=sid, owner=owner.current_owner())
        try:
            await b.start(ref)
            hog = 'x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x="$x$x"; done'
            r = await b.exec(ref, ExecRequest(["sh", "-c", hog]))
            assert r.exit_code == 137 and r.oom_killed, r
        finally:
            await b.remove(ref)
        assert_no_leftovers(sid)

    if runtime == "runsc":
        pytest.skip("gVisor's sentry accounts memory itself: an OOM inside it is not a host cgroup OOM kill")
    run(go())


def test_cli_run(run_ak):
    for r in [x for x in RUNTIMES if x != "runsc"]:
        p = run_ak(
            "run",
            "--backend",
            "oci",
            "-o",
            f"runtime={r}",
            "--image",
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo hello; exit 3",
        )
        assert (p.returncode, p.stdout) == (3, b"hello\n"), p.stderr
