"""The reference system's published clients, unchanged, against `agentkernel serve`: npm ``agentkernel``
0.18.1 and PyPI ``agentkernel-sdk`` 0.21.0 (in its own directory: its import name is ours too), plus our
drop-in (``from agentkernel import AgentKernel``) running the very same Python script. Every call of
their later API: batch file write, sudo, detached exec, TTL, lookup by UUID, git sources, named
volumes, snapshots. Then the bad input of each."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from api_helpers import TOKENS, auth, free_port, start_server, unique, wait_until

pytestmark = pytest.mark.engine("podman")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_SDK_VERSION = "0.21.0"
REF_NPM_VERSION = "0.18.1"
CI = os.environ.get("CI") == "true"


def ak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, timeout=120)


def _missing(what: str, detail: str):
    if CI:
        pytest.fail(f"{what} is required in CI: {detail}")
    pytest.skip(f"{what} unavailable: {detail}")


@pytest.fixture(scope="module")
def ref_python_sdk() -> str:
    target = os.path.join(REPO, "build", f"refsdk-{REF_SDK_VERSION}")
    if not os.path.isdir(os.path.join(target, "agentkernel")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                            f"agentkernel-sdk=={REF_SDK_VERSION}"], capture_output=True, text=True)
        if r.returncode != 0:
            _missing("agentkernel-sdk", r.stderr[-500:])
    return target


def npm_client_dir() -> str:
    """Where scripts/setup.sh installs the npm client (AGENTKERNEL_NPM_CLIENTS overrides)."""
    return os.environ.get("AGENTKERNEL_NPM_CLIENTS") or os.path.join(REPO, "build", "refnode")


@pytest.fixture(scope="module")
def ref_node_client() -> str:
    d = npm_client_dir()
    pkg = os.path.join(d, "node_modules", "agentkernel")
    if not os.path.isfile(os.path.join(pkg, "package.json")):
        if shutil.which("npm") is None:
            _missing("npm", "not installed")
        os.makedirs(d, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", d,
                            f"agentkernel@{REF_NPM_VERSION}"], capture_output=True, text=True)
        if r.returncode != 0:
            _missing(f"npm agentkernel@{REF_NPM_VERSION}", r.stderr[-500:])
    with open(os.path.join(pkg, "package.json")) as f:
        assert json.load(f)["version"] == REF_NPM_VERSION
    return pkg


@pytest.fixture(scope="module")
def git_source(tmp_path_factory):
    """A git repository served over dumb HTTP on loopback (branch main, tag v1 with an older file)."""
    root = tmp_path_factory.mktemp("git")
    work, bare = root / "work", root / "srv" / "proj.git"
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")

    def git(*a, cwd=work):
        subprocess.run(["git", *a], cwd=cwd, env=env, check=True, capture_output=True)

    work.mkdir()
    git("init", "-q", "-b", "main", ".")
    (work / "README.md").write_text("version one\n")
    (work / "bin").mkdir()
    (work / "bin" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(work / "bin" / "run.sh", 0o755)
    git("add", ".")
    git("commit", "-qm", "one")
    git("tag", "v1")
    (work / "README.md").write_text("version two\n")
    git("commit", "-qam", "two")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    git("update-server-info", cwd=bare)
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                            str(root / "srv")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/proj.git"
    assert wait_until(lambda: _get_ok(url + "/info/refs"), timeout=10)
    yield url
    srv.terminate()
    srv.wait()


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory):
    """A server whose agentkernel.toml allows sudo (sandboxes still run as uid 1000 unless configured)."""
    d = tmp_path_factory.mktemp("compat-serve")
    (d / "agentkernel.toml").write_text("[api]\nallow_sudo_exec = true\n")
    srv = start_server(str(d), tokens=TOKENS, pool_min=1, pool_max=3)
    yield srv
    for tok in TOKENS.values():
        h = {"Authorization": f"Bearer {tok}"}
        try:
            for sb in httpx.get(srv.url + "/sandboxes", headers=h, timeout=30).json()["data"]:
                httpx.delete(f"{srv.url}/sandboxes/{sb['name']}", headers=h, timeout=60)
            for sn in httpx.get(srv.url + "/snapshots", headers=h, timeout=30).json()["data"]:
                httpx.delete(f"{srv.url}/snapshots/{sn['name']}", headers=h, timeout=60)
        except Exception:
            pass
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def volume():
    name = unique("vol")
    p = ak("volume", "create", name)
    assert p.returncode == 0, p.stderr
    yield name
    ak("volume", "rm", name)


# ---- the same script through the published Python SDK and through our drop-in ---------------------------

PY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from agentkernel import AgentKernel, AsyncAgentKernel, AgentKernelError
    WRITE_TEST = "(echo x > /data/g) 2>/dev/null && echo rw || echo ro"
    name, git_url, vol = sys.argv[1], sys.argv[2], sys.argv[3]
    out = {}

    def err(fn):
        try:
            fn()
        except AgentKernelError as e:
            return [type(e).__name__, str(e)]
        return None

    with AgentKernel() as c:
        info = c.create_sandbox(name, memory_mb=256)
        out["uuid"] = c.get_sandbox_by_uuid(info.uuid).name
        out["write_files"] = c.write_files(name, {"/tmp/w/a.txt": "A", "/tmp/w/sub/b.txt": "B"}).written
        out["read_back"] = [c.read_file(name, "tmp/w/a.txt").content, c.read_file(name, "tmp/w/sub/b.txt").content]
        out["sudo"] = err(lambda: c.exec_in_sandbox(name, ["id", "-u"], sudo=True))
        d = c.exec_detached(name, ["sh", "-c", "echo out; echo err >&2; sleep 1; exit 3"])
        out["detached_started"] = [d.status, d.sandbox, d.command[0]]
        out["detached_listed"] = d.id in [x.id for x in c.detached_list(name)]
        for _ in range(100):
            st = c.detached_status(name, d.id)
            if st.status != "running":
                break
            time.sleep(0.1)
        out["detached_done"] = [st.status, st.exit_code]
        out["detached_logs"] = [c.detached_logs(name, d.id).stdout, c.detached_logs(name, d.id, stream="stderr").stderr]
        k = c.exec_detached(name, ["sleep", "300"])
        out["kill"] = str(c.detached_kill(name, k.id))
        out["killed"] = c.detached_status(name, k.id).status
        out["extend"] = c.extend_ttl(name, by="1h")
        c.exec_in_sandbox(name, ["sh", "-c", "echo snapped > /tmp/marker"])
        snap = name + "-snap"
        s = c.take_snapshot(name, snapshot_name=snap)
        out["snapshot"] = [s.name, s.sandbox, s.backend, bool(s.image_tag)]
        out["snapshots"] = snap in [x.name for x in c.list_snapshots()]
        out["snapshot_get"] = c.get_snapshot(snap).sandbox
        restored = c.restore_snapshot(snap)
        out["restored"] = [restored.name, restored.status,
                           c.exec_in_sandbox(restored.name, ["cat", "/tmp/marker"]).output]
        c.remove_sandbox(restored.name)
        c.delete_snapshot(snap)
        out["snapshot_gone"] = err(lambda: c.get_snapshot(snap))
        src = name + "-src"
        c.create_sandbox(src, source_url=git_url, source_ref="v1")
        out["source"] = c.exec_in_sandbox(src, ["sh", "-c", "cat README.md; ./bin/run.sh; pwd"]).output
        c.remove_sandbox(src)
        v1, v2 = name + "-v1", name + "-v2"
        c.create_sandbox(v1, volumes=[vol + ":/data"])
        c.exec_in_sandbox(v1, ["sh", "-c", "echo kept > /data/f"])
        c.remove_sandbox(v1)
        c.create_sandbox(v2, volumes=[vol + ":/data:ro"])
        out["volume"] = [c.exec_in_sandbox(v2, ["cat", "/data/f"]).output,
                         c.exec_in_sandbox(v2, ["sh", "-c", WRITE_TEST]).output]
        c.remove_sandbox(v2)
        with c.sandbox(name + "-s") as sb:
            out["session_write_files"] = sb.write_files({"/tmp/s.txt": "s"}).written
            out["session_run"] = sb.run(["cat", "/tmp/s.txt"]).output
        c.remove_sandbox(name)

    import asyncio
    async def go():
        async with AsyncAgentKernel() as c:
            n = name + "-a"
            await c.create_sandbox(n)
            w = (await c.write_files(n, {"/tmp/x": "y"})).written
            d = await c.exec_detached(n, ["echo", "async"])
            for _ in range(100):
                if (await c.detached_status(n, d.id)).status != "running":
                    break
                await asyncio.sleep(0.1)
            logs = (await c.detached_logs(n, d.id)).stdout
            await c.remove_sandbox(n)
            return [w, logs]
    out["async"] = asyncio.run(go())
    print(json.dumps(out))
""")


def _check_python_output(out: dict, name: str, git_url: str) -> None:
    assert out["uuid"] == name
    assert out["write_files"] == 2 and out["read_back"] == ["A", "B"]
    assert out["sudo"] is not None and "uid 1000" in out["sudo"][1] and "sudo" in out["sudo"][1]
    assert out["detached_started"] == ["running", name, "sh"] and out["detached_listed"] is True
    assert out["detached_done"] == ["failed", 3]
    assert out["detached_logs"] == ["out\n", "err\n"]
    assert "Killed" in out["kill"] and out["killed"] == "failed"
    assert isinstance(out["extend"], str) and out["extend"].endswith("Z")
    assert out["snapshot"] == [name + "-snap", name, "podman", True] and out["snapshots"] is True
    assert out["snapshot_get"] == name
    assert out["restored"] == [name + "-snap", "running", "snapped\n"]
    assert out["snapshot_gone"][0] == "NotFoundError"
    assert out["source"] == "version one\nran\n/workspace\n"
    assert out["volume"] == ["kept\n", "ro\n"]
    assert out["session_write_files"] == 1 and out["session_run"] == "s"
    assert out["async"] == [1, "async\n"]


def _run_py(pythonpath: str, srv, git_url: str, volume: str, tmp_path) -> dict:
    script = tmp_path / "ref_calls.py"
    script.write_text(PY_SCRIPT)
    name = unique("rc")
    env = dict(os.environ, PYTHONPATH=pythonpath, AGENTKERNEL_BASE_URL=srv.url, AGENTKERNEL_API_KEY=TOKENS["alice"])
    p = subprocess.run([sys.executable, str(script), name, git_url, volume], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    _check_python_output(out, name, git_url)
    return out


def test_published_python_sdk_later_api(compat_server, ref_python_sdk, git_source, volume, tmp_path):
    _run_py(ref_python_sdk, compat_server, git_source, volume, tmp_path)


def test_python_drop_in_runs_the_same_script(compat_server, git_source, volume, tmp_path):
    """`from agentkernel import AgentKernel` with our package: the reference SDK's script, unchanged."""
    _run_py(REPO, compat_server, git_source, volume, tmp_path)


# ---- npm agentkernel 0.18.1 -------------------------------------------------------------------------------

NODE_SCRIPT = textwrap.dedent("""
    const { AgentKernel, NotFoundError } = require(process.argv[2]);
    const [name, gitUrl, vol] = process.argv.slice(3);
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    async function err(fn) { try { await fn(); return null; } catch (e) { return [e.constructor.name, e.message]; } }
    (async () => {
      const c = new AgentKernel();
      const out = {};
      out.health = await c.health();
      out.run = (await c.run(["echo", "from-node"])).output;
      const info = await c.createSandbox(name, { memory_mb: 256 });
      out.create = [info.name, info.status];
      out.uuid = (await c.getSandboxByUuid(info.uuid)).name;
      out.writeFiles = (await c.writeFiles(name, { "/tmp/n/a.txt": "A", "/tmp/n/b.txt": "B" })).written;
      out.readFile = (await c.readFile(name, "tmp/n/b.txt")).content;
      out.writeFile = await c.writeFile(name, "tmp/n/c.txt", "C");
      out.exec = (await c.execInSandbox(name, ["sh", "-c", "cat /tmp/n/a.txt /tmp/n/c.txt; echo $K"],
                                        { env: ["K=v"], workdir: "/tmp" })).output;
      out.sudo = await err(() => c.execInSandbox(name, ["id"], { sudo: true }));
      const d = await c.execDetached(name, ["sh", "-c", "echo o; echo e >&2; exit 2"]);
      let st;
      for (let i = 0; i < 100; i++) {
        st = await c.detachedStatus(name, d.id);
        if (st.status !== "running") break;
        await sleep(100);
      }
      out.detached = [st.status, st.exit_code];
      out.detachedLogs = [(await c.detachedLogs(name, d.id)).stdout,
                          (await c.detachedLogs(name, d.id, "stderr")).stderr];
      out.detachedList = (await c.detachedList(name)).map((x) => x.id).includes(d.id);
      const k = await c.execDetached(name, ["sleep", "300"]);
      out.detachedKill = await c.detachedKill(name, k.id);
      out.extendTtl = (await c.extendTtl(name, { by: "30m" })).expires_at;
      await c.execInSandbox(name, ["sh", "-c", "echo nodesnap > /tmp/m"]);
      const snap = name + "-snap";
      out.takeSnapshot = (await c.takeSnapshot({ sandbox: name, name: snap })).name;
      out.listSnapshots = (await c.listSnapshots()).map((s) => s.name).includes(snap);
      out.getSnapshot = (await c.getSnapshot(snap)).sandbox;
      const r = await c.restoreSnapshot(snap);
      out.restore = [r.name, (await c.execInSandbox(r.name, ["cat", "/tmp/m"])).output];
      await c.removeSandbox(r.name);
      await c.deleteSnapshot(snap);
      out.snapshotGone = await err(() => c.getSnapshot(snap));
      const src = name + "-src";
      await c.createSandbox(src, { source_url: gitUrl, source_ref: "main" });
      out.source = (await c.execInSandbox(src, ["cat", "README.md"])).output;
      await c.removeSandbox(src);
      const v = name + "-v";
      await c.createSandbox(v, { volumes: [vol + ":/data"] });
      out.volume = (await c.execInSandbox(v, ["cat", "/data/f"])).output;
      await c.removeSandbox(v);
      {
        const sb = await c.sandbox(name + "-s");
        out.sessionWriteFiles = (await sb.writeFiles({ "/tmp/q": "q" })).written;
        out.sessionRun = (await sb.run(["cat", "/tmp/q"])).output;
        await sb.remove();
      }
      out.batch = (await c.batchRun([{ command: ["echo", "b1"] }])).results.map((x) => x.output);
      await c.removeSandbox(name);
      out.gone = await err(() => c.getSandbox(name));
      console.log(JSON.stringify(out));
    })().catch((e) => { console.error(e && e.stack || e); process.exit(1); });
""")


def test_published_node_client_later_api(compat_server, ref_node_client, git_source, volume, tmp_path):
    if shutil.which("node") is None:
        _missing("node", "not installed")
    # the volume holds a file written by a previous sandbox (written here if this test runs alone)
    vol_data = json.loads(ak("volume", "info", volume).stdout)["path"]
    with open(os.path.join(vol_data, "f"), "w") as f:
        f.write("kept\n")
    script = tmp_path / "ref_calls.cjs"
    script.write_text(NODE_SCRIPT)
    name = unique("nc")
    env = dict(os.environ, AGENTKERNEL_BASE_URL=compat_server.url, AGENTKERNEL_API_KEY=TOKENS["bob"])
    p = subprocess.run(["node", str(script), ref_node_client, name, git_source, volume], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["health"] == "ok" and out["run"] == "from-node\n"
    assert out["create"] == [name, "running"] and out["uuid"] == name
    assert out["writeFiles"] == 2 and out["readFile"] == "B"
    assert out["writeFile"] == {"path": "/tmp/n/c.txt", "size": 1}
    assert out["exec"] == "ACv\n"
    assert out["sudo"][0] == "ServerError" and "sudo" in out["sudo"][1]
    assert out["detached"] == ["failed", 2] and out["detachedLogs"] == ["o\n", "e\n"] and out["detachedList"]
    assert "Killed" in out["detachedKill"]
    assert out["extendTtl"].endswith("Z")
    assert out["takeSnapshot"] == name + "-snap" and out["listSnapshots"] and out["getSnapshot"] == name
    assert out["restore"] == [name + "-snap", "nodesnap\n"]
    assert out["snapshotGone"][0] == "NotFoundError"
    assert out["source"] == "version two\n"
    assert out["volume"] == "kept\n"
    assert out["sessionWriteFiles"] == 1 and out["sessionRun"] == "q"
    assert out["batch"] == ["b1\n"]
    assert out["gone"][0] == "NotFoundError"


# ---- what the routes do beyond the clients, and bad input ---------------------------------------------------


def test_sudo_runs_as_root_where_allowed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sudo-serve")
    (d / "agentkernel.toml").write_text('[api]\nallow_sudo_exec = true\n[security]\nuser = "0:0"\n')
    srv = start_server(str(d), tokens=TOKENS, pool_min=0, pool_max=1)
    try:
        h = auth("alice")
        name = unique("sudo")
        assert httpx.post(srv.url + "/sandboxes", json={"name": name}, headers=h, timeout=120).status_code == 201
        r = httpx.post(f"{srv.url}/sandboxes/{name}/exec", json={"command": ["id", "-u"], "sudo": True}, headers=h,
                       timeout=60)
        assert r.json()["data"]["output"] == "0\n", r.text
        httpx.delete(f"{srv.url}/sandboxes/{name}", headers=h, timeout=60)
    finally:
        assert srv.stop() == 0


def test_sudo_refused_when_the_server_does_not_allow_it(server):
    h = auth("alice")
    name = unique("nosudo")
    assert httpx.post(server.url + "/sandboxes", json={"name": name}, headers=h, timeout=120).status_code == 201
    try:
        r = httpx.post(f"{server.url}/sandboxes/{name}/exec", json={"command": ["id"], "sudo": True}, headers=h)
        assert r.status_code == 422 and "allow_sudo_exec" in r.json()["hint"]
    finally:
        httpx.delete(f"{server.url}/sandboxes/{name}", headers=h, timeout=60)


def test_detached_output_is_bounded_and_survives_the_client(compat_server):
    h = auth("alice")
    name = unique("flood")
    with httpx.Client(base_url=compat_server.url, headers=h, timeout=120) as c:
        assert c.post("/sandboxes", json={"name": name}).status_code == 201
        d = c.post(f"/sandboxes/{name}/exec/detach",
                   json={"command": ["sh", "-c", "head -c 20000000 /dev/zero | tr '\\\\0' x; echo done >&2"]}).json()
        cmd_id = d["data"]["id"]
    # a new client, after the first one has gone: the command went on
    with httpx.Client(base_url=compat_server.url, headers=h, timeout=120) as c:
        assert wait_until(lambda: c.get(f"/sandboxes/{name}/exec/detached/{cmd_id}").json()["data"]["status"]
                          != "running", timeout=60)
        st = c.get(f"/sandboxes/{name}/exec/detached/{cmd_id}").json()["data"]
        assert st["status"] == "completed" and st["truncated"] is True and st["stdout_bytes"] == 8 << 20
        logs = c.get(f"/sandboxes/{name}/exec/detached/{cmd_id}/logs").json()["data"]
        assert len(logs["stdout"]) == 8 << 20 and logs["truncated"]["stdout"] is True and logs["stderr"] == "done\n"
        # reaped with the sandbox: a running command ends and is forgotten when its sandbox is removed
        sleeper = c.post(f"/sandboxes/{name}/exec/detach", json={"command": ["sleep", "300"]}).json()["data"]["id"]
        assert c.delete(f"/sandboxes/{name}").status_code == 200
        assert c.get(f"/sandboxes/{name}/exec/detached/{sleeper}").status_code == 404
        assert c.get(f"/sandboxes/{name}/exec/detached").status_code == 404


def _proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_detached_survives_a_server_restart(tmp_path):
    """State and output are on disk beside the store and the command runs under its own supervisor: a
    detached command started through one server finishes while no server runs, and the next server
    reports it (status, exit code, output, the command's real pid inside the sandbox). Kill ends it;
    removing the sandbox kills its running commands' supervisors and deletes their state."""
    h = auth("alice")
    env = {"AGENTKERNEL_STORE": str(tmp_path / "store" / "state.db")}
    srv = start_server(str(tmp_path), tokens=TOKENS, pool_min=0, pool_max=1, extra_env=env)
    name = unique("restart")
    try:
        with httpx.Client(base_url=srv.url, headers=h, timeout=120) as c:
            assert c.post("/sandboxes", json={"name": name}).status_code == 201
            d = c.post(f"/sandboxes/{name}/exec/detach",
                       json={"command": ["sh", "-c", "echo pid=$$; sleep 12; echo after; exit 4"]}).json()["data"]
            assert d["status"] == "running" and d["pid"] > 0 and d["supervisor_pid"] > 0, d
            sleeper = c.post(f"/sandboxes/{name}/exec/detach", json={"command": ["sleep", "300"]}).json()["data"]
        assert srv.stop() == 0, srv.log()
        assert _proc_alive(d["supervisor_pid"])  # no server now: the command goes on
        srv = start_server(str(tmp_path), tokens=TOKENS, pool_min=0, pool_max=1, extra_env=env)
        with httpx.Client(base_url=srv.url, headers=h, timeout=120) as c:
            url = f"/sandboxes/{name}/exec/detached/{d['id']}"
            assert wait_until(lambda: c.get(url).json()["data"]["status"] != "running", timeout=30)
            st = c.get(url).json()["data"]
            assert (st["status"], st["exit_code"]) == ("failed", 4), st
            logs = c.get(url + "/logs").json()["data"]
            assert logs["stdout"] == f"pid={d['pid']}\nafter\n", logs
            assert not _proc_alive(d["supervisor_pid"])
            ids = [x["id"] for x in c.get(f"/sandboxes/{name}/exec/detached").json()["data"]]
            assert set(ids) == {d["id"], sleeper["id"]}
            assert c.get(f"/sandboxes/{name}/exec/detached/{sleeper['id']}").json()["data"]["status"] == "running"
            assert "Killed" in c.delete(f"/sandboxes/{name}/exec/detached/{sleeper['id']}").json()["data"]
            st = c.get(f"/sandboxes/{name}/exec/detached/{sleeper['id']}").json()["data"]
            assert (st["status"], st["signal"]) == ("failed", 9) and not _proc_alive(sleeper["supervisor_pid"])
            again = c.post(f"/sandboxes/{name}/exec/detach", json={"command": ["sleep", "300"]}).json()["data"]
            assert c.delete(f"/sandboxes/{name}").status_code == 200
            assert wait_until(lambda: not _proc_alive(again["supervisor_pid"]), timeout=15)
            assert os.listdir(tmp_path / "store" / "detached") == []  # state and output deleted with it
    finally:
        with contextlib.suppress(Exception):
            httpx.delete(f"{srv.url}/sandboxes/{name}", headers=h, timeout=60)
        assert srv.stop() == 0, srv.log()


def test_ttl_is_enforced_and_bad_ttls_are_refused(compat_server):
    h = auth("alice")
    with httpx.Client(base_url=compat_server.url, headers=h, timeout=120) as c:
        for bad in ("-5", 0, "0s", "400d", "soon", "5x"):
            r = c.post("/sandboxes", json={"name": unique("ttl"), "ttl": bad})
            assert r.status_code == 400 and "ttl" in r.json()["error"], (bad, r.text)
        name = unique("ttl")
        r = c.post("/sandboxes", json={"name": name, "ttl": "3s"})
        assert r.status_code == 201 and r.json()["data"]["expires_at"].endswith("Z")
        assert c.get(f"/sandboxes/{name}").json()["data"]["expires_at"] == r.json()["data"]["expires_at"]
        assert c.post(f"/sandboxes/{name}/extend", json={"by": "-1m"}).status_code == 400
        t0 = time.monotonic()
        assert wait_until(lambda: c.get(f"/sandboxes/{name}").status_code == 404, timeout=30)
        assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("url", ["file:///etc", "/etc", "./repo", "ext::sh -c id", "-uhttp://x", "FILE:///x"])
def test_source_url_refuses_local_and_file(compat_server, url):
    r = httpx.post(compat_server.url + "/sandboxes", json={"name": unique("src"), "source_url": url},
                   headers=auth("alice"))
    assert r.status_code == 400 and "source_url" in r.json()["error"], r.text


def test_source_ref_and_unknown_repo_errors(compat_server, git_source):
    h = auth("alice")
    r = httpx.post(compat_server.url + "/sandboxes", json={"name": unique("src"), "source_url": git_source,
                                                           "source_ref": "--upload-pack=x"}, headers=h)
    assert r.status_code == 400
    name = unique("src")
    r = httpx.post(compat_server.url + "/sandboxes", json={"name": name, "source_url": git_source + "-missing"},
                   headers=h, timeout=120)
    assert r.status_code == 400 and "cannot clone" in r.json()["error"]
    assert httpx.get(f"{compat_server.url}/sandboxes/{name}", headers=h).status_code == 404  # removed again


@pytest.mark.parametrize("spec", ["../x:/data", "a/b:/data", "x y:/data", "vol:relative", "vol:/data:rx", "vol"])
def test_bad_volume_mounts(compat_server, spec):
    r = httpx.post(compat_server.url + "/sandboxes", json={"name": unique("bv"), "volumes": [spec]},
                   headers=auth("alice"))
    assert r.status_code in (400, 404) and r.json()["success"] is False


def test_volume_cli():
    name = unique("cli-vol")
    for bad in ("../x", "a/b", "x y", ""):
        p = ak("volume", "create", bad)
        assert p.returncode == 125 and b"invalid volume name" in p.stderr
    assert ak("volume", "create", name).returncode == 0
    assert ak("volume", "create", name).returncode == 125
    assert name in [v["name"] for v in json.loads(ak("volume", "list", "--json").stdout)]
    assert json.loads(ak("volume", "info", name).stdout)["size_bytes"] == 0
    assert ak("volume", "rm", name).returncode == 0
    p = ak("volume", "info", name)
    assert p.returncode == 125 and b"no such volume" in p.stderr


def test_snapshot_errors(compat_server):
    h = auth("alice")
    with httpx.Client(base_url=compat_server.url, headers=h, timeout=120) as c:
        assert c.post("/snapshots", json={"sandbox": "nope-missing"}).status_code == 404
        assert c.get("/snapshots/nope-missing").status_code == 404
        assert c.post("/snapshots/nope-missing/restore").status_code == 404
        # another tenant's snapshots are not visible
        name = unique("sn")
        assert c.post("/sandboxes", json={"name": name}).status_code == 201
        assert c.post("/snapshots", json={"sandbox": name, "name": "bad/name"}).status_code == 400
        s = c.post("/snapshots", json={"sandbox": name, "name": name + "-s"})
        assert s.status_code == 201, s.text
        assert c.post("/snapshots", json={"sandbox": name, "name": name + "-s"}).status_code == 409
        assert c.post(f"/snapshots/{name}-s/restore", json={"as_name": name}).status_code == 409
        bob = httpx.get(compat_server.url + "/snapshots", headers=auth("bob")).json()["data"]
        assert name + "-s" not in [x["name"] for x in bob]
        assert c.delete(f"/snapshots/{name}-s").status_code == 200
        c.delete(f"/sandboxes/{name}")
