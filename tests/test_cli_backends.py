"""End-to-end behaviour of the CLI on every container backend, against the real engines.

Each test runs the real ``agentkernel`` command in a new process, exactly as a user would, on podman,
docker and gVisor (and the oci backend). Nothing is mocked. After every test no agentkernel-labelled
container may be left behind on any engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import SESSION_LABEL, ak

BACKENDS = ["podman", "docker", "gvisor", "oci"]


def _engine_leftovers() -> list[str]:
    out = []
    for engine in ("podman", "docker"):
        r = subprocess.run([engine, "ps", "-a", "-q", "--filter", f"label={SESSION_LABEL}"],
                           capture_output=True, text=True)
        out += [f"{engine}:{c}" for c in r.stdout.split()]
    return out


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(_engine_leftovers())
    yield
    deadline = time.monotonic() + 10
    while True:
        left = set(_engine_leftovers()) - before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"containers left behind: {left}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def run(backend: str, *cmd: str, flags: tuple[str, ...] = (), input: bytes | None = None, timeout: float = 120):
    return ak("run", "--backend", backend, *flags, "--", *cmd, input=input, timeout=timeout)


# ---- results ------------------------------------------------------------------------------------------


def test_echo_hello_is_exact(backend):
    r = run(backend, "echo", "hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello\n", b"")


@pytest.mark.parametrize("code", [1, 2, 42, 125, 126, 127, 128, 200, 255])
def test_exit_codes_are_preserved(backend, code):
    r = run(backend, "sh", "-c", f"exit {code}")
    assert r.returncode == code, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_128_plus_n(backend, sig):
    r = run(backend, "sh", "-c", f"kill -{int(sig)} $$")
    assert r.returncode == 128 + int(sig), r.stderr


def test_binary_stdout_stderr_separate_and_stdin(backend):
    payload = bytes(range(256)) * 64 + b"\x00no newline at the end"
    r = run(backend, "sh", "-c", r"cat; printf '\001\377err' >&2", input=payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload
    assert r.stderr == b"\x01\xfferr"


def test_command_not_found_is_127_with_a_message(backend):
    r = run(backend, "no-such-command-xyz")
    assert r.returncode == 127
    assert b"no-such-command-xyz" in r.stderr


def test_env_and_workdir(backend):
    r = run(backend, "sh", "-c", 'echo "$GREETING" $(pwd)', flags=("-e", "GREETING=hi there", "-w", "/tmp"))
    assert r.stdout == b"hi there /tmp\n", r.stderr


# ---- limits and isolation -----------------------------------------------------------------------------


def test_timeout_kills_the_whole_tree(backend):
    t0 = time.monotonic()
    r = run(backend, "sh", "-c", "sleep 60 & sleep 60 & wait", flags=("--timeout", "2"))
    elapsed = time.monotonic() - t0
    assert r.returncode == 124
    assert b"timed out" in r.stderr
    assert elapsed < 30


def test_oom_is_reported(backend):
    r = run(backend, "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1", flags=("--memory", "32"))
    assert r.returncode == 137, (r.returncode, r.stderr)
    if backend == "gvisor":
        return  # gVisor hides the kill's cause: neither its cgroupfs nor podman report OOM (docs/backends)
    assert b"out-of-memory" in r.stderr


def test_runs_as_non_root_without_capabilities(backend):
    r = run(backend, "sh", "-c", "id -u; grep -E '^(CapEff|Seccomp):' /proc/self/status")
    out = r.stdout.decode()
    assert out.splitlines()[0] == "1000"
    assert "CapEff:\t0000000000000000" in out
    assert "Seccomp:\t2" in out


def test_read_only_root_with_writable_tmpfs(backend):
    # /home/sandbox belongs to the sandbox user: only the read-only root can make it unwritable
    script = "touch /tmp/ok && echo tmp-ok; touch /home/sandbox/nope && echo home-writable"
    r = run(backend, "sh", "-c", script, flags=("--read-only",))
    assert b"tmp-ok" in r.stdout
    assert b"home-writable" not in r.stdout
    assert b"read-only file system" in r.stderr.lower()
    r = run(backend, "sh", "-c", script)
    assert b"home-writable" in r.stdout, "without --read-only the same write succeeds"


def test_restrictive_profile_runs(backend):
    r = run(backend, "sh", "-c", "echo ok > /tmp/f && cat /tmp/f", flags=("--profile", "restrictive"))
    assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr


def test_pids_limit_stops_a_fork_bomb(backend):
    r = run(backend, "sh", "-c", "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; echo all-spawned",
            flags=("--pids", "40", "--timeout", "60"))
    assert b"all-spawned" not in r.stdout
    assert r.returncode not in (0, 124)
    if backend != "gvisor":  # gVisor's Sentry dies with the sandbox when the limit hits (docs/backends)
        assert b"fork" in r.stderr.lower() or b"resource temporarily unavailable" in r.stderr.lower()


def _host_ip() -> str:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next(ip for ip in out if "." in ip and not ip.startswith("127."))


@pytest.fixture
def host_listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)
    hits = []

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, addr = srv.accept()
            except OSError:
                continue
            hits.append(addr)
            c.sendall(b"pong\n")
            c.close()

    stop = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield _host_ip(), srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_network_off_really_off(backend, host_listener):
    ip, port, hits = host_listener
    r = run(backend, "sh", "-c", f"ip -o link | cut -d: -f2; nc -w 3 {ip} {port} </dev/null && echo CONNECTED")
    assert b"CONNECTED" not in r.stdout
    assert r.stdout.split() == [b"lo"], r.stdout
    assert hits == []


def test_network_on_never_reaches_the_host(host_listener):
    """Issue 11 item 6: "network on" (mode open) means the outside world, never the host's own listeners
    (tests/egress/ covers other sandboxes, metadata and allowlists)."""
    ip, port, hits = host_listener
    r = run("podman", "sh", "-c", f"ip -o link | cut -d: -f2; nc -w 3 {ip} {port} </dev/null && echo CONNECTED",
            flags=("--network",))
    assert b"CONNECTED" not in r.stdout and b"pong" not in r.stdout, r.stderr
    assert b"eth0" in r.stdout, r.stdout  # it does have a network
    assert hits == []


def test_disk_cap_on_writable_root_is_enforced_or_refused_not_ignored(tmp_path):
    """Enforced where podman's storage can cap (tests/security/test_storage_attacks.py); refused otherwise."""
    r = run("podman", "sh", "-c", "dd if=/dev/zero of=/workspace/f bs=1M count=30 2>/dev/null; wc -c < /workspace/f",
            flags=("--disk", "10"))
    assert r.returncode == 0 and int(r.stdout) <= 10 << 20, (r.stdout, r.stderr)
    conf = tmp_path / "storage.conf"
    conf.write_text('[storage]\ndriver = "overlay"\n')
    r = ak("run", "--backend", "podman", "--disk", "100", "--", "true", env={"CONTAINERS_STORAGE_CONF": str(conf)})
    assert r.returncode == 125
    assert b"disk_rootfs" in r.stderr and b"setup.sh" in r.stderr


# ---- named sandboxes ----------------------------------------------------------------------------------


@pytest.fixture
def box(backend):
    name = f"t-{backend}-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    r = ak("create", name, "--backend", backend, "--start")
    assert r.returncode == 0, r.stderr
    yield name
    ak("rm", name)


def test_named_lifecycle_list_stop_start_rm(box, backend):
    r = ak("exec", box, "--", "sh", "-c", "echo one > /workspace/state; cat /workspace/state")
    assert (r.returncode, r.stdout) == (0, b"one\n"), r.stderr
    rows = {x["name"]: x for x in json.loads(ak("list", "--json").stdout)}
    assert rows[box]["state"] == "running" and rows[box]["backend"] == backend
    assert ak("stop", box).returncode == 0
    rows = {x["name"]: x for x in json.loads(ak("list", "--json").stdout)}
    assert rows[box]["state"] == "stopped"
    r = ak("exec", box, "--", "true")
    assert r.returncode == 125 and b"not running" in r.stderr
    assert ak("start", box).returncode == 0
    r = ak("exec", box, "--", "cat", "/workspace/state")
    assert r.stdout == b"one\n", "the filesystem survives stop/start"
    assert ak("rm", box).returncode == 0
    assert box not in {x["name"] for x in json.loads(ak("list", "--json").stdout)}
    r = ak("exec", box, "--", "true")
    assert r.returncode == 125 and b"no sandbox named" in r.stderr


def test_exec_exit_codes_and_stdin(box):
    r = ak("exec", box, "--", "sh", "-c", "cat; exit 7", input=b"\x00\x01binary")
    assert (r.returncode, r.stdout) == (7, b"\x00\x01binary")
    r = ak("exec", box, "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 124


def test_cp_both_ways_50mb(box, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(1 << 20) * 50
    src.write_bytes(data)
    r = ak("cp", str(src), f"{box}:/tmp/big.bin")
    assert r.returncode == 0, r.stderr
    r = ak("exec", box, "--", "sha256sum", "/tmp/big.bin")
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    back = tmp_path / "back.bin"
    r = ak("cp", f"{box}:/tmp/big.bin", str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data


def test_cp_rejects_escapes(box, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    r = ak("cp", str(tmp_path / "f"), f"{box}:/tmp/../../etc/evil")
    assert r.returncode == 125 and b"'..'" in r.stderr
    r = ak("cp", f"{box}:relative/path", str(tmp_path / "g"))
    assert r.returncode == 125
    r = ak("cp", f"{box}:/etc/nonexistent-file", str(tmp_path / "g"))
    assert r.returncode == 125 and not (tmp_path / "g").exists()


def test_exec_all_exit_codes_through_the_agent(box):
    """Every exit code 0..255 through the agent path (fast: one process, many execs)."""
    script = (
        "import asyncio\n"
        "from agentkernel.manager import SandboxManager\n"
        "from agentkernel.backends.base import ExecRequest\n"
        "async def main():\n"
        "    m = SandboxManager()\n"
        "    bad = []\n"
        "    for c in range(256):\n"
        f"        r = await m.exec({box!r}, ExecRequest(['sh', '-c', f'exit {{c}}']))\n"
        "        if r.exit_code != c: bad.append((c, r.exit_code))\n"
        "    print(bad)\n"
        "asyncio.run(main())\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert r.stdout.strip() == b"[]", r.stderr


# ---- ownership ----------------------------------------------------------------------------------------


def test_sigkill_of_the_cli_leaves_no_orphan_after_the_next_command(backend):
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--backend", backend, "--", "sleep", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    engine = "docker" if backend == "docker" else "podman"
    while time.monotonic() < deadline:
        r = subprocess.run([engine, "ps", "-q", "--filter", f"label=agentkernel.owner.pid={proc.pid}"],
                           capture_output=True, text=True)
        if r.stdout.strip() or backend == "oci":
            break
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = ak("list")  # any command reaps what dead owners left
    assert r.returncode == 0
    r = subprocess.run([engine, "ps", "-a", "-q", "--filter", f"label=agentkernel.owner.pid={proc.pid}"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == ""


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_backend_image_and_name():
    r = ak("run", "--backend", "nope", "--", "true")
    assert r.returncode == 125 and b"unknown backend 'nope'" in r.stderr
    r = ak("run", "--image", "does/not-exist", "--", "true")
    assert r.returncode == 125 and b"does/not-exist" in r.stderr and b"hint:" in r.stderr  # any default backend
    r = ak("create", "bad;name")
    assert r.returncode == 125 and b"invalid sandbox name" in r.stderr
    r = ak("exec", "ghost", "--", "true")
    assert r.returncode == 125 and b"no sandbox named 'ghost'" in r.stderr
    r = ak("run")
    assert r.returncode == 2


def test_duplicate_create_is_refused_and_loses_nothing():
    name = f"dup-{os.getpid()}"
    assert ak("create", name, "--start").returncode == 0
    try:
        r = ak("create", name)
        assert r.returncode == 125 and b"already exists" in r.stderr
        assert ak("exec", name, "--", "true").returncode == 0
    finally:
        ak("rm", name)


def test_malformed_config_file(tmp_path):
    (tmp_path / "agentkernel.toml").write_text("[security]\nmount_hom = true\n")
    r = ak("run", "--", "true", cwd=str(tmp_path))
    assert r.returncode == 125 and b"unknown key 'mount_hom'" in r.stderr and b"did you mean 'mount_home'" in r.stderr


def test_engine_not_running_says_how_to_start_it():
    r = ak("run", "--backend", "docker", "--", "true", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert r.returncode == 125
    assert b"hint:" in r.stderr


def test_doctor_reports_every_backend():
    r = ak("doctor", "--json")
    assert r.returncode == 0
    rows = {b["backend"]: b for b in json.loads(r.stdout)["backends"]}
    for name in ("podman", "docker", "gvisor", "oci"):
        assert rows[name]["available"], rows[name]
    assert not rows["apple"]["available"] and "macOS" in rows["apple"]["reason"]
    text = ak("doctor").stdout.decode()
    assert "apple" in text and "gvisor-docker" in text


# ---- images without the working directory -------------------------------------------------------------


@pytest.fixture(scope="module")
def image_without_workdir(tmp_path_factory):
    """A tiny image (busybox only, no /workspace, no WORKDIR), imported into podman and docker."""
    import io
    import shutil
    import tarfile

    busybox = shutil.which("busybox")
    assert busybox and b"statically linked" in subprocess.run(["file", "-L", busybox], capture_output=True).stdout
    tar = tmp_path_factory.mktemp("img") / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        # an explicit directory entry: dockerd's btrfs driver makes implicit parents of `docker import` 0600
        ti = tarfile.TarInfo("bin")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        t.addfile(ti, io.BytesIO())
        t.add(busybox, "bin/busybox")
        for name in ("sh", "echo", "pwd", "touch"):
            ti = tarfile.TarInfo(f"bin/{name}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(ti)
        ti = tarfile.TarInfo("tmp")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o1777
        t.addfile(ti, io.BytesIO())
    names = {"podman": "localhost/ak-test-noworkdir:latest", "docker": "ak-test-noworkdir:latest"}
    for engine, ref in names.items():
        r = subprocess.run([engine, "import", "--change", "ENV PATH=/bin", str(tar), ref], capture_output=True)
        assert r.returncode == 0, r.stderr
    yield names
    for engine, ref in names.items():
        subprocess.run([engine, "rmi", "-f", ref], capture_output=True)


def test_image_without_the_workdir_runs(backend, image_without_workdir):
    img = image_without_workdir["docker" if backend == "docker" else "podman"]
    r = run(backend, "sh", "-c", "echo hi; pwd", flags=("--image", img))
    assert (r.returncode, r.stdout) == (0, b"hi\n/workspace\n"), r.stderr
    if backend != "docker":  # docker makes a missing WORKDIR root's (as `docker run` does): exists, not writable
        r = run(backend, "sh", "-c", "touch mine && echo wrote", flags=("--image", img))
        assert (r.returncode, r.stdout) == (0, b"wrote\n"), r.stderr


@pytest.mark.parametrize("engine_backend", ["podman", "gvisor"])
def test_oom_kill_leaves_nothing_in_the_callers_directory(engine_backend, tmp_path):
    """conmon writes a file named `oom` into the podman client's working directory on an OOM kill."""
    oom = ("dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1")
    r = ak("run", "--backend", engine_backend, "--memory", "32", "--", *oom, cwd=str(tmp_path))
    assert r.returncode == 137, r.stderr
    if engine_backend == "gvisor":  # an OOM kill inside a long-lived gVisor sandbox takes the sandbox down
        assert os.listdir(tmp_path) == []
        return
    name = f"t-oom-{engine_backend}-{os.getpid()}"
    r = ak("create", name, "--backend", engine_backend, "--memory", "64", "--start", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        r = ak("exec", name, "--", *oom, cwd=str(tmp_path))
        assert r.returncode == 137, r.stderr
    finally:
        assert ak("rm", name, cwd=str(tmp_path)).returncode == 0
    assert os.listdir(tmp_path) == []
