"""``Backend.remove_many`` (a pool closing): podman removes its containers with one engine call per batch,
and each sandbox's run dir goes with it; a sandbox that is already gone is not an error."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from agentkernel import owner
from agentkernel.backends import _container, get_backend, podman
from agentkernel.config import resolve_spec
from tests.conftest import require_backend

pytestmark = pytest.mark.timeout(180)


def _exists(name: str) -> bool:
    return subprocess.run(["podman", "container", "exists", name]).returncode == 0


def test_podman_removes_a_pool_in_batches(monkeypatch):
    require_backend("podman")
    monkeypatch.setattr(podman, "REMOVE_BATCH", 2)
    spec = resolve_spec({"backend": "podman", "image": "agentkernel/busybox"})
    b = get_backend("podman")
    engine_calls: list[tuple[str, ...]] = []
    real = b._podman

    async def counted(*args, **kw):  # the real engine call, counted
        engine_calls.append(args)
        return await real(*args, **kw)

    async def go():
        refs = []
        try:
            for _ in range(3):
                refs.append(await b.create(spec, sandbox_id=owner.new_id("rmmany"), owner=owner.current_owner()))
            names = [r.handle["container"] for r in refs]
            assert all(_exists(n) for n in names)
            assert all(os.path.isdir(_container.sandbox_run_dir(r.id)) for r in refs)
            await b.remove(refs[0])  # already gone before the batch: --ignore
            b._podman = counted
            errors = await b.remove_many(refs)
            return names, errors, [r.id for r in refs]
        finally:
            b._podman = real
            for r in refs:
                await b.remove(r)
            await b.aclose()

    names, errors, ids = asyncio.run(go())
    assert errors == [None, None, None]
    rm_calls = [c for c in engine_calls if c[0] == "rm"]
    assert len(rm_calls) == 2 and sum(n in c for c in rm_calls for n in names) == 3  # 3 names, batches of 2
    assert not any(_exists(n) for n in names)
    assert not any(os.path.exists(_container.sandbox_run_dir(i)) for i in ids)
