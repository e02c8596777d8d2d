"""The ``qemu`` backend end to end: real QEMU microvm guests (TCG here; KVM where the probe passes).

The guest image and the snapshot template are built once (content-keyed cache); every sandbox after that
starts by restoring the template (-incoming), so the whole module stays well under three minutes.
Nothing is mocked. After the module, no QEMU process and no run dir of ours may be left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agentkernel import deathwatch, owner
from agentkernel.backends import get_backend
from agentkernel.backends.base import ExecRequest
from agentkernel.backends.qemu import QemuBackend, sandboxes_dir, vm_pid
from agentkernel.errors import PolicyNotEnforceable
from agentkernel.spec import SandboxSpec
from agentkernel.vm import kvmprobe
from tests.conftest import ak, need

pytestmark = [pytest.mark.engine("qemu"), pytest.mark.timeout(240)]

SPEC = SandboxSpec(backend="qemu", image="agentkernel/busybox")
ALL = bytes(range(256))


@pytest.fixture(scope="module")
def backend():
    avail = QemuBackend.probe()
    need(avail.available, f"qemu backend unavailable: {avail.reason} ({avail.fix})")
    return get_backend("qemu")


def _ours() -> list[str]:
    return sorted(os.listdir(sandboxes_dir()))


def _qemu_pids() -> list[int]:
    base = os.path.realpath(sandboxes_dir()).encode()
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if base in f.read():
                        out.append(int(p))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    yield
    deadline = time.monotonic() + 5
    while (_ours() or _qemu_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ours() == [], "run dirs (disks) left behind"
    assert _qemu_pids() == [], "QEMU processes left behind"


@pytest.fixture(scope="module")
def vm(backend):
    """One restored sandbox shared by the exec/file tests."""
    async def up():
        ref = await backend.create(SPEC, sandbox_id=owner.new_id("tq"), owner=owner.current_owner())
        await backend.start(ref)
        return ref

    ref = asyncio.run(up())
    yield ref
    asyncio.run(backend.remove(ref))
    assert vm_pid(ref.handle["dir"]) is None


def _exec(backend, ref, argv, **kw):
    return asyncio.run(backend.exec(ref, ExecRequest(argv, **kw)))


def test_kvm_probe_is_fast_and_explains():
    t = time.perf_counter()
    v = kvmprobe.probe(use_cache=False)
    fresh_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    again = kvmprobe.probe()
    cached_ms = (time.perf_counter() - t) * 1e3
    assert fresh_ms < 1000 and cached_ms < 20, (fresh_ms, cached_ms)
    assert again.ok == v.ok and again.reason == v.reason and v.reason
    if kvmprobe.kernel_is_pvm():  # this project's machines: PVM, no ordinary guest can run
        assert not v.ok and v.pvm and "PVM" in v.reason and "INTERNAL_ERROR" in v.detail


def test_a_guest_crash_is_reported_from_its_first_line(tmp_path):
    """A VM that died reports the guest kernel's crash from its first line (what went wrong), not the tail
    of the register dump that follows it; a console with no crash gives its tail."""
    from agentkernel.backends.qemu import _console

    log = tmp_path / "console.log"
    boot = "".join(f"[    0.{i:06d}] booting line {i}\r\n" for i in range(200))
    oops = ("[    8.600000] BUG: kernel NULL pointer dereference, address: 0000000000000008\r\n"
            "[    8.600100] #PF: supervisor read access in kernel mode\r\n")
    dump = "".join(f"[    8.67{i:04d}] R{i:02d}: 0000000000000000 knlGS:0000000000000000\r\n" for i in range(60))
    log.write_bytes((boot + oops + dump + "[    8.700000] Kernel panic - not syncing: Fatal exception\r\n").encode())
    said = _console(str(tmp_path))
    assert said.startswith("guest kernel: [    8.600000] BUG: kernel NULL pointer dereference"), said
    assert said.endswith("Kernel panic - not syncing: Fatal exception"), said
    log.write_bytes(boot.encode())
    assert _console(str(tmp_path)).endswith("booting line 199")
    assert _console(str(tmp_path / "gone")) == ""


def test_a_saved_state_is_whole_when_the_save_returns(tmp_path):
    """QEMU reports a migration "completed" once it has closed its end of the pipe to ``exec:``'s command;
    ``cat`` may still be writing. The save returns only when the file is whole (the command has exited),
    and a writer that failed is an error. QEMU's side is played by a process that writes through the same
    ``sh -c`` command QEMU would run and closes its pipe before ``cat`` has drained it."""
    from agentkernel.backends.qemu import _migrate_to_file
    from agentkernel.errors import SandboxError

    payload = os.urandom(4 << 20)

    class SlowDrain:  # QMP: "completed" as soon as QEMU's side has written everything and closed the pipe
        async def cmd(self, name, **kw):
            if name == "migrate":
                # the command's cat starts late (as on a loaded host): the pipe is closed long before it drains
                self.proc = subprocess.Popen(["sh", "-c", f"sleep 0.5; {kw['uri'].removeprefix('exec:')}"],
                                             stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
                self.writer = threading.Thread(target=self._write)
                self.writer.start()
                self.writer.join(0.2)  # in the pipe, not yet in the file
            return {"status": "completed"} if name == "query-migrate" else {}

        def _write(self):
            try:
                self.proc.stdin.write(payload)
                self.proc.stdin.close()
            except BrokenPipeError:  # the command failed: QEMU's migration would go on regardless
                pass

    async def save(path):
        q = SlowDrain()
        try:
            await _migrate_to_file(q, path, ignore_shared=False, poll_s=0.005)
            with open(path, "rb") as f:
                return f.read()  # what a restore started right now would read
        finally:
            q.writer.join()
            q.proc.wait()

    path = tmp_path / "state"
    assert asyncio.run(save(str(path))) == payload
    assert not os.path.exists(f"{path}.done")
    with pytest.raises(SandboxError, match=r"cat exited with [1-9]"):
        os.mkdir(tmp_path / "a-dir")  # cat cannot write there
        asyncio.run(save(str(tmp_path / "a-dir")))


def test_probe_picks_the_accelerator(backend):
    avail = QemuBackend.probe()
    assert avail.details["accel"] == ("kvm" if kvmprobe.probe().ok else "tcg")
    assert backend.accel() == avail.details["accel"]


def test_exit_codes_0_to_255(backend, vm):
    async def all_codes():
        out = {}
        for code in range(256):
            r = await backend.exec(vm, ExecRequest(["sh", "-c", f"exit {code}"]))
            out[code] = r.exit_code
        return out

    assert asyncio.run(all_codes()) == {c: c for c in range(256)}


def test_binary_output_stdin_and_files_both_ways(backend, vm):
    data = os.urandom(3 << 20) + ALL
    n = asyncio.run(backend.write_file(vm, "/workspace/in.bin", data))
    assert n == len(data)
    r = _exec(backend, vm, ["cat", "/workspace/in.bin"])
    assert r.exit_code == 0 and r.stdout == data
    r = _exec(backend, vm, ["sh", "-c", "cat > /workspace/out.bin; printf '\\377\\000' >&2"], stdin=ALL * 3)
    assert r.exit_code == 0 and r.stderr == b"\xff\x00"

    async def read():
        return b"".join([c async for c in backend.read_file(vm, "/workspace/out.bin")])

    assert asyncio.run(read()) == ALL * 3


def test_timeout_kills_the_command(backend, vm):
    t = time.perf_counter()
    r = _exec(backend, vm, ["sleep", "30"], timeout=0.5)
    assert r.timed_out and time.perf_counter() - t < 10
    assert _exec(backend, vm, ["echo", "still alive"]).stdout == b"still alive\n"


def test_concurrent_users_share_the_port_and_free_it(backend, vm):
    """The agent port takes one host session at a time. Concurrent users in one process share it: a short
    command finishes while a long one runs (not after it). When the last is done the session is closed,
    so another process (here the file transfer's own connection through a fresh backend object, as
    another process would) gets the port at once."""
    async def go():
        t0 = time.monotonic()
        long = asyncio.ensure_future(backend.exec(vm, ExecRequest(["sh", "-c", "sleep 6; echo long"])))
        await asyncio.sleep(0.3)
        short = await backend.exec(vm, ExecRequest(["echo", "short"]))
        short_s = time.monotonic() - t0
        assert short.stdout == b"short\n" and short_s < 5, short_s  # not queued behind the long one
        assert (await long).stdout == b"long\n"
        assert len(backend._sessions) == 0  # the last user closed it
        t1 = time.monotonic()
        other = QemuBackend()  # another process's view: its own connection to the port
        assert (await other.exec(vm, ExecRequest(["echo", "other"]))).stdout == b"other\n"
        assert time.monotonic() - t1 < 5

    asyncio.run(go())


def test_policy_is_enforced_inside_the_guest(backend, vm):
    r = _exec(backend, vm, ["sh", "-c", "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
                            "cat /sys/fs/cgroup/sandbox/pids.max; ls /sys/class/net; pwd"])
    out = r.stdout.decode().split()
    assert r.exit_code == 0, r
    assert out[0] == "1000"
    assert "CapEff:" in out and out[out.index("CapEff:") + 1] == "0000000000000000"
    assert out[out.index("CapBnd:") + 1] == "0000000000000000"
    assert out[out.index("NoNewPrivs:") + 1] == "1" and out[out.index("Seccomp:") + 1] == "2"
    assert "256" in out and "lo" in out and "eth0" not in out  # pids cgroup, no NIC at all
    assert out[-1] == "/workspace"


def test_fail_closed_for_what_it_cannot_enforce(backend):
    for spec, control in ((SPEC.replace(policy=SPEC.policy.replace(network=True)), "network_full"),
                          (SPEC.replace(policy=SPEC.policy.replace(mount_cwd=True)), "mount_cwd"),
                          (SPEC.replace(resources=SPEC.resources.replace(vcpus=0.5)), "cpu")):
        with pytest.raises(PolicyNotEnforceable, match=control):
            backend.check(spec)


def test_disk_cap_below_the_fixed_root_disk_is_refused(tmp_path):
    """A writable root's cap holds at or above the VM's root disk size (fixed at build); below it: refused."""
    from agentkernel.backends.qemu import check_disk_size

    disk = tmp_path / "root.ext4"
    with open(disk, "wb") as f:
        f.truncate(100 << 20)
    with pytest.raises(PolicyNotEnforceable, match="root disk"):
        check_disk_size(SPEC.replace(resources=SPEC.resources.replace(disk_mb=64)), str(disk), "qemu")
    check_disk_size(SPEC.replace(resources=SPEC.resources.replace(disk_mb=100)), str(disk), "qemu")
    check_disk_size(SPEC.replace(policy=SPEC.policy.replace(read_only_root=True),  # disk_mb sizes its tmpfs
                                 resources=SPEC.resources.replace(disk_mb=8)), str(disk), "qemu")


def test_read_only_root_with_tmpfs_capped_at_disk_mb(backend):
    """read_only_root: the guest's root is remounted read-only (root inside the guest cannot write it
    either); /tmp and the workdir are tmpfs of disk_mb MiB, the workdir owned by the sandbox's user."""
    spec = SPEC.replace(policy=SPEC.policy.replace(read_only_root=True), resources=SPEC.resources.replace(disk_mb=8))
    backend.check(spec)

    async def go():
        ref = await backend.create(spec, sandbox_id=owner.new_id("tq"), owner=owner.current_owner())
        try:
            await backend.start(ref)
            out = []
            for argv in (["sh", "-c", "touch /etc/x 2>&1; echo rc=$?"],
                         ["sh", "-c", "echo a > /tmp/a && echo b > /workspace/b && cat /tmp/a /workspace/b"],
                         ["sh", "-c", "stat -c '%U %a' /workspace; df -k /tmp /workspace | tail -2 | tr -s ' ' | "
                                      "cut -d' ' -f2"],
                         ["sh", "-c", "head -c 9000000 /dev/zero > /workspace/big 2>/dev/null; echo rc=$?"],
                         ["sh", "-c", "grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1"]):
                out.append((await backend.exec(ref, ExecRequest(argv))).stdout.decode())
            return out
        finally:
            await backend.remove(ref)

    ro, rw, sizes, big, opts = asyncio.run(go())
    assert "Read-only file system" in ro and "rc=1" in ro, ro
    assert rw == "a\nb\n"
    owner_mode, tmp_kb, work_kb = sizes.split("\n")[:3]
    assert owner_mode.split()[1] == "755" and owner_mode.split()[0] != "root", sizes
    assert tmp_kb == work_kb == str(8 * 1024), sizes
    assert big.strip() == "rc=1"  # the cap holds
    assert opts.strip() == "ro"


def test_one_shot_runs_restore_a_snapshot_and_share_nothing(tmp_path):
    """Two CLI runs: each a fresh clone of the snapshot (a file written in one is absent in the next),
    re-seeded (different random bytes), and nothing of either left behind."""
    cmd = ["run", "-B", "qemu", "--", "sh", "-c",
           "ls /workspace/marker 2>/dev/null; echo x > /workspace/marker; head -c 16 /dev/urandom | od -An -tx1; "
           "date +%s"]
    outs = []
    for _ in range(3):
        r = ak(*cmd, timeout=180)
        assert r.returncode == 0, r.stderr.decode()
        rnd, clock = r.stdout.decode().rsplit("\n", 2)[:2]
        assert abs(int(clock) - time.time()) < 30  # the clone's clock was set, not the snapshot's
        outs.append(rnd)
    assert not any("marker" in o for o in outs)
    assert len(set(outs)) == 3  # the RNG was re-seeded (and the crng reseeded) per clone
    r = ak("run", "-B", "qemu", "--", "sh", "-c", "exit 7", timeout=180)
    assert r.returncode == 7
    r = ak("run", "-B", "qemu", "-t", "1", "--", "sleep", "30", timeout=180)
    assert r.returncode == 124
    assert [d for d in _ours() if d.startswith("run-")] == []


def test_run_reports_vm_phases(backend):
    r = asyncio.run(backend.run(SPEC, ExecRequest(["echo", "hello"]), sandbox_id=owner.new_id("tq"),
                                owner=owner.current_owner()))
    assert r.stdout == b"hello\n"
    for k in ("vm_process_ms", "vm_boot_ms", "vm_ready_ms", "exec_ms", "vm_shutdown_ms"):
        assert k in r.timings, r.timings
    assert r.timings["vm_restored"] == 1.0


def test_warm_pool_members_are_snapshot_clones(backend):
    from agentkernel.pool import PoolConfig, WarmPool

    async def go():
        pool = WarmPool(SPEC, backend, PoolConfig(min_size=1, max_size=2), asyncio.Semaphore(2),
                        owner.current_owner())
        pool.refill()
        seen = []
        try:
            for _ in range(2):
                m, _hit = await pool.acquire()
                r = await backend.exec(m.ref, ExecRequest(["sh", "-c", "ls /tmp/mine 2>/dev/null; touch /tmp/mine"]))
                seen.append(r.stdout)
                pool.release(m)
        finally:
            await pool.close()
        return seen

    assert asyncio.run(go()) == [b"", b""]


def _run_state(ref) -> str:
    from agentkernel.vm.qmp import QMP

    async def go():
        qmp = await QMP.connect(os.path.join(ref.handle["dir"], "qmp.sock"))
        try:
            return (await qmp.cmd("query-status"))["status"]
        finally:
            await qmp.close()

    return asyncio.run(go())


def _wait_paused(ref, within: float = 30.0) -> None:
    import json

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with open(os.path.join(ref.handle["dir"], "meta.json")) as f:
            if json.load(f).get("paused") and _run_state(ref) == "paused":
                return
        time.sleep(0.1)
    raise AssertionError("the idle pool member was not paused")


def test_pool_members_pause_when_idle_and_run_once_leased(monkeypatch):
    """The daemon's pool members (a backend with ``background``): restored, warmed, at normal priority once
    warm; one not taken within PAUSE_IDLE_S is paused (no CPU while it waits); the hand-out check continues
    it and sets its clock (it stood still while paused); a member reached without the check (a waiter's)
    continues on its first command; a member taken in time is never paused under its user; a sandbox that
    is no pool member (the daemon's gated one-shots) is none of this. Each member is a fresh clone: what one
    run wrote is absent in the next; removal leaves nothing behind."""
    from agentkernel.backends import qemu
    from agentkernel.pool import PoolConfig, WarmPool

    monkeypatch.setattr(qemu, "PAUSE_IDLE_S", 0.5)
    bg = get_backend("qemu")
    bg.background = True
    mine = "ls /tmp/mine 2>/dev/null; touch /tmp/mine; date +%s"

    async def idle_member():
        ref = await bg.create_started(SPEC, sandbox_id=owner.new_id("pool"), owner=owner.current_owner())
        await asyncio.to_thread(_wait_paused, ref)  # the loop runs: the idle timer fires
        return ref

    # a member reached without the hand-out check: its first command continues it
    ref = asyncio.run(idle_member())
    try:
        pid = vm_pid(ref.handle["dir"])
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")} == {0}
        if os.path.exists(f"/proc/{pid}/autogroup"):  # its session's weight is back to normal as well
            with open(f"/proc/{pid}/autogroup") as f:
                assert f.read().split()[-1] == "0"
        time.sleep(3)  # the paused guest's clock stands still ...
        r = asyncio.run(bg.exec(ref, ExecRequest(["sh", "-c", mine])))
        assert r.exit_code == 0, r
        assert abs(int(r.stdout.split()[-1]) - time.time()) < 2  # ... and is set when it continues
        assert _run_state(ref) == "running"
    finally:
        asyncio.run(bg.remove(ref))
    assert vm_pid(ref.handle["dir"]) is None and not os.path.exists(ref.handle["dir"])

    async def taken_in_time():  # checked out before the idle pause: it stays running while used
        ref = await bg.create_started(SPEC, sandbox_id=owner.new_id("pool"), owner=owner.current_owner())
        try:
            assert await bg.healthy(ref)
            await asyncio.sleep(1.5)
            return await asyncio.to_thread(_run_state, ref)
        finally:
            await bg.remove(ref)

    assert asyncio.run(taken_in_time()) == "running"

    async def not_a_member():  # a request's sandbox on the daemon's backend: started as asked, no idle pause
        ref = await bg.create_started(SPEC, sandbox_id=owner.new_id("run"), owner=owner.current_owner())
        try:
            await asyncio.sleep(1.5)
            return ref.handle["timings"], await asyncio.to_thread(_run_state, ref)
        finally:
            await bg.remove(ref)

    timings, state = asyncio.run(not_a_member())
    assert state == "running" and "warm_ms" not in timings

    async def leases():
        pool = WarmPool(SPEC, bg, PoolConfig(min_size=1, max_size=2), asyncio.Semaphore(2), owner.current_owner())
        pool.refill()
        out = []
        try:
            for _ in range(2):
                while not pool.ready:
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(_wait_paused, pool.ready[0].ref)
                m, hit = await pool.acquire()
                assert hit
                out.append((await asyncio.to_thread(_run_state, m.ref),
                            await bg.exec(m.ref, ExecRequest(["sh", "-c", mine]))))
                pool.release(m)
        finally:
            await pool.close()
        return out

    for state, r in asyncio.run(leases()):
        assert state == "running"  # the hand-out check continued it
        assert r.exit_code == 0 and r.stdout.count(b"\n") == 1, r  # no /tmp/mine from the other run
        assert abs(int(r.stdout) - time.time()) < 5


def test_sigkill_of_the_owner_is_reaped_by_the_next_command(tmp_path):
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", "qemu", "--", "sleep", "120"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def started() -> list[str]:
            return [d for d in _ours() if d.startswith("run-") and vm_pid(os.path.join(sandboxes_dir(), d))]

        deadline = time.monotonic() + 120
        while not started() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started(), "the VM never started"
        time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    left = [d for d in _ours() if d.startswith("run-")]
    assert left  # the VM outlived its owner ...
    r = ak("run", "-B", "qemu", "--", "true", timeout=180)  # ... until the next command reaps it
    assert r.returncode == 0, r.stderr.decode()
    assert not any(os.path.exists(os.path.join(sandboxes_dir(), d)) for d in left)
    assert not any(vm_pid(os.path.join(sandboxes_dir(), d)) for d in left)


def _early_vm(key: str) -> tuple[str, int] | None:
    """``prelaunch.begin(key)``: the sandbox id and QEMU pid of the VM it started, or None (no record)."""
    from agentkernel.vm import prelaunch

    prelaunch.begin(key)
    sid = prelaunch.pending_id("qemu")
    if sid is None:
        return None
    pidfile = os.path.join(sandboxes_dir(), sid, "qemu.pid")
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = vm_pid(os.path.join(sandboxes_dir(), sid))
    return sid, pid and (pid, owner.process_start_time(pid))


def _gone(pid_start: tuple[int, int] | None, within: float = 5.0) -> bool:
    """Whether the process (pid, start time) has exited (a SIGKILLed QEMU takes a moment to free its RAM)."""
    deadline = time.monotonic() + within
    while pid_start is not None and owner.process_start_time(pid_start[0]) == pid_start[1]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _oneshot_watching(backend, sid: str, argv: list[str], spec=SPEC) -> tuple[bytes, set]:
    """``run_oneshot`` of ``argv`` as the CLI runs it, under ``sid``; returns its output and every QEMU pid
    seen in the run dir while it ran."""
    import threading

    from agentkernel.termio import Stdio

    run_dir = os.path.join(sandboxes_dir(), sid)
    seen, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            pid = vm_pid(run_dir)
            if pid:
                seen.add(pid)
            time.sleep(0.02)

    r, w = os.pipe()
    t = threading.Thread(target=watch)
    t.start()
    try:
        out = backend.run_oneshot(spec, argv, Stdio(stdin=0, stdout=w, stderr=2, forward_stdin=False), 60,
                                  sandbox_id=sid, owner=owner.current_owner())
    finally:
        done.set()
        t.join()
        os.close(w)
        owner.release("qemu", sid, (owner.current_owner(),))  # what the one-shot runner does around it
        deathwatch.disarm("qemu", sid)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert out.exit_code == 0, out
    return data, seen


def test_cli_one_shot_takes_the_early_vm_only_when_it_is_the_same(backend):
    """``vm.prelaunch``: a run whose key an earlier run recorded starts that launch before the spec is
    resolved; the backend runs the command in it only if it is exactly the VM it would start (here: the
    same pid ran the command), and otherwise kills it first and starts the right one (a record that
    differs in memory size: the command sees the spec's memory); nothing is left either way."""
    from agentkernel import resolvedspec
    from agentkernel.vm import prelaunch

    key = f"test-{os.urandom(8).hex()}"
    argv = ["sh", "-c", "sleep 0.5; grep MemTotal /proc/meminfo"]
    assert _early_vm(key) is None  # nothing recorded yet: the ordinary path, which records its launch
    _, first = _oneshot_watching(backend, owner.new_id("run"), argv)
    sid, (early_pid, _) = _early_vm(key)
    assert early_pid not in first
    out, seen = _oneshot_watching(backend, sid, argv)
    assert seen == {early_pid}, (seen, early_pid)  # the command ran in the early VM
    assert prelaunch.pending_id("qemu") is None
    mem_kb = int(out.split()[1])
    # a record that no longer matches (another memory size): the early VM never runs anything
    rkey = prelaunch._record_key(key)
    rec = resolvedspec.load(rkey)
    i = rec["argv"].index("-m")
    mem = rec["argv"][i + 1]
    rec["argv"] = [a.replace(f",size={mem},", ",size=200M,") for a in rec["argv"]]
    rec["argv"][i + 1] = "200M"
    assert resolvedspec.store(rkey, [], rec)
    sid, wrong = _early_vm(key)
    out, seen = _oneshot_watching(backend, sid, argv)
    assert wrong is None or len(seen - {wrong[0]}) == 1, (seen, wrong)  # killed before the command ran, in another
    assert _gone(wrong)
    assert int(out.split()[1]) == mem_kb  # the spec's memory, not the stale record's
    assert resolvedspec.load(rkey)["argv"][i + 1] == mem  # the launch that ran was recorded again
    # a run that never reaches the backend: the early VM is removed and its claim released
    good = resolvedspec.load(rkey)
    sid, pid = _early_vm(key)
    prelaunch.discard()
    assert not os.path.exists(os.path.join(sandboxes_dir(), sid))
    assert _gone(pid)
    assert _early_vm(key) is None  # that key's record is gone: the next run starts nothing early
    # removed at once, before QEMU has written its pidfile: killed all the same (the pid its shell printed)
    assert resolvedspec.store(rkey, [], good)
    prelaunch.begin(key)
    sid = prelaunch.pending_id("qemu")
    prelaunch.discard()
    assert not [p for p in _qemu_pids() if vm_pid(os.path.join(sandboxes_dir(), sid), p)]
    assert not any(e["id"] == sid for e in owner.entries())
    prelaunch._KEY = None


def test_sigkill_of_a_cli_whose_vm_started_early_is_reaped(tmp_path):
    """The early VM is claimed and watched before it exists: a SIGKILLed CLI leaves nothing running."""
    r = ak("run", "-B", "qemu", "--", "sh", "-c", "true", timeout=180)  # records the launch for this key
    assert r.returncode == 0, r.stderr.decode()
    before = set(_ours())
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-B", "qemu", "--", "sh", "-c", "sleep 120"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (set(_ours()) - before) and time.monotonic() < deadline:
            time.sleep(0.005)
        new = set(_ours()) - before
        assert new, "the VM never started"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 60  # the death watch removes it at once
    while any(os.path.exists(os.path.join(sandboxes_dir(), d)) for d in new) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(os.path.join(sandboxes_dir(), d)) for d in new)
    assert not [e for e in owner.entries() if e["id"] in new]


@pytest.mark.timeout(900)  # a server start-up (orphan scan of every engine), four VMs, two snapshots
def test_api_snapshots_hold_the_running_memory(tmp_path):
    """The API's snapshot routes on qemu: take = RAM + device state + disk of the running VM (which goes on
    running), restore = a new VM from it with the processes still running. A background counter started
    before the snapshot is alive in the restored sandbox and keeps counting there, while the original goes
    on counting on its own; each has its own disk."""
    import httpx

    from agentkernel.backends.qemu import _data_dir
    from tests.api.api_helpers import start_server

    srv = start_server(str(tmp_path), tokens={"t": "qemu-snap-token-0123456789ab"}, pool_min=0, pool_max=1,
                       extra_env={"AGENTKERNEL_BACKEND": "qemu"}, ready_timeout=300)
    h = {"Authorization": "Bearer qemu-snap-token-0123456789ab"}

    def call(method, path, **kw):
        r = httpx.request(method, srv.url + path, headers=h, timeout=180, **kw)
        assert r.status_code < 300, (r.status_code, r.text, srv.log())
        return r.json()["data"]

    def sh(name, script):
        return call("POST", f"/sandboxes/{name}/exec", json={"command": ["sh", "-c", script]})

    def count(name):
        return int(sh(name, "cat /workspace/counter")["stdout"].strip())

    def counts_on(name, first):  # a loaded 2-core host can stall a TCG guest for a second: allow 15 s
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if count(name) > first:
                return True
        return False

    try:
        call("POST", "/sandboxes", json={"name": "snapsrc", "backend": "qemu"})
        # the counter is replaced atomically (rename), so a reader never sees it truncated
        sh("snapsrc", "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/c.tmp; "
           "mv /workspace/c.tmp /workspace/counter; sleep 0.1; done' "
           ">/dev/null 2>&1 </dev/null & echo $! > /workspace/counter.pid; echo before > /workspace/mark")
        deadline = time.monotonic() + 60
        while count("snapsrc") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        before_snapshot = count("snapsrc")
        snap = call("POST", "/snapshots", json={"sandbox": "snapsrc", "name": "live"})
        assert snap["kind"] == "memory" and snap["backend"] == "qemu" and snap["state_bytes"] > 0, snap
        assert {s["name"] for s in call("GET", "/snapshots")} == {"live"}
        sh("snapsrc", "echo after > /workspace/mark")  # the original goes on, apart from the snapshot
        restored = call("POST", "/snapshots/live/restore", json={"as_name": "snapcopy"})
        assert restored["name"] == "snapcopy"
        # the counter process is there, the same pid, and still counting in the new VM
        pid = sh("snapcopy", "cat /workspace/counter.pid")["stdout"].strip()
        assert sh("snapcopy", f"kill -0 {pid} && echo alive")["stdout"] == "alive\n"
        first = count("snapcopy")
        assert first >= before_snapshot
        assert counts_on("snapcopy", first)
        assert sh("snapcopy", "cat /workspace/mark")["stdout"] == "before\n"  # the disk as it was
        assert sh("snapsrc", "cat /workspace/mark")["stdout"] == "after\n"
        assert count("snapsrc") > before_snapshot  # the original kept running
        # a snapshot of the copy outlives the snapshot the copy came from (its disk is rebased)
        sh("snapcopy", "echo second > /workspace/mark2")
        call("POST", "/snapshots", json={"sandbox": "snapcopy", "name": "live2"})
        # the copy outlives the snapshot it came from: deleted, the copy still stops and boots again
        # from its own disk (its link of the snapshot's frozen disk), with what it wrote still there
        call("DELETE", "/snapshots/live")
        snap_dirs = os.listdir(_data_dir("snapshots"))
        assert len(snap_dirs) == 1, snap_dirs  # only live2's: live's is gone
        call("POST", "/sandboxes/snapcopy/stop")
        call("POST", "/sandboxes/snapcopy/start")
        assert sh("snapcopy", "cat /workspace/mark /workspace/mark2")["stdout"] == "before\nsecond\n"
        call("DELETE", "/sandboxes/snapcopy")
        call("POST", "/snapshots/live2/restore", json={"as_name": "snapcopy2"})
        assert sh("snapcopy2", "cat /workspace/mark /workspace/mark2")["stdout"] == "before\nsecond\n"
        assert counts_on("snapcopy2", count("snapcopy2"))
        call("DELETE", "/sandboxes/snapcopy2")
        call("DELETE", "/snapshots/live2")
        assert call("GET", "/snapshots") == []
        assert os.listdir(_data_dir("snapshots")) == []
    finally:
        for name in ("snapsrc", "snapcopy", "snapcopy2"):
            httpx.delete(f"{srv.url}/sandboxes/{name}", headers=h, timeout=120)
        for snap in ("live", "live2"):
            httpx.delete(f"{srv.url}/snapshots/{snap}", headers=h, timeout=60)
        srv.stop()
