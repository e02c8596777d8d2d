"""In-process ``Sandbox.run`` without a pool takes the CLI's one-shot path (``oneshot.run_outcome`` on a worker
thread, output through pipes read on the event loop) on every backend that has one: one engine call instead
of create/start/exec/remove. Against the real engines; nothing is mocked (the path test counts calls into the
real backend methods, which still run)."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import threading
import time

import pytest

from agentkernel import audit, oneshot, owner
from agentkernel.backends import get_backend
from agentkernel.manager import SandboxManager
from agentkernel.sandbox import Sandbox
from tests.conftest import require_backend

pytestmark = pytest.mark.timeout(240)

# (backend, its options): every container backend with a one-shot, oci under both of its runtimes
VARIANTS = [("oci", None), ("oci", {"runtime": "runsc"}), ("podman", None), ("docker", None), ("gvisor", None),
            ("gvisor-docker", None)]
IDS = ["oci", "oci-runsc", "podman", "docker", "gvisor", "gvisor-docker"]
BACKENDS = ["oci", "podman"]  # the cheaper ones, for the stream/limit behaviour
# what the step-by-step (phased) path calls: the one-shot path calls none of these
STEPWISE = ("run", "run_timed", "create", "create_started", "start", "exec", "remove")


def _flags(backend: str, options: dict | None) -> dict:
    return {"backend": backend, **({"options": options} if options else {})}


def _require(backend: str, options: dict | None) -> None:
    require_backend(backend)
    if options and options.get("runtime") == "runsc":
        from agentkernel.oci import runtime as rt

        if rt.binary("runsc") is None:
            pytest.skip("runsc is not installed")


async def _managed_ids(backend: str, options: dict | None = None) -> set[str]:
    """The engine's managed sandboxes owned by this process (other test sessions share the engines)."""
    b = get_backend(backend, options)
    try:
        return {i.id for i in await b.list() if i.labels.get("agentkernel.owner.pid") == str(os.getpid())}
    finally:
        await b.aclose()


def _my_claims(backend: str) -> list[dict]:
    me = str(os.getpid())
    return [e for e in owner.entries() if e.get("backend") == backend and str((e.get("owner") or {}).get("pid")) == me]


def _oneshot_threads(wait: float = 2.0) -> list[threading.Thread]:
    """Worker threads still running after ``wait`` s (a worker that handed its result over may still be
    returning from its function for a moment)."""
    deadline = time.monotonic() + wait
    for t in [t for t in threading.enumerate() if t.name == "agentkernel-oneshot"]:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threading.enumerate() if t.name == "agentkernel-oneshot"]


@pytest.fixture
def calls(monkeypatch):
    """Counts calls into the real backend methods (they still run) of one backend class."""
    counted: dict[str, int] = {}

    def watch(cls: type) -> dict[str, int]:
        for name in (*STEPWISE, "run_oneshot"):
            orig = getattr(cls, name)
            counted[name] = 0
            if asyncio.iscoroutinefunction(orig):
                async def spy(self, *a, _orig=orig, _name=name, **kw):
                    counted[_name] += 1
                    return await _orig(self, *a, **kw)
            else:
                def spy(self, *a, _orig=orig, _name=name, **kw):
                    counted[_name] += 1
                    return _orig(self, *a, **kw)
            monkeypatch.setattr(cls, name, functools.wraps(orig)(spy))
        return counted

    return watch


@pytest.mark.parametrize(("backend", "options"), VARIANTS, ids=IDS)
def test_run_is_one_engine_run_with_no_separate_remove(backend, options, calls):
    """Sandbox.run and SandboxManager.run: exactly one ``run_oneshot`` (the CLI's function: ``oneshot.run_outcome``
    -> ``OneShot.run_oneshot``, which folds removal into the engine's run), none of the stepwise calls; the
    journal claim is released and the run is audited like the CLI's."""
    _require(backend, options)
    b = get_backend(backend, options)
    counted = calls(type(b))
    outcomes: list = []
    real = oneshot.run_outcome

    def watched(*a, **kw):
        outcomes.append(kw.get("cli"))
        return real(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(oneshot, "run_outcome", watched)

    async def go():
        before = await _managed_ids(backend, options)
        r = await Sandbox.run(["sh", "-c", "echo hi; exit 7"], **_flags(backend, options))
        assert (r.exit_code, r.stdout) == (7, b"hi\n")
        spec = await asyncio.to_thread(Sandbox._resolve, _flags(backend, options), None, ["echo", "x"])
        from agentkernel.backends.base import ExecRequest

        mgr = SandboxManager()
        try:
            r2 = await mgr.run(spec, ExecRequest(["echo", "x"]))
        finally:
            await mgr.aclose()
        assert (r2.exit_code, r2.stdout) == (0, b"x\n")
        assert await _managed_ids(backend, options) - before == set()

    try:
        asyncio.run(go())
    finally:
        mp.undo()
    assert counted["run_oneshot"] == 2, counted
    assert {k: counted[k] for k in STEPWISE} == dict.fromkeys(STEPWISE, 0), counted
    assert outcomes == [False, False]  # the CLI's runner, in its long-lived-caller mode
    assert _my_claims(b.name) == []
    runs = [e for e in audit.read() if e.get("event") == "run" and e.get("pid") == os.getpid()
            and e.get("backend") == b.name]
    assert [e["exit_code"] for e in runs[-2:]] == [7, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_applies_stdin_env_cwd_and_separates_streams(backend):
    require_backend(backend)

    async def go():
        before = await _managed_ids(backend)
        r = await Sandbox.run(["sh", "-c", "echo out; echo err >&2; cat; pwd; echo $FOO; exit 3"], backend=backend,
                              stdin=b"in\n", env={"FOO": "bar"}, cwd="/tmp")
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\nin\n/tmp\nbar\n", b"err\n")
        # the one-shot path: one engine call, so no create/start/exec phases of its own
        assert "create_ms" not in r.timings and r.timings["total_ms"] > 0
        assert await _managed_ids(backend) - before == set()

    asyncio.run(go())


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_streams_output_and_truncates_at_the_limit(backend):
    require_backend(backend)

    async def go():
        seen: list[tuple[int, bytes]] = []
        r = await Sandbox.run(["sh", "-c", "echo a; echo b >&2"], backend=backend,
                              on_output=lambda fd, data: seen.append((fd, data)))
        assert r.exit_code == 0 and r.stdout == b"" and r.stderr == b""
        assert b"".join(d for fd, d in seen if fd == 1) == b"a\n"
        assert b"".join(d for fd, d in seen if fd == 2) == b"b\n"
        r = await Sandbox.run(["sh", "-c", "head -c 300000 /dev/zero"], backend=backend)
        assert len(r.stdout) == 300000 and not r.truncated  # more than a pipe buffer: read while it runs
        spec = await asyncio.to_thread(Sandbox._resolve, {"backend": backend}, None, ["sh"])
        from agentkernel.backends.base import ExecRequest

        mgr = SandboxManager()
        try:
            r = await mgr.run(spec, ExecRequest(["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"],
                                                output_limit=1000))
        finally:
            await mgr.aclose()
        assert r.exit_code == 0 and r.truncated and len(r.stdout) <= 1000 and r.stdout.strip(b"\0") == b""

    asyncio.run(go())


@pytest.mark.parametrize(("backend", "options"), VARIANTS, ids=IDS)
def test_run_timeout_and_cancel_destroy_the_sandbox(backend, options):
    _require(backend, options)
    flags = _flags(backend, options)

    async def go():
        before = await _managed_ids(backend, options)
        r = await Sandbox.run(["sleep", "30"], timeout=1, **flags)
        assert r.exit_code == 124 and r.timed_out
        task = asyncio.ensure_future(Sandbox.run(["sleep", "60"], **flags))
        await asyncio.sleep(1.5)
        t = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t < 30
        assert await _managed_ids(backend, options) - before == set()

    asyncio.run(go())
    assert _my_claims(get_backend(backend, options).name) == []


@pytest.mark.parametrize(("backend", "options"), VARIANTS, ids=IDS)
def test_nothing_leaks_when_the_loop_closes_right_after_a_cancel(backend, options):
    """The caller's event loop ends right after cancelling the run (``asyncio.run`` of a ``wait_for`` that
    times out): the sandbox is gone by then, the claim released, no worker thread left behind."""
    _require(backend, options)
    before = asyncio.run(_managed_ids(backend, options))
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(Sandbox.run(["sleep", "60"], **_flags(backend, options)), 2.0))
    # no loop of ours runs any more: whatever was left would stay
    assert _oneshot_threads() == []
    assert _my_claims(get_backend(backend, options).name) == []
    assert asyncio.run(_managed_ids(backend, options)) - before == set()


def test_a_loop_closed_under_a_pending_run_leaks_no_sandbox():
    """A caller that closes its loop with the run still pending (never cancelled): the worker thread finishes
    the one-shot on its own, which destroys the sandbox and releases its claim."""
    require_backend("oci")
    before = asyncio.run(_managed_ids("oci"))
    gc.collect()  # earlier tests' garbage (an unreferenced socket) must not be collected between the counts
    fds = len(os.listdir("/proc/self/fd"))
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _ctx: None)  # "Task was destroyed but it is pending": the point here
    task = loop.create_task(Sandbox.run(["sleep", "2"], backend="oci"))
    loop.run_until_complete(asyncio.sleep(1.0))
    assert not task.done()
    loop.close()
    del task
    assert _oneshot_threads(30) == []
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds  # the run's pipes are closed too
    assert _my_claims("oci") == []
    assert asyncio.run(_managed_ids("oci")) - before == set()


async def _ids_of_pid(backend: str, pid: int) -> set[str]:
    b = get_backend(backend)
    try:
        return {i.id for i in await b.list() if i.labels.get("agentkernel.owner.pid") == str(pid)}
    finally:
        await b.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_embedding_process_is_reaped_from_the_journal(backend):
    """Owner-death reaping: a process SIGKILLed in the middle of ``Sandbox.run`` leaves its journal claim, and
    the next reap (any agentkernel command) removes the sandbox it was running."""
    import signal
    import subprocess
    import sys

    require_backend(backend)
    child = subprocess.Popen([sys.executable, "-c", "import asyncio; from agentkernel.sandbox import Sandbox; "
                              f"asyncio.run(Sandbox.run(['sleep', '120'], backend={backend!r}))"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not asyncio.run(_ids_of_pid(backend, child.pid)):
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child's sandbox never showed up"
            time.sleep(0.2)
        claims = [e for e in owner.entries() if str((e.get("owner") or {}).get("pid")) == str(child.pid)]
        assert len(claims) == 1 and claims[0]["backend"] == backend
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    owner.reap_dead()
    assert asyncio.run(_ids_of_pid(backend, child.pid)) == set()
    assert [e for e in owner.entries() if str((e.get("owner") or {}).get("pid")) == str(child.pid)] == []
