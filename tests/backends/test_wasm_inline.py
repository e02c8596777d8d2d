"""Runs that fit the event loop's budget run on the loop (no thread hop); one that outgrows its slice is
started over on a worker thread with its full time limit, with the right result."""

from __future__ import annotations

import asyncio
import time

from agentkernel.backends import get_backend
from agentkernel.backends.base import ExecRequest
from agentkernel.spec import SandboxSpec
from tests.conftest import require_backend


def test_short_runs_go_inline_and_a_long_one_is_moved_to_a_thread():
    require_backend("wasm")
    spec = SandboxSpec(backend="wasm")
    b = get_backend("wasm")
    b.background = True  # as in the daemon: never "the only task"

    async def go():
        async def run(secs: bytes, timeout: float | None = 30):  # the same key (argv, stdin size) either way
            req = ExecRequest(["sh", "-c", "sleep $D; echo slept $D"], env={"D": secs.decode().strip()},
                              timeout=timeout)
            return await b.run(spec, req, sandbox_id="t", owner={})

        first = await run(b"0\n")  # unknown: a worker thread; its cost is recorded
        second = await run(b"0\n")  # fits the budget: inline
        t0 = time.monotonic()
        slow = await run(b"1\n")  # same key, outgrows the slice: started over on a thread
        took = time.monotonic() - t0
        after = await run(b"0\n")  # the key was forgotten: back on a thread first
        short_limit = await run(b"0\n", timeout=30)
        return first, second, slow, took, after, short_limit

    try:
        first, second, slow, took, after, _ = asyncio.run(go())
    finally:
        asyncio.run(b.aclose())
    assert first.stdout == second.stdout == b"slept 0\n"
    assert not first.timings.get("inline") and second.timings.get("inline") == 1.0
    assert slow.exit_code == 0 and not slow.timed_out and slow.stdout == b"slept 1\n" and took >= 1.0
    assert not slow.timings.get("inline") and not after.timings.get("inline")
