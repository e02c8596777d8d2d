"""``SandboxManager.lookup``: the exec path's in-process record of a named sandbox, valid only while the
store's stamp is unchanged. Another process (the CLI, another server, gc) removing, re-creating or updating
the sandbox must be seen at the very next lookup, never a stale record."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.errors import NotFound
from agentkernel.manager import SandboxManager
from agentkernel.store import Store
from tests.conftest import ak, require_backend


def other_process(path: str, code: str) -> None:
    """``code`` run in another process against the store at ``path`` (as ``store``)."""
    prog = f"from agentkernel.store import Store\nstore = Store({path!r})\n{code}\nstore.close()\n"
    subprocess.run([sys.executable, "-c", prog], check=True, timeout=60)


def test_lookup_sees_other_processes_remove_recreate_and_update(tmp_path):
    path = str(tmp_path / "state.db")
    store = Store(path)
    store.reserve("box", "box-1", "podman", {"image": "alpine:3.20", "env": {"MARK": "one"}}, tenant="api:a")
    mgr = SandboxManager(store)
    rec, spec = mgr.lookup("box", "api:a")
    assert rec.id == "box-1" and spec.env == {"MARK": "one"}
    assert mgr.lookup("box", "api:a")[0] is rec  # unchanged: kept
    with pytest.raises(NotFound):
        mgr.lookup("box")  # another tenant's (local) name space

    other_process(path, "store.update('box-1', state='running', handle={'container': 'c1'})")
    rec, _ = mgr.lookup("box", "api:a")
    assert rec.state == "running" and rec.handle == {"container": "c1"}

    other_process(path, "store.delete('box-1')")
    with pytest.raises(NotFound):
        mgr.lookup("box", "api:a")

    other_process(path, "store.reserve('box', 'box-2', 'docker', {'image': 'alpine:3.20', 'env': {'MARK': 'two'}}, "
                        "tenant='api:a')")
    rec, spec = mgr.lookup("box", "api:a")
    assert (rec.id, rec.backend, spec.env) == ("box-2", "docker", {"MARK": "two"})

    # this process's own writes, through the same connection and through another one
    store.update("box-2", state="stopped")
    assert mgr.lookup("box", "api:a")[0].state == "stopped"
    second = Store(path)
    second.delete("box-2")
    second.close()
    with pytest.raises(NotFound):
        mgr.lookup("box", "api:a")
    store.close()


def test_exec_after_the_cli_recreated_the_sandbox_runs_in_the_new_one():
    """A server-like process keeps its manager (and its lookups) while the CLI removes the sandbox and
    creates another of the same name: the next exec runs in the new sandbox, not the removed one."""
    require_backend("podman")
    name = f"lookup-{uuid.uuid4().hex[:8]}"
    assert ak("create", "-B", "podman", "-e", "MARK=one", "--start", name).returncode == 0
    import asyncio

    async def echo(mgr: SandboxManager) -> str:
        r = await mgr.exec(name, ExecRequest(["sh", "-c", "echo $MARK"], timeout=60))
        return r.stdout.decode().strip()

    async def main() -> None:
        mgr = SandboxManager()
        try:
            assert await echo(mgr) == "one"
            assert await echo(mgr) == "one"
            assert ak("rm", name).returncode == 0
            with pytest.raises(NotFound):
                await echo(mgr)
            assert ak("create", "-B", "podman", "-e", "MARK=two", "--start", name).returncode == 0
            assert await echo(mgr) == "two"
        finally:
            await mgr.aclose()

    try:
        asyncio.run(main())
    finally:
        ak("rm", name)
