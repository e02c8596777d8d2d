"""How the ``oci`` backend starts and removes a runtime container, against the real runtimes (crun, runc):

- ``ak-agent spawn-runtime`` (``oci.runtime.launch``): the private mount namespace with the overlay root
  (and a one-shot's tmpfs layer), PDEATHSIG, closed fds, the clear errors with exit 125, crun from a
  read-only bind of itself; the Python ``Preexec`` fallback (no agent) keeps the same behaviour;
- teardown without ``<runtime> delete``: nothing of a container is left, whether its init still ran at
  removal or had died on its own; ``clear_cgroups`` (one read of the cgroups) and its fallback;
- ``ak-agent watch-owner``, the one-shot's death watcher.

Nothing is mocked; a test that needs the agent is skipped without it (a failure in CI)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from agentkernel import owner, paths
from agentkernel.backends.base import ExecRequest
from agentkernel.backends.oci import OCIBackend
from agentkernel.oci import bundle
from agentkernel.oci import runtime as rt
from agentkernel.spec import SandboxSpec
from tests.backends.test_oci import (  # noqa: F401  (autouse fixtures: host and image ready, no bundle left)
    IMAGE,
    PREFIX,
    REPO,
    _sid,
    assert_no_leftovers,
    image_ready,
    nothing_left_behind,
)
from tests.conftest import need, skip_unavailable

pytestmark = [pytest.mark.engine("oci"), pytest.mark.timeout(120)]

RUNTIMES = [r for r in ("crun", "runc") if rt.binary(r)]  # runsc: its own kill + delete, unchanged


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    return request.param


def _helper() -> str:
    agent = rt.spawn_helper()
    need(agent is not None, "the agent with spawn-runtime is built (make -C agent)")
    return agent


def _spec(runtime: str, **kw) -> SandboxSpec:
    return SandboxSpec(backend="oci", image=IMAGE, options={"runtime": runtime}, **kw)


def _host_mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


# ---- ak-agent spawn-runtime ------------------------------------------------------------------------------


def test_private_namespace_overlay_layer_and_read_only_runtime(tmp_path):
    """Everything spawn-runtime mounts exists only in the runtime's namespace: the tmpfs layer, the dirs
    made in it (mode and owner), the overlay root, the read-only bind of the runtime binary."""
    agent = _helper()
    lower, layer, root = tmp_path / "lower", tmp_path / "layer", tmp_path / "root"
    for d in (lower, layer, root):
        d.mkdir()
    (lower / "from-lower").write_text("x\n")
    prog = tmp_path / "fake-runtime"  # a copy: the read-only bind must never be tried on a real binary
    shutil.copy("/bin/sh", prog)
    upper, work = layer / "u", layer / "w"
    script = (
        'grep -E " (tmpfs|overlay) " /proc/self/mountinfo | cut -d" " -f5,9; '
        f'stat -c "%a %u %g" {root}/a/b; cat {root}/from-lower; echo "env=$_LIBCONTAINER_CLONED_BINARY"; '
        f'if ( : >> {prog} ) 2>/dev/null; then echo runtime-writable; else echo runtime-read-only; fi'
    )
    r = subprocess.run(
        [agent, "spawn-runtime", "--overlay", str(root), f"lowerdir={lower},upperdir={upper},workdir={work}",
         "--tmpfs", str(layer), "size=1m,mode=0755", "--mkdir", str(upper), "755", "0", "0",
         "--mkdir", str(work), "755", "0", "0", "--mkdir", f"{upper}/a/b", "700", "1000", "1000", "--ro-runtime",
         "--", str(prog), "-c", script],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert f"{layer} tmpfs" in out and f"{root} overlay" in out, out
    assert out[-4:] == ["700 1000 1000", "x", "env=1", "runtime-read-only"], out[-6:]
    assert str(tmp_path) not in _host_mounts()
    assert not (layer / "u").exists()  # the layer lived (and went) with the namespace


def test_failures_are_clear_and_exit_125(tmp_path):
    agent = _helper()
    target = tmp_path / "root"
    target.mkdir()
    r = subprocess.run([agent, "spawn-runtime", "--overlay", str(target),
                        f"lowerdir=/nonexistent-{PREFIX},upperdir={tmp_path}/u,workdir={tmp_path}/w",
                        "--", "/bin/true"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 125
    assert r.stderr.startswith("agentkernel: oci: mounting the overlay root: "), r.stderr
    assert str(tmp_path) not in _host_mounts()
    r = subprocess.run([agent, "spawn-runtime", "--pdeathsig", "1", "--", "/bin/true"], capture_output=True,
                       text=True, timeout=30)  # pid 1 is not its parent: the parent is gone
    assert (r.returncode, r.stderr) == (125, "agentkernel: oci: the parent process is gone\n")
    r = subprocess.run([agent, "spawn-runtime", "--", f"/nonexistent-{PREFIX}"], capture_output=True, text=True)
    assert r.returncode == 127 and "agentkernel: oci: cannot run /nonexistent-" in r.stderr, r.stderr
    r = subprocess.run([agent, "spawn-runtime", "--tmpfs", str(target), "size=1m", "--", "/bin/true"],
                       capture_output=True, text=True)  # a layer without the private namespace: refused
    assert r.returncode == 125 and "usage: ak-agent spawn-runtime" in r.stderr


def test_one_shot_with_a_failing_overlay_reports_the_reason(runtime, monkeypatch, capfd):
    """Helper and Preexec fallback alike: the runtime never runs, the message names the failed step, the
    sandbox is removed."""
    from agentkernel.backends.base import Stdio
    from agentkernel.errors import SandboxError

    _helper()
    real = rt.overlay_options

    def broken(overlay):
        target, _ = real(overlay)
        return target, f"lowerdir=/nonexistent-{PREFIX},upperdir={overlay[1]},workdir={overlay[2]}"

    monkeypatch.setattr(rt, "overlay_options", broken)
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(rt, "spawn_helper", lambda: None)
        sid = _sid("bad")
        with pytest.raises(SandboxError, match=r"could not start the sandbox \(exit 125"):
            OCIBackend({"runtime": runtime}).run_oneshot(_spec(runtime), ["true"], Stdio(forward_stdin=False), None,
                                                         sandbox_id=sid, owner=owner.current_owner())
        assert "agentkernel: oci: mounting the overlay root: No such file or directory" in capfd.readouterr().err
        assert_no_leftovers(sid)


_PDEATH_CHILD = r"""
import os, sys, time
from agentkernel.oci import runtime as rt
spawn = sys.argv[1] == "helper"
if not spawn:
    rt.spawn_helper = lambda: None
r, w = os.pipe()
os.dup2(r, 50, inheritable=True)  # an fd the runtime must not get
cmd = ["/bin/sh", "-c", "ls /proc/$$/fd; echo END; exec sleep 300"]
argv, pre = rt.launch(cmd, None, pdeathsig=True, close_fds=spawn)
assert (pre is None) == spawn
p = rt.Proc(argv, stdin=-1, stdout=None, stderr=None, preexec=pre, spawn=spawn)
print(p.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["helper", "preexec"])
def test_runtime_dies_with_its_parent_and_gets_no_inherited_fds(how):
    if how == "helper":
        _helper()
    child = subprocess.Popen([sys.executable, "-c", _PDEATH_CHILD, how], stdout=subprocess.PIPE, cwd=REPO,
                             text=True)
    try:
        pid = int(child.stdout.readline())
        fds = []
        for line in child.stdout:  # the shell lists its fds, then becomes sleep
            if line.strip() == "END":
                break
            fds.append(line.strip())
        assert "50" not in fds and {"0", "1", "2"} <= set(fds), fds
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"sleep"):
                    break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.kill()
        child.wait()
        assert _wait_gone(pid), "the runtime outlived its parent"
    finally:
        child.kill()
        child.wait()


# ---- one-shot: nothing of the sandbox's root or layer on the host --------------------------------------


def test_one_shot_root_and_layer_never_on_the_host(runtime, tmp_path):
    _helper()
    before = set(os.listdir(rt.bundles_dir())) if os.path.isdir(rt.bundles_dir()) else set()
    script = ('grep " / / " /proc/self/mountinfo; pwd; stat -c "%U %a" .; df -m / | tail -1; '
              "echo ok > f && cat f; sleep 3")
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "--backend", "oci", "--no-daemon",
                          "-o", f"runtime={runtime}", "--disk", "64", "-w", "/deep/work/dir", "--",
                          "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        sid = None
        while time.monotonic() < deadline and sid is None:
            new = [n for n in os.listdir(rt.bundles_dir()) if n not in before] if os.path.isdir(
                rt.bundles_dir()) else []
            if new and os.path.exists(os.path.join(rt.bundle_dir(new[0]), "init.pid")):
                sid = new[0]
            time.sleep(0.02)
        assert sid, "the sandbox never started"
        assert rt.bundle_dir(sid) not in _host_mounts()  # neither the layer tmpfs nor the overlay root
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err
    lines = out.decode().splitlines()
    assert " - overlay overlay " in lines[0] and f"upperdir={rt.bundle_dir(sid)}/layer/upper" in lines[0], lines
    assert lines[1:3] == ["/deep/work/dir", "sandbox 755"], lines  # made in the private layer, owned by the user
    assert lines[3].split()[1] == "64" and lines[4] == "ok", lines  # the layer's cap
    assert_no_leftovers(sid)


# ---- named sandboxes: started by the helper, removed without `<runtime> delete` ---------------------------


def _named(runtime: str, go, monkeypatch):
    """``go(backend, ref, sid)`` on a started named sandbox, then its removal, during which the runtime
    must not be exec'd (crun/runc: removed without ``<runtime> delete``); then nothing may be left."""
    if paths.agent_binary() is None:
        skip_unavailable("oci", "the agent is not built (make -C agent)")

    def refuse(*a, **k):
        raise AssertionError(f"the runtime was exec'd: {a}")

    async def main():
        b = OCIBackend({"runtime": runtime})
        sid = _sid("named")
        ref = await b.create(_spec(runtime), sandbox_id=sid, owner=owner.current_owner())
        try:
            await b.start(ref)
            await go(b, ref, sid)
            monkeypatch.setattr(rt, "run_cmd", refuse)
        finally:
            await b.remove(ref)
            monkeypatch.undo()
        assert_no_leftovers(sid)

    asyncio.run(main())


def test_named_root_private_and_removed_while_running(runtime, monkeypatch):
    async def go(b, ref, sid):
        r = await b.exec(ref, ExecRequest(["sh", "-c", "grep ' / / ' /proc/self/mountinfo; sleep 300 &"]))
        assert " - overlay overlay " in r.stdout.decode(), r.stdout
        mounts = _host_mounts()
        assert f"{rt.bundle_dir(sid)}/rootfs " not in mounts  # the root only in the container's namespace
        assert len(rt.cgroup_pids(sid)) >= 2  # init and the background sleep, still running at removal

    _named(runtime, go, monkeypatch)


def test_named_removed_after_its_init_died_on_its_own(runtime, monkeypatch):
    async def go(b, ref, sid):
        for pid in rt.cgroup_pids(sid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (await b.status(ref)) != "stopped":
            assert time.monotonic() < deadline, "the runtime never saw its init die"
            await asyncio.sleep(0.05)
        assert rt.state_entries(runtime, sid)  # the runtime's state is still there: removal must clear it

    _named(runtime, go, monkeypatch)


def test_stop_then_start_without_runtime_delete(runtime, monkeypatch):
    async def go(b, ref, sid):
        await b.exec(ref, ExecRequest(["sh", "-c", "echo kept > /workspace/m"]))
        await b.stop(ref)
        assert await b.status(ref) == "stopped" and not rt.cgroup_pids(sid)
        assert not rt.state_entries(runtime, sid)
        await b.start(ref)
        r = await b.exec(ref, ExecRequest(["cat", "/workspace/m"]))
        assert r.stdout == b"kept\n"

    _named(runtime, go, monkeypatch)


# ---- clear_cgroups ------------------------------------------------------------------------------------


def _cgroup_with_processes(sid: str, n: int) -> list[subprocess.Popen]:
    """The sandbox's cgroup dirs (with ``ctr`` and a nested one) holding ``n`` sleeps, as a runtime would."""
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(n)]
    rel = bundle.cgroup_rel(sid)
    for mnt, _, _ in rt.hierarchies():
        leaf = os.path.join(mnt, rel, "ctr", "nested")
        try:
            os.makedirs(leaf)
        except OSError:
            continue  # a hierarchy we may not write (e.g. a foreign cgroup2 mount)
        for i, p in enumerate(procs):
            where = leaf if i % 2 else os.path.dirname(leaf)
            try:
                with open(os.path.join(where, "cgroup.procs"), "w") as f:
                    f.write(str(p.pid))
            except OSError:
                pass  # v2 without the controllers / no-internal-process rule: the other hierarchies hold it
    return procs


def test_clear_cgroups_kills_every_process_and_removes_every_dir():
    sid = _sid("cg")
    procs = _cgroup_with_processes(sid, 3)
    try:
        assert rt.cgroup_pids(sid) == {p.pid for p in procs}
        assert rt.clear_cgroups(sid) == []
        assert [p.wait(10) for p in procs] == [-signal.SIGKILL] * 3
        assert not [d for d in rt.cgroup_dirs(sid) if os.path.exists(d)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        rt.destroy(sid)


def test_clear_cgroups_falls_back_when_a_cgroup_is_still_busy(monkeypatch):
    """A process the first read missed (here: the first read reports none) makes rmdir fail: the polling
    kill and the full removal run, and nothing is left."""
    sid = _sid("cgbusy")
    procs = _cgroup_with_processes(sid, 2)
    real, reads = rt._scan_cgroups, []

    def first_read_misses(s):
        pids, dirs = real(s)
        reads.append(pids)
        return (set() if len(reads) == 1 else pids), dirs

    try:
        monkeypatch.setattr(rt, "_scan_cgroups", first_read_misses)
        assert rt.clear_cgroups(sid) == []
        assert [p.wait(10) for p in procs] == [-signal.SIGKILL] * 2
        assert not [d for d in rt.cgroup_dirs(sid) if os.path.exists(d)] and len(reads) >= 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
        monkeypatch.undo()
        rt.destroy(sid)


def test_clear_cgroups_thaws_a_frozen_cgroup():
    """A runtime killed mid-way through its freeze-kill-thaw leaves the container frozen: SIGKILL alone
    never completes there; the removal thaws it and nothing is left."""
    sid = _sid("cgfrozen")
    procs = _cgroup_with_processes(sid, 2)
    try:
        frozen = [os.path.join(mnt, bundle.cgroup_rel(sid), "ctr") for mnt, kind, ctrls in rt.hierarchies()
                  if kind == "cgroup" and "freezer" in ctrls]
        if not frozen:
            pytest.skip("no cgroup v1 freezer hierarchy on this host")
        with open(os.path.join(frozen[0], "freezer.state"), "w") as f:
            f.write("FROZEN")
        assert rt.clear_cgroups(sid) == []
        assert [p.wait(10) for p in procs] == [-signal.SIGKILL] * 2
        assert not [d for d in rt.cgroup_dirs(sid) if os.path.exists(d)]
    finally:
        rt.clear_cgroups(sid)
        for p in procs:
            p.kill()
            p.wait()
        rt.destroy(sid)


# ---- ak-agent watch-owner (agentkernel.deathwatch) ----------------------------------------------------


def test_watch_owner_runs_the_reaper_only_when_the_owner_dies_silently(tmp_path):
    from agentkernel import deathwatch

    agent = paths.agent_with(deathwatch.WATCH_MARK)
    need(agent is not None, "the agent with watch-owner is built (make -C agent)")
    for owner_says_done in (True, False):
        r, w = os.pipe()
        os.dup2(r, 61, inheritable=True)  # the watched pipe
        os.close(r)
        os.dup2(w, 62, inheritable=True)  # an fd the reaper must not get
        watcher = subprocess.Popen([agent, "watch-owner", "--fd", "61", "--", "/bin/sh", "-c", "echo /proc/$$/fd/*"],
                                   stdout=subprocess.PIPE, close_fds=False)
        os.close(61)
        os.close(62)
        if owner_says_done:
            os.write(w, b"x")
        os.close(w)  # the owner's end closed: EOF for a watcher that got no byte
        out = watcher.communicate(timeout=10)[0].decode()
        assert watcher.returncode == 0
        if owner_says_done:
            assert out == ""  # the reaper never ran
        else:
            fds = {p.rsplit("/", 1)[1] for p in out.split()}
            assert {"0", "1", "2"} <= fds and not fds & {"61", "62"}, fds


def test_named_without_the_helper_uses_the_python_fallback(runtime, monkeypatch):
    """An agent build without spawn-runtime (older, or AGENTKERNEL_AGENT_BIN pointing at one): the runtime
    is started by fork + Preexec, with the same private overlay root."""
    monkeypatch.setattr(rt, "spawn_helper", lambda: None)

    async def go(b, ref, sid):
        r = await b.exec(ref, ExecRequest(["sh", "-c", "grep ' / / ' /proc/self/mountinfo"]))
        assert " - overlay overlay " in r.stdout.decode(), r.stdout
        assert f"{rt.bundle_dir(sid)}/rootfs " not in _host_mounts()

    _named(runtime, go, monkeypatch)
