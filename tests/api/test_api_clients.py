"""Clients against the served API: our SDK (sync and async), the real published reference client
(agentkernel-sdk 0.21.0 from PyPI, unchanged), and the in-process ``agentkernel.Sandbox``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from api_helpers import TOKENS, unique

from agentkernel.sdk import (
    AgentKernel,
    AsyncAgentKernel,
    AuthError,
    BadRequestError,
    CommandError,
    ConflictError,
    NotFoundError,
    PolicyError,
)

pytestmark = pytest.mark.engine("podman")

REF_SDK_VERSION = "0.21.0"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sdk_sync(server, monkeypatch):
    monkeypatch.setenv("AGENTKERNEL_BASE_URL", server.url)
    monkeypatch.setenv("AGENTKERNEL_API_KEY", TOKENS["alice"])
    with AgentKernel() as ak:
        assert ak.health() == "ok"
        r = ak.run(["sh", "-c", "echo hi; echo oops >&2; exit 3"], env={"A": "1"})
        assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "hi\n", "oops\n", False)
        assert r.timings["server_ms"] > 0
        with pytest.raises(CommandError):
            r.check()
        assert ak.run(["sh", "-c", "printf '\\377'"]).stdout_bytes == b"\xff"
        assert ak.run(["sleep", "10"], timeout=1).timed_out
        evs = list(ak.run_stream(["sh", "-c", "echo a; sleep 0.2; echo b >&2"]))
        assert [e.type for e in evs] == ["started", "stdout", "stderr", "exit"]
        assert evs[1].text == "a\n" and evs[-1].data["exit_code"] == 0
        name = unique("sdk")
        with ak.sandbox(name, memory_mb=256) as sb:
            assert sb.info.state == "running" and sb.info.memory_mb == 256
            assert sb.write_file("/tmp/f.bin", b"\x00\x01" * 1000) == 2000
            assert sb.read_file("/tmp/f.bin") == b"\x00\x01" * 1000
            with open(__file__, "rb") as f:
                n = sb.write_file("/tmp/src.py", f)
            assert n == os.path.getsize(__file__)
            assert sb.exec(["wc", "-c", "/tmp/src.py"]).stdout.split()[0] == str(n)
            assert sb.exec(["pwd"], cwd="/tmp").stdout == "/tmp\n"
            assert [e.type for e in sb.exec_stream(["echo", "x"])][-1] == "exit"
            sb.delete_file("/tmp/f.bin")
            with pytest.raises(NotFoundError):
                sb.read_file("/tmp/f.bin")
            assert name in [s.name for s in ak.list_sandboxes()]
            with pytest.raises(ConflictError):
                ak.create_sandbox(name)
            assert sb.stop().status == "stopped"
            assert sb.start().state == "running"
            assert any(e["event"] == "file_written" for e in ak.logs(name))
        with pytest.raises(NotFoundError):
            ak.get_sandbox(name)
        with pytest.raises(BadRequestError):
            ak.create_sandbox("bad name!")
        with pytest.raises(PolicyError):
            ak._request("POST", "/sandboxes", json={"name": unique("v"), "secrets": ["K:host"]})
        res = ak.batch_run([["echo", "1"], ["echo", "2"]])
        assert [x.stdout for x in res] == ["1\n", "2\n"]
    with AgentKernel(api_key="wrong-token-xxxxxxxxxx") as bad, pytest.raises(AuthError) as ei:
        bad.list_sandboxes()
    assert ei.value.status == 401


def test_sdk_async(server):
    async def go():
        async with AsyncAgentKernel(server.url, TOKENS["bob"]) as ak:
            rs = await asyncio.gather(*(ak.run(["echo", str(i)]) for i in range(4)))
            assert [r.stdout for r in rs] == [f"{i}\n" for i in range(4)]
            evs = [e async for e in ak.run_stream(["sh", "-c", "echo a; sleep 0.2; echo b"])]
            assert [e.type for e in evs] == ["started", "stdout", "stdout", "exit"]
            name = unique("asdk")
            async with ak.sandbox(name) as sb:
                await sb.write_file("/tmp/x", "text")
                assert await sb.read_file("/tmp/x") == b"text"
                r = await sb.exec(["sh", "-c", "cat; exit 4"], stdin="in")
                assert (r.exit_code, r.stdout) == (4, "in")
            with pytest.raises(NotFoundError):
                await ak.get_sandbox(name)

    asyncio.run(go())


# ---- the reference system's published Python client, unchanged ---------------------------------------------


@pytest.fixture(scope="session")
def reference_sdk(tmp_path_factory) -> str:
    """agentkernel-sdk from PyPI in its own directory (its import name, ``agentkernel``, is ours too)."""
    target = os.path.join(REPO, "build", f"refsdk-{REF_SDK_VERSION}")
    if not os.path.isdir(os.path.join(target, "agentkernel")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                            f"agentkernel-sdk=={REF_SDK_VERSION}"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot install agentkernel-sdk {REF_SDK_VERSION}: {r.stderr[-500:]}")
    return target


REF_SCRIPT = textwrap.dedent("""
    import json, sys
    import agentkernel
    assert "refsdk" in agentkernel.__file__, agentkernel.__file__
    from agentkernel import AgentKernel, AsyncAgentKernel, NotFoundError, AuthError, ValidationError
    out = {}
    name = sys.argv[1]
    with AgentKernel() as c:
        out["health"] = c.health()
        r = c.run(["sh", "-c", "echo hello; echo err >&2"])
        out["run"] = r.output
        out["stream"] = [(e.type, e.data.get("data")) for e in c.run_stream(["sh", "-c", "echo s1; echo s2"])]
        info = c.create_sandbox(name, memory_mb=256)
        out["create"] = [info.name, info.status, info.backend, info.memory_mb, info.vcpus]
        out["list"] = [s.name for s in c.list_sandboxes()]
        out["get"] = c.get_sandbox(name).status
        out["exec"] = c.exec_in_sandbox(name, ["sh", "-c", "echo $X; pwd"], env=["X=1"], workdir="/tmp").output
        out["write"] = c.write_file(name, "tmp/hello.txt", "hi there")
        out["read"] = c.read_file(name, "tmp/hello.txt").model_dump()
        c.write_file(name, "tmp/bin", "//4=", encoding="base64")
        out["read_bin"] = c.read_file(name, "tmp/bin").model_dump()
        out["delete_file"] = c.delete_file(name, "tmp/hello.txt")
        try:
            c.read_file(name, "tmp/hello.txt")
        except NotFoundError as e:
            out["read_missing"] = "NotFoundError"
        out["logs"] = sorted({e["event"] for e in c.get_sandbox_logs(name)})
        out["batch"] = [x.model_dump() for x in c.batch_run([["echo", "b1"], ["echo", "b2"]]).results]
        with c.sandbox(name + "-s") as sb:
            out["session"] = sb.run(["echo", "in-session"]).output
            out["session_info"] = sb.info().status
        out["after_session"] = name + "-s" in [s.name for s in c.list_sandboxes()]
        c.remove_sandbox(name)
        try:
            c.get_sandbox(name)
        except NotFoundError:
            out["gone"] = True
        try:
            c.create_sandbox("bad name;rm")
        except ValidationError:
            out["bad_name"] = "ValidationError"
    with AgentKernel(api_key="not-the-right-token-000") as bad:
        try:
            bad.list_sandboxes()
        except AuthError as e:
            out["auth"] = str(e)
    import asyncio
    async def go():
        async with AsyncAgentKernel() as c:
            return (await c.run(["echo", "async"])).output
    out["async"] = asyncio.run(go())
    print(json.dumps(out))
""")


def test_reference_python_client_unchanged(server, reference_sdk, tmp_path):
    script = tmp_path / "ref_client.py"
    script.write_text(REF_SCRIPT)
    env = dict(os.environ, PYTHONPATH=reference_sdk, AGENTKERNEL_BASE_URL=server.url,
               AGENTKERNEL_API_KEY=TOKENS["alice"])
    name = unique("ref")
    p = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["health"] == "ok"
    assert out["run"] == "hello\nerr\n"
    types = [t for t, _ in out["stream"]]
    assert types[0] == "started" and types[-1] == "done" and set(types[1:-1]) == {"output"}
    assert "".join(d for t, d in out["stream"] if t == "output") == "s1\ns2\n"
    assert out["create"] == [name, "running", "podman", 256, 1]
    assert name in out["list"] and out["get"] == "running"
    assert out["exec"] == "1\n/tmp\n"
    assert out["read"] == {"content": "hi there", "encoding": "utf8", "size": 8}
    assert out["read_bin"] == {"content": "//4=", "encoding": "base64", "size": 2}
    assert out["read_missing"] == "NotFoundError"
    assert {"sandbox_created", "command_executed", "file_written", "file_deleted"} <= set(out["logs"])
    assert [b["output"] for b in out["batch"]] == ["b1\n", "b2\n"]
    assert out["session"] == "in-session\n" and out["session_info"] == "running"
    assert out["after_session"] is False
    assert out["gone"] is True and out["bad_name"] == "ValidationError"
    assert out["auth"] == "unauthorized"
    assert out["async"] == "async\n"


# ---- in-process API ------------------------------------------------------------------------------------


def test_inprocess_sandbox():
    from agentkernel import Sandbox

    async def go():
        async with Sandbox(memory_mb=128) as sb:
            r = await sb.exec(["sh", "-c", "echo $0 out; echo err >&2; exit 9"], timeout=10)
            assert (r.exit_code, r.stdout, r.stderr) == (9, b"sh out\n", b"err\n")
            await sb.write_file("/tmp/a", b"\x00data")
            assert await sb.read_file("/tmp/a") == b"\x00data"
            assert await sb.status() == "running"
            name = sb.name
        from agentkernel.manager import SandboxManager

        assert name not in [s["name"] for s in await SandboxManager().list(live=False)]
        r = await Sandbox.run(["sh", "-c", "echo one-shot"], timeout=30)
        assert (r.exit_code, r.stdout) == (0, b"one-shot\n")

    asyncio.run(go())
