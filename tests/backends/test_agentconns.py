"""The shared agent connection of container sandboxes (backends/_agentconns.py) on the real engines.

Every running sandbox of a backend object has one connection to its agent that concurrent execs share
(one stream each). What must hold: outputs, exit codes, stdin and timeouts stay per command; execs that
could stall their neighbours get a connection of their own; a connection left stale by an agent that went
away (the sandbox stopped, restarted or removed behind our back) never fails an exec that a fresh one would
run, and a removed sandbox's connection is closed: the process's fds come back to their baseline.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import uuid

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.config import resolve_spec
from agentkernel.errors import InvalidState, NotFound, SandboxError
from agentkernel.manager import SandboxManager
from tests.conftest import ak, require_backend

pytestmark = [pytest.mark.timeout(240)]

IMAGE = "agentkernel/busybox"
RUN = f"acn{uuid.uuid4().hex[:6]}"
BACKENDS = [("podman", {}), ("docker", {}), ("gvisor", {}), ("oci", {}), ("oci", {"runtime": "runsc"})]


def _tag(b: tuple[str, dict]) -> str:
    return b[0] + "".join(f"-{v}" for v in b[1].values())


@pytest.fixture(scope="module", params=BACKENDS, ids=_tag)
def backend(request):
    name, opts = request.param
    require_backend(name)
    return name, opts


def _spec(backend, name: str):
    b, opts = backend
    return resolve_spec({"backend": b, "options": dict(opts), "image": IMAGE, "profile": "moderate", "name": name})


def _flags(backend) -> list[str]:
    b, opts = backend
    out = ["-B", b, "--image", IMAGE]
    for k, v in opts.items():
        out += ["-o", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def box(backend):
    name = f"{RUN}-{_tag(backend)}"
    r = ak("create", *_flags(backend), "--start", name)
    assert r.returncode == 0, r
    yield name
    ak("rm", name)


def _with(fn):
    async def go():
        mgr = SandboxManager()
        try:
            return await fn(mgr)
        finally:
            await mgr.aclose()

    return asyncio.run(go())


def _conns(mgr: SandboxManager, name: str):
    rec = mgr.get(name)
    return mgr.backend_for(rec.backend, rec.spec.get("options") or {})._conns, rec.id


def _fds() -> int:
    # garbage from earlier tests (a socket in a reference cycle) is collected first: otherwise a collection
    # between two counts closes it and the count drops for reasons that have nothing to do with this test
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_concurrent_execs_share_one_connection(box):
    blobs = [bytes(range(256)) * 1024 + bytes([i]) * (i + 1) for i in range(4)]  # ~256 KiB, all byte values

    async def go(mgr):
        conns, sid = _conns(mgr, box)
        shell = [mgr.exec(box, ExecRequest(["sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i}"]))
                 for i in range(10)]
        cats = [mgr.exec(box, ExecRequest(["cat"], stdin=b)) for b in blobs]
        first = await mgr.exec(box, ExecRequest(["true"]))
        client = conns.peek(sid)
        rs = await asyncio.gather(*shell, *cats)
        return first, client, conns.peek(sid), len(conns), rs

    first, before, after, n, rs = _with(go)
    assert first.exit_code == 0
    assert before is not None and after is before and n == 1  # every exec rode the one connection
    for i, r in enumerate(rs[:10]):
        assert (r.exit_code, r.stdout, r.stderr) == (i, f"out{i}\n".encode(), f"err{i}\n".encode())
    for blob, r in zip(blobs, rs[10:], strict=True):
        assert r.exit_code == 0 and r.stdout == blob


def test_timeout_and_cancel_kill_only_their_own_command(box):
    async def go(mgr):
        slow = asyncio.ensure_future(mgr.exec(box, ExecRequest(["sh", "-c", "sleep 2; echo survived"])))
        timed = asyncio.ensure_future(mgr.exec(box, ExecRequest(["sleep", "30"], timeout=0.5)))
        cancelled = asyncio.ensure_future(mgr.exec(box, ExecRequest(["sleep", "30"])))
        await asyncio.sleep(0.5)
        cancelled.cancel()
        t = await timed
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        s = await slow
        after = await mgr.exec(box, ExecRequest(["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$'"]))
        return t, s, after

    t, s, after = _with(go)
    assert t.timed_out and t.exit_code == 124
    assert s.exit_code == 0 and s.stdout == b"survived\n"
    assert after.stdout.strip() == b"0"  # the killed sleeps are gone (grep -c: exit 1 for no match)


def test_streamed_stdin_gets_its_own_connection(box):
    """A command that does not read its (large) stdin would stop the agent reading a shared connection:
    such an exec runs on a connection of its own, and a short exec next to it is not held up."""
    big = b"x" * (3 << 20)

    async def go(mgr):
        conns, sid = _conns(mgr, box)
        await mgr.exec(box, ExecRequest(["true"]))
        shared = conns.peek(sid)
        hog = asyncio.ensure_future(mgr.exec(box, ExecRequest(["sh", "-c", "sleep 3; wc -c"], stdin=big)))
        await asyncio.sleep(0.3)
        quick = await mgr.exec(box, ExecRequest(["echo", "quick"]))
        hog_done_then = hog.done()
        return quick, hog_done_then, await hog, shared, conns.peek(sid)

    quick, hog_done_then, hog, shared, shared_after = _with(go)
    assert quick.stdout == b"quick\n" and not hog_done_then
    assert hog.exit_code == 0 and hog.stdout.strip() == str(3 << 20).encode()
    assert shared_after is shared


def test_stale_connection_after_restart_behind_our_back(box):
    """The sandbox is stopped and started by another process while we hold its connection (our loop
    does not run meanwhile, so we cannot have seen the agent go): the next exec still succeeds."""
    async def go(mgr):
        conns, sid = _conns(mgr, box)
        r0 = await mgr.exec(box, ExecRequest(["echo", "one"]))
        old = conns.peek(sid)
        for op in ("stop", "start"):
            r = subprocess.run(ak_argv(op, box), capture_output=True, timeout=120)  # blocks our loop on purpose
            assert r.returncode == 0, r
        r1 = await mgr.exec(box, ExecRequest(["echo", "two"]))
        return r0, r1, old, conns.peek(sid)

    r0, r1, old, new = _with(go)
    assert r0.stdout == b"one\n" and r1.exit_code == 0 and r1.stdout == b"two\n"
    assert old is not None and new is not None and new is not old and old.closed


def test_agent_stopped_mid_session_then_started(backend, box):
    """The agent goes away while a command runs on the shared connection: that exec fails clearly, the
    next one says the sandbox is not running, and once it runs again execs succeed on a new connection."""
    async def go(mgr):
        conns, sid = _conns(mgr, box)
        running = asyncio.ensure_future(mgr.exec(box, ExecRequest(["sleep", "60"])))
        await asyncio.sleep(0.5)
        stopper = await asyncio.create_subprocess_exec(*ak_argv("stop", box))
        assert await stopper.wait() == 0
        with pytest.raises(SandboxError, match="died while the command ran") as died:
            await running
        # it says why: the engine's state (still "running" while the engine is stopping it) and what happened
        # to the connection
        assert "(state: " in str(died.value) and "connection" in str(died.value), str(died.value)
        await asyncio.sleep(0)
        assert conns.peek(sid) is None  # the lost connection left the table by itself
        with pytest.raises(InvalidState, match="not running"):
            await mgr.exec(box, ExecRequest(["true"]))
        starter = await asyncio.create_subprocess_exec(*ak_argv("start", box))
        assert await starter.wait() == 0
        return await mgr.exec(box, ExecRequest(["echo", "back"]))

    r = _with(go)
    assert r.exit_code == 0 and r.stdout == b"back\n"


def test_removed_sandboxes_close_their_connections(backend):
    """Sandboxes created, exec'd (concurrently) and removed, some by us and one by another process while
    we hold its connection: afterwards no connection is left and the fds are back to the baseline."""
    async def cycle(mgr, name: str, external: bool) -> None:
        await mgr.create(_spec(backend, name), start=True)
        try:
            rs = await asyncio.gather(*(mgr.exec(name, ExecRequest(["sh", "-c", f"echo {i}"])) for i in range(5)))
            assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(5)]
            if external:
                r = await asyncio.create_subprocess_exec(*ak_argv("rm", name))
                assert await r.wait() == 0
                with pytest.raises((NotFound, InvalidState)):
                    await mgr.exec(name, ExecRequest(["true"]))
        finally:
            if not external:
                await mgr.remove(name)

    async def go(mgr):
        await cycle(mgr, f"{RUN}-fd0", False)  # warm-up: engine clients and the like open lazily
        base = _fds()
        for i in range(1, 5):
            await cycle(mgr, f"{RUN}-fd{i}", external=(i == 2))
        await asyncio.sleep(0.1)
        rec_backend = mgr.backend_for(*backend)
        return base, _fds(), len(rec_backend._conns)

    base, after, left = _with(go)
    assert left == 0
    assert after == base


def test_in_process_api_shares_one_connection(backend):
    """``agentkernel.Sandbox`` (the in-process API): concurrent execs on one connection, closed with it."""
    from agentkernel import Sandbox

    b, opts = backend

    async def go():
        async with Sandbox(image=IMAGE, backend=b, options=opts or None) as sb:
            rs = await asyncio.gather(*(sb.exec(["sh", "-c", f"echo {i}; exit {i}"]) for i in range(6)))
            conns = sb._manager().backend_for(b, opts)._conns
            live = len(conns)
        return rs, live, len(conns)

    rs, live, left = asyncio.run(go())
    assert [(r.exit_code, r.stdout) for r in rs] == [(i, f"{i}\n".encode()) for i in range(6)]
    assert live == 1 and left == 0


def ak_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "agentkernel", *args]
