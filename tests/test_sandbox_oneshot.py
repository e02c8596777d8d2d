"""In-process ``Sandbox.run`` without a pool takes the CLI's one-shot path (``oneshot.run_outcome`` on a worker
thread, output through pipes read on the event loop) on every backend that has one: one engine call instead
of create/start/exec/remove. Against the real engines; nothing is mocked."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from agentkernel.backends import get_backend
from agentkernel.sandbox import Sandbox
from tests.conftest import require_backend

pytestmark = pytest.mark.timeout(180)

BACKENDS = ["oci", "podman"]


async def _managed_ids(backend: str) -> set[str]:
    """The engine's managed sandboxes owned by this process (other test sessions share the engines)."""
    b = get_backend(backend)
    try:
        return {i.id for i in await b.list() if i.labels.get("agentkernel.owner.pid") == str(os.getpid())}
    finally:
        await b.aclose()


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

    asyncio.run(go())


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_timeout_and_cancel_destroy_the_sandbox(backend):
    require_backend(backend)

    async def go():
        before = await _managed_ids(backend)
        r = await Sandbox.run(["sleep", "30"], backend=backend, timeout=1)
        assert r.exit_code == 124 and r.timed_out
        task = asyncio.ensure_future(Sandbox.run(["sleep", "60"], backend=backend))
        await asyncio.sleep(1.0)
        t = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t < 30
        assert await _managed_ids(backend) - before == set()

    asyncio.run(go())
