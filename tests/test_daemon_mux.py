"""The daemon's multiplexed mode (one persistent connection, pipelined runs answered by id in completion
order) against a real daemon process: ordering, cancellation, per-run errors, pooled and in-process runs."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time

import pytest

from agentkernel.config import resolve_spec
from agentkernel.daemon import protocol as P
from agentkernel.daemon.mux_client import MuxClient
from agentkernel.errors import DaemonUnavailable, PolicyNotEnforceable, ValidationError
from tests.conftest import ak, require_backend

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def daemon():
    require_backend("wasm")
    root = tempfile.mkdtemp(prefix="ak-mux-")
    env = {"AGENTKERNEL_RUNTIME_DIR": os.path.join(root, "run"), "AGENTKERNEL_HOME": os.path.join(root, "home"),
           "AGENTKERNEL_NO_DAEMON": "0"}
    r = ak("daemon", "start", "--warm", "wasm", "--warm", "oci", "--pool-min", "1", env=env)
    assert r.returncode == 0, r.stderr
    sock = os.path.join(env["AGENTKERNEL_RUNTIME_DIR"], "daemon.sock")
    yield env, sock
    ak("daemon", "stop", env=env)


def status(env) -> dict:
    return json.loads(ak("daemon", "status", "--json", env=env).stdout)


WASM = resolve_spec({"backend": "wasm"})


def test_pipelined_runs_each_get_their_own_answer(daemon):
    _, sock = daemon

    async def go():
        async with await MuxClient.connect(sock) as c:
            rs = await asyncio.gather(*(c.run(["echo", f"run{i}"], WASM) for i in range(300)))
            assert c.in_flight() == 0
            return rs

    rs = asyncio.run(go())
    assert [r["stdout"] for r in rs] == [f"run{i}\n".encode() for i in range(300)]
    assert all(r["exit_code"] == 0 for r in rs)


def test_answers_come_in_completion_order_not_request_order(daemon):
    _, sock = daemon

    async def go():
        order: list[str] = []
        async with await MuxClient.connect(sock) as c:
            async def one(name, argv):
                r = await c.run(argv, WASM)
                order.append(name)
                return r

            slow = asyncio.ensure_future(one("slow", ["sh", "-c", "sleep 1; echo slow"]))
            await asyncio.sleep(0)  # the slow run's frame goes out first
            fast = asyncio.ensure_future(one("fast", ["echo", "fast"]))
            rs = await asyncio.gather(slow, fast)
        return order, rs

    order, (slow, fast) = asyncio.run(go())
    assert order == ["fast", "slow"]
    assert slow["stdout"] == b"slow\n" and fast["stdout"] == b"fast\n"


def test_cancel_one_run_keeps_the_connection_and_the_others(daemon):
    env, sock = daemon

    async def go():
        async with await MuxClient.connect(sock) as c:
            long = asyncio.ensure_future(c.run(["sleep", "30"], WASM))
            other = asyncio.ensure_future(c.run(["sh", "-c", "sleep 0.5; echo other"], WASM))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            r = await other
            after = await c.run(["echo", "after"], WASM)
            return time.monotonic() - t0, r, after

    took, other, after = asyncio.run(go())
    assert other["stdout"] == b"other\n" and after["stdout"] == b"after\n"
    assert took < 5
    deadline = time.monotonic() + 10
    while status(env)["active_runs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status(env)["active_runs"] == 0  # the cancelled guest was stopped, not left running


def test_closing_the_connection_cancels_its_runs(daemon):
    env, sock = daemon

    async def go():
        c = await MuxClient.connect(sock)
        fut = asyncio.ensure_future(c.run(["sleep", "30"], WASM))
        await asyncio.sleep(0.3)
        assert status(env)["active_runs"] == 1
        await c.close()
        with pytest.raises(DaemonUnavailable):
            await fut

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while status(env)["active_runs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status(env)["active_runs"] == 0


def test_bad_runs_fail_alone(daemon):
    _, sock = daemon

    async def go():
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(P.oframe(P.REQUEST, {"v": P.PROTOCOL_VERSION, "op": "mux"}))
        writer.write(P.oframe(P.MRUN, {"id": 1, "argv": ["echo", "x"], "spec_id": 9}))  # spec never sent
        writer.write(P.oframe(P.MRUN, {"id": 2, "argv": "echo", "spec_id": 1, "spec": WASM.to_dict()}))
        writer.write(P.oframe(P.MRUN, {"id": "x", "argv": ["true"], "spec_id": 1}))
        writer.write(P.oframe(P.MRUN, {"id": 3, "argv": ["echo", "ok"], "spec_id": 1}))
        fr = P.FrameReader()
        got: dict = {}
        while len(got) < 5:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, f"the daemon closed the connection; so far {got}"
            for t, payload in fr.feed(data):
                obj = P.decode(payload)
                got[obj.get("id", "reply")] = (t, obj)
        writer.close()
        return got

    got = asyncio.run(go())
    assert got["reply"][0] == P.REPLY
    assert got[1][0] == P.MERROR and "unknown spec_id 9" in got[1][1]["message"]
    assert got[2][0] == P.MERROR and "argv" in got[2][1]["message"]
    assert got["x"][0] == P.MERROR and "integer id" in got["x"][1]["message"]
    assert got[3][0] == P.MRESULT and got[3][1]["stdout"] == b"ok\n"


def test_client_raises_the_runs_error(daemon):
    _, sock = daemon
    spec = resolve_spec({"backend": "wasm", "network": True})  # wasm has no network: a policy error

    async def go():
        async with await MuxClient.connect(sock) as c:
            with pytest.raises(PolicyNotEnforceable) as ei:
                await c.run(["true"], spec)
            ok = await c.run(["echo", "still"], WASM)
            return ei.value, ok

    exc, ok = asyncio.run(go())
    assert "network" in str(exc) and ok["stdout"] == b"still\n"
    assert not isinstance(exc, ValidationError)


def test_pooled_runs_are_multiplexed_too(daemon):
    require_backend("oci")
    env, sock = daemon
    spec = resolve_spec({"backend": "oci"})

    async def go():
        async with await MuxClient.connect(sock) as c:
            return await asyncio.gather(*(c.run(["sh", "-c", f"echo oci{i}"], spec) for i in range(6)))

    rs = asyncio.run(go())
    assert [r["stdout"] for r in rs] == [f"oci{i}\n".encode() for i in range(6)]
    pools = [p for p in status(env)["pools"] if p.get("backend") == "oci"]
    assert pools and pools[0]["metrics"]["hits"] + pools[0]["metrics"]["misses"] >= 6


def test_cancelled_pooled_run_destroys_its_member(daemon):
    """MCANCEL of a run on a pooled (oci) member kills its command and destroys that member (never handed
    out again); the connection and the other runs on it carry on."""
    require_backend("oci")
    env, sock = daemon
    spec = resolve_spec({"backend": "oci"})

    def oci_pool() -> dict:
        return next(p for p in status(env)["pools"] if p.get("backend") == "oci")

    async def go():
        async with await MuxClient.connect(sock) as c:
            await c.run(["true"], spec)  # the pool exists and is warm
            destroyed = oci_pool()["metrics"]["destroyed"]
            long = asyncio.ensure_future(c.run(["sh", "-c", "echo started; sleep 60"], spec))
            other = asyncio.ensure_future(c.run(["sh", "-c", "sleep 1; echo other"], spec))
            deadline = time.monotonic() + 30
            while oci_pool()["in_use"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            r = await other
            after = await c.run(["echo", "after"], spec)
            return destroyed, time.monotonic() - t0, r, after

    destroyed, took, other, after = asyncio.run(go())
    assert other["stdout"] == b"other\n" and after["stdout"] == b"after\n" and took < 30
    deadline = time.monotonic() + 30
    while (status(env)["active_runs"] or oci_pool()["metrics"]["destroyed"] < destroyed + 3) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status(env)["active_runs"] == 0
    assert oci_pool()["metrics"]["destroyed"] >= destroyed + 3  # the cancelled member too, not only the used ones


def test_stray_cancel_and_duplicate_ids(daemon):
    """MCANCEL of an id not in flight is ignored; a second MRUN with an id still in flight is refused alone
    (the first run answers normally)."""
    _, sock = daemon

    async def go():
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(P.oframe(P.REQUEST, {"v": P.PROTOCOL_VERSION, "op": "mux"}))
        writer.write(P.oframe(P.MCANCEL, {"id": 77}))
        writer.write(P.oframe(P.MRUN, {"id": 5, "argv": ["sh", "-c", "sleep 0.5; echo five"], "spec_id": 1,
                                       "spec": WASM.to_dict()}))
        writer.write(P.oframe(P.MRUN, {"id": 5, "argv": ["echo", "dup"], "spec_id": 1}))
        fr = P.FrameReader()
        got: list = []
        while len(got) < 3:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, f"the daemon closed the connection; so far {got}"
            got += [(t, P.decode(p)) for t, p in fr.feed(data)]
        writer.close()
        return got

    got = asyncio.run(go())
    assert got[0][0] == P.REPLY
    assert got[1][0] == P.MERROR and got[1][1]["id"] == 5 and "already in flight" in got[1][1]["message"]
    assert got[2][0] == P.MRESULT and got[2][1]["id"] == 5 and got[2][1]["stdout"] == b"five\n"


def test_frame_reader_cuts_bulk_reads_and_split_frames():
    frames = [P.oframe(P.MRESULT, {"id": i, "stdout": b"x" * (i % 7)}) for i in range(5000)]
    data = b"".join(frames)
    fr = P.FrameReader()
    got = fr.feed(data)  # one bulk read: every frame at once
    assert [P.decode(p)["id"] for _, p in got] == list(range(5000))
    got = []
    for i in range(0, len(data), 777):  # frames split anywhere across reads
        got += fr.feed(data[i:i + 777])
    assert [P.decode(p)["id"] for _, p in got] == list(range(5000)) and not fr.buf
    with pytest.raises(ValueError):
        fr.feed(b"\x00\x00\x00\x00\x01")


def test_runs_done_on_the_daemons_loop_are_answered_and_audited_each(daemon):
    """Pipelined runs of one short command: once its recent runs fit the loop's budget the daemon does them
    as their frames arrive (no task, no thread hop: timings say "inline"); every one is answered with its
    own output, and every one has its own audit event."""
    env, sock = daemon
    audit_path = os.path.join(env["AGENTKERNEL_HOME"], "audit.jsonl")

    def audited() -> list[dict]:
        try:
            with open(audit_path) as f:
                return [e for e in map(json.loads, f) if e.get("event") == "run" and e.get("via") == "daemon"]
        except FileNotFoundError:
            return []

    before = len(audited())
    n = 400

    argv = ["sh", "-c", "echo $N"]  # one command line (the budget is per command line), its own env each

    async def go():
        async with await MuxClient.connect(sock) as c:
            await c.run(argv, WASM, env={"N": "warm"})  # its first run teaches the daemon the command's cost
            futs = [c.submit(argv, WASM, env={"N": f"r{i}"}) for i in range(n)]
            return await asyncio.gather(*futs)

    rs = asyncio.run(go())
    assert [r["stdout"] for r in rs] == [f"r{i}\n".encode() for i in range(n)]
    assert sum(1 for r in rs if r["timings"].get("inline")) > n // 2
    deadline = time.monotonic() + 10
    while len(audited()) < before + n + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    events = audited()[before:]
    assert len(events) == n + 1 and all(e["argv"] == argv and e["exit_code"] == 0 for e in events)
    assert len({e["id"] for e in events}) == n + 1


def test_submit_and_cancel_a_submitted_run(daemon):
    _, sock = daemon

    async def go():
        async with await MuxClient.connect(sock) as c:
            slow = c.submit(["sleep", "30"], WASM, timeout=60)
            fast = c.submit(["echo", "ok"], WASM)
            assert (await fast)["stdout"] == b"ok\n"
            await asyncio.sleep(0.2)
            c.cancel(slow)
            assert slow.cancelled() and c.in_flight() == 0
            assert (await c.run(["echo", "still"], WASM))["stdout"] == b"still\n"

    asyncio.run(go())


def test_a_run_requests_spec_is_made_once_per_distinct_dict():
    """The lease path reuses the spec object an identical request dict made (a CLI sends the same dict for
    every run of one cached resolution); a different dict is a different spec, an invalid one raises and is
    never kept, and the spec is nameless with its canonical backend."""
    from agentkernel.daemon.server import Daemon
    from agentkernel.pool import PoolConfig

    d = Daemon(pool_defaults=PoolConfig(min_size=0, max_size=1), warm=[])
    a = resolve_spec({"backend": "oci"}, config={}).to_dict()
    a["name"] = "named"
    s1 = d.request_spec(a)
    assert s1.name is None and s1.backend == "oci"
    assert d.request_spec(dict(a)) is s1  # an equal dict: the same spec object
    b = {**a, "env": {"FOO": "1"}}
    s2 = d.request_spec(b)
    assert s2 is not s1 and s2.env == {"FOO": "1"}
    bad = {**a, "image": "no spaces allowed"}
    for _ in range(2):
        with pytest.raises(ValidationError):
            d.request_spec(bad)
    assert len(d._request_specs) == 2
