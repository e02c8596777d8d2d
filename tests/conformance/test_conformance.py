"""The backend conformance suite: every registry entry (and variant) that can run here, tested the same
way through the declared contract and the real CLI. A new backend is done when this file is green for
it. Entries that cannot run here skip with doctor's exact reason (a failure in CI for a required backend,
see tests/conftest.py).

One named sandbox per backend is shared by the tests that allow it (exit codes, signals, timeouts,
files); one-shot runs, the lifecycle, the owner-SIGKILL reaping and the pool each make their own.

Cluster backends (kubernetes, nomad) run against the cluster that KUBECONFIG / NOMAD_ADDR name (image:
$AGENTKERNEL_TEST_CLUSTER_IMAGE, default agentkernel/busybox; the cluster's settings, e.g. [orchestrator]
pod_pids_limit, from the usual config), else against the wire-level emulators in tests/emulators.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agentkernel.backends import REGISTRY, get_backend
from agentkernel.backends.base import CONTROLS, AgentAccess, ExecRequest, InstancePool, OneShot, Stdio
from agentkernel.config import resolve_spec
from agentkernel.errors import NotFound, PolicyNotEnforceable, ValidationError
from tests.conftest import SESSION_LABEL, _probes, ak, probe_backend, require_backend

pytestmark = [pytest.mark.timeout(240)]

IMAGE = "agentkernel/busybox"
CLUSTER_IMAGE = os.environ.get("AGENTKERNEL_TEST_CLUSTER_IMAGE", IMAGE)
REAL_CLUSTER_ENV = {"kubernetes": "KUBECONFIG", "nomad": "NOMAD_ADDR"}  # set: test that cluster, not an emulator
RUN = f"cf{uuid.uuid4().hex[:6]}"
BINARY = bytes(range(256)) * 2048  # 512 KiB, every byte value


def _targets() -> list:
    out = []
    for name, entry in REGISTRY.items():
        for opts in ({}, *entry.variants):
            tag = name + "".join(f"-{v}" for v in opts.values())
            out.append(pytest.param((name, dict(opts)), id=tag))
    return out


class Target:
    def __init__(self, name: str, options: dict[str, str]) -> None:
        self.name, self.options = name, options
        self.entry = REGISTRY[name]
        self.tag = name + "".join(f"-{v}" for v in options.values())
        self.backend = get_backend(name, options)
        self.posix = self.entry.isolation != "wasm"  # WASI guests: no signals, no background processes
        self.remote = "remote" in self.backend.capabilities.features
        self.image = CLUSTER_IMAGE if self.remote else IMAGE if self.entry.image_store else None

    def flags(self) -> list[str]:
        out = ["-B", self.name]
        for k, v in self.options.items():
            out += ["-o", f"{k}={v}"]
        if self.image:
            out += ["--image", self.image]
        return out

    def spec(self, **flags):
        base = {"backend": self.name, "options": dict(self.options), "profile": "moderate"}
        if self.image:
            base["image"] = self.image
        return resolve_spec({**base, **flags})

    def run(self, *argv: str, input: bytes | None = None, extra: tuple[str, ...] = (), timeout: float = 120):
        return ak("run", *self.flags(), *extra, "--", *argv, input=input, timeout=timeout,
                  env={"AGENTKERNEL_NO_DAEMON": "1"})

    def listing(self) -> list:
        """This backend's own resource listing (not another engine's)."""
        async def go():
            b = get_backend(self.name, self.options)
            try:
                return await b.list()
            finally:
                await b.aclose()

        return asyncio.run(go())

    def need_posix(self, what: str) -> None:
        if not self.posix:
            pytest.skip(f"{self.tag}: WASI guests have {what}")


@contextlib.contextmanager
def _cluster(name: str, workdir_factory):
    """A cluster backend with no real cluster configured gets its emulator for the module's duration:
    in this process's environment, so the in-process API and every CLI subprocess reach it."""
    var = REAL_CLUSTER_ENV.get(name)
    if var is None or os.environ.get(var):
        yield
        return
    require_backend("podman")  # the emulators run pods / allocations as podman containers
    from tests.emulators.clusters import emulated_cluster

    with emulated_cluster(name, str(workdir_factory.mktemp(f"emulated-{name}"))) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _probes.pop(name, None)
        try:
            ok, reason = probe_backend(name)
            if not ok:  # we started it: an emulator that does not answer is a failure, never a skip
                pytest.fail(f"the {name} emulator does not answer: {reason}")
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _probes.pop(name, None)


@pytest.fixture(scope="module", params=_targets())
def target(request, tmp_path_factory) -> Target:
    name, opts = request.param
    entry = REGISTRY[name]
    if entry.platform != sys.platform:
        pytest.skip(f"{name} runs on {entry.platform} only (this host: {sys.platform})")
    with _cluster(name, tmp_path_factory):
        require_backend(name)
        yield Target(name, opts)


def _mgr():
    from agentkernel.manager import SandboxManager

    return SandboxManager()


def _arun(coro_fn):
    from agentkernel.commands.sandbox import _with_manager  # asyncio.run with a manager, closed afterwards

    return _with_manager(coro_fn)


@pytest.fixture(scope="module")
def box(target):
    """One started named sandbox per backend, shared by the tests that allow it."""
    name = f"{RUN}-{target.tag}"
    r = ak("create", *target.flags(), "--start", name)
    assert r.returncode == 0, r
    yield name
    ak("rm", name)


def _exec(box: str, argv: list[str], **kw):
    return _arun(lambda mgr: mgr.exec(box, ExecRequest(argv, **kw)))


# ---- the contract itself ------------------------------------------------------------------------------


def test_declares_the_contract(target):
    b = target.backend
    assert b.name == target.name and type(b).probe().available
    for ctl in b.capabilities.controls:
        assert ctl in CONTROLS
    if "pool" in b.capabilities.features:
        assert isinstance(b, AgentAccess | InstancePool)
    if isinstance(b, OneShot):  # the synchronous path is optional: the runner falls back to asyncio run()
        assert callable(b.run_oneshot)
    h = b.planned_handle("conf-0123456789")
    assert isinstance(h, dict)


# ---- exit status ------------------------------------------------------------------------------------------


# Remote backends (kubernetes, nomad) carry an exit status as one number in the exec stream's last
# message, decoded by one line each (tests/contract/test_exit_status_decoding.py decodes all 256 values
# in the engines' own formats). What can differ by value on the way is the shell wrapper
# (_remote_exec.SCRIPT), the 128+N signal reading (_remote_exec.outcome) and the Success/Failure split:
# the sample holds every boundary of those, plus a stride over the rest. Each value costs an exec round
# trip there (on the emulators a websocket plus a `podman exec`, ~0.3 s), so all 256 took ~55-80 s per
# backend; local backends (agent, ~ms per exec) still run all 256.
REMOTE_EXIT_SAMPLE = sorted({0, 1, 2, 3, 42, 63, 64, 100, 124, 125, 126, 127, 128, 129, 130, 137, 143, 191, 192,
                             193, 200, 254, 255} | set(range(5, 256, 25)))


@pytest.mark.timeout(900)
def test_exit_codes_0_to_255_exact(target, box):
    codes = REMOTE_EXIT_SAMPLE if target.remote else range(256)

    async def go(mgr):
        out = {}
        for code in codes:
            r = await mgr.exec(box, ExecRequest(["sh", "-c", f"exit {code}"]))
            out[code] = r.exit_code
        return out

    got = _arun(go)
    assert got == {c: c for c in codes}


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_one_shot_exit_code(target, code):
    r = target.run("sh", "-c", f"exit {code}")
    assert r.returncode == code, r


def test_signals_are_128_plus_n(target, box):
    target.need_posix("no signals")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        r = _exec(box, ["sh", "-c", f"kill -{int(sig)} $$"])
        assert (r.exit_code, r.signal) == (128 + sig, sig), r
    r = target.run("sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM, r


# ---- streams --------------------------------------------------------------------------------------------


def test_stdin_to_eof_and_binary_streams_kept_separate(target):
    r = target.run("sh", "-c", "cat > data; cat data; printf E >&2; cat data >&2", input=BINARY)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout == BINARY
    assert r.stderr == b"E" + BINARY


def test_exec_stdin_and_binary_output(target, box):
    r = _exec(box, ["sh", "-c", "cat; printf E >&2"], stdin=BINARY)
    assert (r.exit_code, r.stdout, r.stderr) == (0, BINARY, b"E")


# ---- limits -------------------------------------------------------------------------------------------


def test_timeout_is_124_and_kills_the_tree(target, box):
    t0 = time.monotonic()
    if target.posix:
        r = target.run("sh", "-c", "sleep 60 & sleep 60", extra=("--timeout", "1"))
    else:
        r = target.run("sleep", "60", extra=("--timeout", "1"))
    assert r.returncode == 124 and time.monotonic() - t0 < 30, r
    assert b"timed out after 1 s" in r.stderr
    if not target.posix:
        return
    r = _exec(box, ["sh", "-c", "sleep 60 & echo $! > bgpid; sleep 60"], timeout=1.0)
    assert r.timed_out and r.exit_code == 124, r
    r = _exec(box, ["sh", "-c", "kill -0 $(cat bgpid) 2>/dev/null && echo alive || echo dead"])
    assert r.stdout == b"dead\n", r  # the background child went with the command


def test_concurrent_execs_fit_the_default_pids_limit(target, box):
    """20 commands at once in one sandbox (40 guest processes, well inside the default pids limit) all
    finish and the sandbox lives on. Under gVisor each guest process costs ~7 host tasks in the same
    pids cgroup: a limit that counted only guest processes made the Sentry panic and the sandbox die."""
    target.need_posix("no processes of their own")
    n = 20

    async def many(mgr):
        return await asyncio.gather(*(mgr.exec(box, ExecRequest(["sh", "-c", f"sleep 1; echo {i}"]))
                                      for i in range(n)))

    rs = _arun(many)
    assert [(r.exit_code, r.stdout) for r in rs] == [(0, f"{i}\n".encode()) for i in range(n)], rs
    assert _exec(box, ["echo", "alive"]).stdout == b"alive\n"


def test_oom_is_reported(target):
    if target.name.startswith("gvisor") or target.options.get("runtime") == "runsc":
        pytest.xfail("gVisor's Sentry enforces memory itself and kills with SIGKILL: the host sees no cgroup "
                     "OOM kill, so the OOM is reported as a plain signal 9 (known gap)")
    memory = "256" if target.entry.isolation == "vm" else "64"  # a guest kernel needs room to boot
    if target.posix:
        r = target.run("sh", "-c", "a=xxxxxxxxxxxxxxxx; while :; do a=$a$a; done", extra=("--memory", memory))
    else:
        r = target.run("sh", "-c", "seq 1 100000000 | sort | tail -1", extra=("--memory", "64"))
    assert r.returncode == 137, r
    assert b"out-of-memory" in r.stderr or b"out of memory" in r.stderr, r.stderr[-500:]


# ---- files ----------------------------------------------------------------------------------------------


def test_files_both_ways(target, box, tmp_path):
    async def go(mgr):
        n = await mgr.write_file(box, "/workspace/up.bin", BINARY)
        back = b"".join([c async for c in mgr.read_file(box, "/workspace/up.bin")])
        return n, back

    n, back = _arun(go)
    assert (n, back) == (len(BINARY), BINARY)
    r = _exec(box, ["sh", "-c", "wc -c < /workspace/up.bin"])
    assert r.stdout.strip() == str(len(BINARY)).encode()
    # and through the CLI, both directions
    src = tmp_path / "in.bin"
    src.write_bytes(BINARY[::-1])
    assert ak("cp", str(src), f"{box}:/workspace/in.bin").returncode == 0
    out = tmp_path / "out.bin"
    r = ak("cp", f"{box}:/workspace/in.bin", str(out))
    assert r.returncode == 0, r
    assert out.read_bytes() == BINARY[::-1]


def test_file_paths_cannot_escape(target, box, tmp_path):
    with pytest.raises(ValidationError):
        _arun(lambda mgr: mgr.write_file(box, "/workspace/../../etc/x", b"no"))
    # a symlink made inside the sandbox pointing at "/" resolves inside the sandbox, never on the host
    secret = tmp_path / f"host-only-{uuid.uuid4().hex[:8]}"
    secret.write_bytes(b"host secret")
    r = _exec(box, ["sh", "-c", "ln -s / /workspace/esc"])
    if r.exit_code == 127:  # no ln in this guest: plant the link where the guest's files live on the host
        rec = _mgr().get(box)
        root = rec.handle.get("dir")
        assert root, f"{target.tag}: cannot make a symlink inside the sandbox"
        os.symlink("/", os.path.join(root, "root", "workspace", "esc"))
    else:
        assert r.exit_code == 0, r
    with pytest.raises((NotFound, ValidationError)):
        _arun(lambda mgr: _read(mgr, box, f"/workspace/esc{secret}"))
    planted = f"/tmp/ak-planted-{uuid.uuid4().hex[:8]}"
    try:
        _arun(lambda mgr: mgr.write_file(box, f"/workspace/esc{planted}", b"x"))
    except (NotFound, ValidationError, Exception):
        pass
    assert not os.path.exists(planted), "a write through a sandbox symlink landed on the host"


async def _read(mgr, box, path):
    return b"".join([c async for c in mgr.read_file(box, path)])


# ---- lifecycle ---------------------------------------------------------------------------------------


def test_lifecycle_create_exec_list_stop_start_rm(target):
    import json

    name = f"{RUN}-lc-{target.tag}"
    assert ak("create", *target.flags(), name).returncode == 0
    try:
        assert ak("start", name).returncode == 0
        r = ak("exec", name, "--", "sh", "-c", "echo kept > mark; echo hi")
        assert (r.returncode, r.stdout) == (0, b"hi\n"), r
        rows = {x["name"]: x for x in json.loads(ak("list", "--json").stdout)}
        assert rows[name]["state"] == "running"
        sid = rows[name]["id"]
        assert sid in {i.id for i in target.listing()}  # in the backend's own listing
        assert ak("stop", name).returncode == 0
        rows = {x["name"]: x for x in json.loads(ak("list", "--json").stdout)}
        assert rows[name]["state"] == "stopped"
        assert ak("start", name).returncode == 0
        r = ak("exec", name, "--", "cat", "mark")
        assert (r.returncode, r.stdout) == (0, b"kept\n"), r  # files survive stop/start
    finally:
        assert ak("rm", name).returncode == 0
    assert name not in {x["name"] for x in __import__("json").loads(ak("list", "--json").stdout)}
    assert sid not in {i.id for i in target.listing()}


# ---- ownership: a SIGKILLed owner's sandbox is reaped by the next command ------------------------------


def test_sigkilled_owner_is_reaped_by_the_next_command(target):
    if target.entry.isolation == "wasm":
        pytest.xfail("a SIGKILLed wasm one-shot leaves scratch that the full scan (gc, daemon start-up) reaps, not the "
                    "journal sweep every command runs (in-process runs are not journalled)")
    env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", *target.flags(), "--", "sleep", "120"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        mine = []
        deadline = time.monotonic() + 60
        while not mine and time.monotonic() < deadline:
            time.sleep(0.2)
            mine = [i for i in target.listing() if i.labels.get("agentkernel.owner.pid") == str(proc.pid)]
        assert mine, f"{target.tag}: the run never appeared in the backend's own listing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        r = ak("list")  # any next command reaps what a dead owner left
        assert r.returncode == 0, r
        left = [i for i in target.listing() if i.labels.get("agentkernel.owner.pid") == str(proc.pid)]
        assert left == [], f"{target.tag}: still there after the next command: {[i.id for i in left]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine client the CLI had started, if still around
        except ProcessLookupError:
            pass


# ---- fail closed ---------------------------------------------------------------------------------------

_NEEDS = {  # a spec change that needs exactly this control
    "network_allowlist": {"network": True, "network_allow": ["example.invalid"]},
    "network_full": {"network": True},
    "disk_rootfs": {"read_only": False, "disk_mb": 64},
    "disk_tmpfs": {"read_only": True, "disk_mb": 64},
}


def test_refuses_a_control_it_cannot_enforce(target):
    from agentkernel import oneshot, owner

    missing = [c for c in _NEEDS if c not in target.backend.capabilities.controls]
    if not missing:
        pytest.skip(f"{target.tag} enforces every control this test knows how to ask for")
    ctl = missing[0]
    spec = target.spec(**_NEEDS[ctl])
    before = {e["id"] for e in owner.entries()}
    listed = {i.id for i in target.listing()}
    from agentkernel.backends.base import required_controls

    unenforced = [c for c in required_controls(spec) if c not in target.backend.capabilities.controls]
    assert ctl in unenforced
    with pytest.raises(PolicyNotEnforceable, match="|".join(unenforced)):  # it names what it cannot do
        oneshot.run(target.backend, spec, ["true"], Stdio(forward_stdin=False), None)
    assert {e["id"] for e in owner.entries()} == before  # nothing claimed
    key, _, value = SESSION_LABEL.partition("=")
    new = [i.id for i in target.listing() if i.id not in listed and i.labels.get(key) == value]
    assert new == []  # nothing created


def test_policy_is_checked_once_per_run_and_per_create(target, monkeypatch):
    """One place checks a spec (the core, before anything is made); the backend does not run it again."""
    from agentkernel import oneshot

    calls = []
    cls, real = type(target.backend), type(target.backend).check
    monkeypatch.setattr(cls, "check", lambda self, spec: (calls.append(spec), real(self, spec))[1])
    outcome = oneshot.run_outcome(target.backend, target.spec(), ["true"], Stdio(forward_stdin=False), 120)
    assert outcome.exit_code == 0, outcome
    assert len(calls) == 1, f"{target.tag}: a one-shot run checked its spec {len(calls)} times"
    calls.clear()
    name = f"{RUN}-ck-{target.tag}"

    async def create(mgr):
        await mgr.create(target.spec(name=name))

    _arun(create)
    try:
        assert len(calls) == 1, f"{target.tag}: a named create checked its spec {len(calls)} times"
    finally:
        assert ak("rm", name).returncode == 0


# ---- pools: every member serves exactly one run ----------------------------------------------------------


def test_pooled_members_are_used_once(target):
    """Local backends: the daemon's warm pool. Cluster backends (feature ``warm_pool``) keep their pools on the
    cluster instead (``warm_pool_size``: pods / dispatched jobs that any server replica may claim); the
    daemon's pool would need AgentAccess to a remote pod, which they do not offer, so for them the test is
    the same rule applied to the cluster-side pool (docs/backends/clusters.md)."""
    if "warm_pool" in target.backend.capabilities.features:
        _cluster_pool_members_are_used_once(target)
        return
    from agentkernel.daemon.server import Daemon
    from agentkernel.pool import PoolConfig

    spec = target.spec()

    async def go():
        d = Daemon(pool_defaults=PoolConfig(min_size=1, max_size=3), warm=[])
        try:
            first = await d.run(spec, ExecRequest(["sh", "-c", "echo used > marker; echo one"]))
            second = await d.run(spec, ExecRequest(["sh", "-c", "cat marker 2>/dev/null || echo fresh"]))
            third = await d.run(spec, ExecRequest(["sh", "-c", "cat marker 2>/dev/null || echo fresh"]))
            pools = d.status()["pools"]
            if d.poolable(spec):
                pool = d.pool_for(spec)
                deadline = time.monotonic() + 30
                while pool.stats["destroyed"] < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                pools = d.status()["pools"]
            return first, second, third, pools, d.poolable(spec)
        finally:
            await d.close()

    first, second, third, pools, poolable = asyncio.run(go())
    assert first.stdout == b"one\n", first
    assert second.stdout == b"fresh\n" and third.stdout == b"fresh\n"
    assert pools, "no pool was used"
    if poolable:
        m = pools[0]["metrics"]
        assert m["destroyed"] >= 3 and m["hits"] + m["misses"] == 3, m


def _cluster_pool_members_are_used_once(target):
    from agentkernel.backends.base import SandboxRef
    from agentkernel.owner import current_owner, new_id

    opts = {**target.options, "warm_pool_size": "1", "max_pool_size": "2"}
    spec = target.spec(options=opts, env={"AK_CONFORMANCE_POOL": RUN})  # this run's own pool
    key, _, value = SESSION_LABEL.partition("=")
    cmds = ["echo used > marker; echo one", "cat marker 2>/dev/null || echo fresh",
            "cat marker 2>/dev/null || echo fresh"]

    async def go():
        b = get_backend(target.name, opts)
        refs, outs, gone = [], [], []
        try:
            assert await b.fill_pool(spec) == 1
            for cmd in cmds:
                ref = await b.create(spec, sandbox_id=new_id("cfpool"), owner=current_owner())
                refs.append(ref)
                try:
                    await b.start(ref)
                    outs.append(await b.exec(ref, ExecRequest(["sh", "-c", cmd])))
                finally:
                    await b.remove(ref)
                gone.append(ref.id not in {i.id for i in await b.list()})
        finally:
            await b.aclose()  # waits for the background refills
            c = get_backend(target.name, opts)  # then the pool's free members go too
            try:
                for info in await c.list():
                    if info.labels.get(key) == value and info.id.startswith("pool-") and \
                            info.labels.get("agentkernel.pool") == spec.pool_key():
                        await c.remove(SandboxRef(target.name, info.id, info.handle, spec))
                if target.name == "nomad":  # the pool's parameterized template job (not a sandbox: unlisted)
                    await c._api().request("DELETE", f"/v1/job/{c._pool_job(spec)}", params={"purge": "true"},
                                           allow=(404,))
            finally:
                await c.aclose()
        return refs, outs, gone

    refs, outs, gone = asyncio.run(go())
    assert [o.stdout for o in outs] == [b"one\n", b"fresh\n", b"fresh\n"], outs
    # the first sandbox was the warm member (pod "ak-pool-...", nomad job "ak-pool-.../dispatch-...")
    assert any(str(v).startswith("ak-pool-") for v in refs[0].handle.values()), refs[0].handle
    members = [tuple(sorted((k, str(v)) for k, v in r.handle.items() if k in ("pod", "job"))) for r in refs]
    assert len(set(members)) == 3, f"a pool member served more than one sandbox: {members}"
    assert gone == [True] * 3, "a claimed member outlived its sandbox"
