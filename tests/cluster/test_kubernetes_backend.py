"""The kubernetes backend end to end: against the emulator here, unchanged against a real cluster when
KUBECONFIG is set. Lifecycle, exec (exit codes, stdin EOF, binary output, timeouts), files as tar streams,
NetworkPolicy before the pod, warm-pool claim races, readiness errors, cleanup after the owner dies."""

from __future__ import annotations

import asyncio
import os

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.backends.kubernetes import KubernetesBackend
from agentkernel.errors import NotFound, SandboxError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Policy, Resources, SandboxSpec

from .conftest import IMAGE, create_and_start, stop_start_remove

pytestmark = [pytest.mark.wire, pytest.mark.timeout(180)]


def spec(**policy) -> SandboxSpec:
    return SandboxSpec(backend="kubernetes", image=IMAGE, resources=Resources(pids=None, memory_mb=128, vcpus=0.5),
                       policy=Policy(**policy))


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def sandbox(kube):
    """One running sandbox shared by the exec/file tests (pods are slow to make)."""
    b = KubernetesBackend(kube.options())

    async def up():
        ref = await b.create(spec(), sandbox_id=new_id("kt"), owner=current_owner())
        await b.start(ref)
        await b.aclose()
        return ref

    ref = run(up())
    yield b, ref

    async def down():
        await b.remove(ref)
        await b.aclose()

    run(down())


def ex(b, ref, argv, **kw):
    async def go():
        try:
            return await b.exec(ref, ExecRequest(argv, **kw))
        finally:
            await b.aclose()
    return run(go())


# every code through the status channel costs one exec (~0.1-0.3 s here): a spread by default, all 256
# with AGENTKERNEL_TEST_ALL_EXIT_CODES=1
EXIT_CODES = list(range(256)) if os.environ.get("AGENTKERNEL_TEST_ALL_EXIT_CODES") else \
    [0, 1, 2, 3, 7, 42, 64, 100, 125, 126, 127, 128, 129, 137, 143, 200, 254, 255]


def test_exec_exit_codes(sandbox):
    b, ref = sandbox
    script = 'exit "$1"'

    async def go():
        try:
            codes = EXIT_CODES
            sem = asyncio.Semaphore(8)

            async def one(c):
                async with sem:
                    return (await b.exec(ref, ExecRequest(["sh", "-c", script, "sh", str(c)]))).exit_code

            return await asyncio.gather(*(one(c) for c in codes))
        finally:
            await b.aclose()

    assert run(go()) == EXIT_CODES


def test_stdin_eof_and_binary_output(sandbox):
    b, ref = sandbox
    blob = bytes(range(256)) * 1024
    r = ex(b, ref, ["cat"], stdin=blob)
    assert r.exit_code == 0 and r.stdout == blob
    r = ex(b, ref, ["wc", "-c"])  # no stdin: EOF at once, not a hang
    assert r.exit_code == 0 and r.stdout.strip() == b"0"
    r = ex(b, ref, ["sh", "-c", "printf 'o\\0ut'; printf 'e\\377rr' >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"o\0ut", b"e\xffrr")


def test_env_cwd_and_missing_command(sandbox):
    b, ref = sandbox
    r = ex(b, ref, ["sh", "-c", 'echo "$A|$B|$(pwd)"'], env={"A": "x y", "B": "$(id)"}, cwd="/tmp")
    assert r.stdout == b"x y|$(id)|/tmp\n"
    r = ex(b, ref, ["/no/such/cmd"])
    assert r.exit_code == 127


def test_timeout_kills(sandbox):
    b, ref = sandbox
    r = ex(b, ref, ["sh", "-c", "echo start; sleep 30"], timeout=1.5)
    assert r.timed_out and r.exit_code == 124


def test_files_round_trip(sandbox):
    b, ref = sandbox
    data = os.urandom(300_000)

    async def go():
        try:
            n = await b.write_file(ref, "/workspace/sub dir/f'il\"e.bin", data, mode=0o600)
            got = b"".join([c async for c in b.read_file(ref, "/workspace/sub dir/f'il\"e.bin")])
            mode = await b.exec(ref, ExecRequest(["stat", "-c", "%a", "/workspace/sub dir/f'il\"e.bin"]))
            with pytest.raises(NotFound):
                [c async for c in b.read_file(ref, "/workspace/missing")]
            return n, got, mode.stdout.strip()
        finally:
            await b.aclose()

    n, got, mode = run(go())
    assert n == len(data) and got == data and mode == b"600"


def test_lifecycle_stop_start_remove_and_policy_first(kube):
    calls: list[tuple[str, str]] = []
    b = KubernetesBackend(kube.options())
    b.on_request = lambda m, p: calls.append((m, p))
    sid = new_id("life")

    async def go():
        try:
            ref = await b.create(spec(), sandbox_id=sid, owner=current_owner())
            posts = [p for m, p in calls if m == "POST"]
            assert posts[0].endswith("/networkpolicies") and posts[1].endswith("/pods")
            npol = await b._api().request("GET", b._path("networkpolicies", ref.handle["pod"]))
            assert npol["spec"]["policyTypes"] == ["Ingress", "Egress"] and npol["spec"]["egress"] == []
            await b.start(ref)
            assert await b.status(ref) == "running"
            r = await b.exec(ref, ExecRequest(["sh", "-c", "id -u; cat /proc/self/status | grep CapEff"]))
            assert r.stdout.split(b"\n")[0] == b"1000" and b"0000000000000000" in r.stdout
            if kube.emulator is not None:  # the emulator gives a deny-egress pod no network at all
                r = await b.exec(ref, ExecRequest(["ls", "/sys/class/net"]))
                assert r.stdout.split() == [b"lo"]
            assert sid in {i.id for i in await b.list()}
            await stop_start_remove(b, ref)
        finally:
            await b.aclose()

    run(go())


def _validate(obj: dict) -> None:
    """The real Kubernetes OpenAPI schema, strict (unknown fields are errors)."""
    from .test_deploy_manifests import validate

    validate(obj)


def test_open_network_maps_to_networkpolicy_without_metadata_or_cluster(kube):
    """Open mode: egress to every address except metadata, link-local, loopback, multicast and the cluster's
    ranges, plus DNS to kube-dns; ingress denied. The object the cluster (or emulator) stored is checked
    against the real schema."""
    b = KubernetesBackend(kube.options(cluster_cidrs="10.0.0.0/8,172.16.0.0/12,fd00:10::/64"))

    async def go():
        try:
            ref = await b.create(spec(network=True), sandbox_id=new_id("net"), owner=current_owner())
            npol = await b._api().request("GET", b._path("networkpolicies", ref.handle["pod"]))
            await b.remove(ref)
            return npol
        finally:
            await b.aclose()

    npol = run(go())
    for k in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
        npol["metadata"].pop(k, None)
    npol.pop("status", None)
    _validate(npol)
    sp = npol["spec"]
    assert sp["policyTypes"] == ["Ingress", "Egress"] and sp["ingress"] == []
    v4, v6 = (r["ipBlock"] for r in sp["egress"][0]["to"])
    assert v4["cidr"] == "0.0.0.0/0" and v6["cidr"] == "::/0"
    for net in ("169.254.0.0/16", "168.63.129.16/32", "100.100.100.200/32", "127.0.0.0/8", "10.0.0.0/8",
                "172.16.0.0/12"):
        assert net in v4["except"], v4
    assert "fd00:ec2::254/128" in v6["except"] and "fe80::/10" in v6["except"] and "fd00:10::/64" in v6["except"]
    assert "192.168.0.0/16" not in v4["except"]  # cluster_cidrs replaces the default private ranges
    dns = sp["egress"][1]
    assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_network_policy_objects_validate_for_every_mode():
    """The mapping itself, per mode, against the real schema (no cluster needed); allowlist has none."""
    from agentkernel.backends import _kube_manifest as km

    for mode, settings in (("none", {}), ("open", {}), ("open", {"cluster_cidrs": []})):
        obj = km.network_policy(name="ak-x", namespace="agentkernel", mode=mode, labels={"a": "b"},
                                settings=settings)
        _validate(obj)
    assert km.network_policy(name="ak-x", namespace="ns", mode="none", labels={})["spec"]["egress"] == []
    default = km.egress_rules("open", {})[0]["to"][0]["ipBlock"]["except"]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"} <= set(default)
    assert km.egress_rules("allowlist", {}) is None
    with pytest.raises(ValueError, match="allowlist"):
        km.network_policy(name="ak-x", namespace="ns", mode="allowlist", labels={})


def test_allowlist_and_secrets_refused_with_the_reason(kube):
    from agentkernel.errors import ConfigError, PolicyNotEnforceable

    b = KubernetesBackend(kube.options())
    for pol in ({"network": True, "network_allow": ["api.example.com"]},):
        with pytest.raises(PolicyNotEnforceable, match="network_allowlist") as ei:
            b.check(spec(**pol))
        assert "NetworkPolicy cannot name hosts" in (ei.value.hint or "")
    with pytest.raises(ConfigError, match="cluster_cidrs"):
        KubernetesBackend(kube.options(cluster_cidrs="10.0.0.1/8"))

def test_readiness_errors_are_clear(kube):
    def attempt(s, **opts):
        run(create_and_start(KubernetesBackend(kube.options(ready_timeout_s="60", **opts)), s))

    s = SandboxSpec(backend="kubernetes", image="agentkernel/no-such-image", resources=Resources(pids=None))
    with pytest.raises(SandboxError, match="image cannot be pulled"):
        attempt(s)
    with pytest.raises(SandboxError, match="cannot be scheduled"):
        attempt(spec(), node_selector="agentkernel.test/none=here")


def test_streaming_output_and_streamed_stdin(sandbox):
    """Output reaches on_output while the command still runs; stdin can be an async stream (v5 closes it)."""
    b, ref = sandbox
    seen: list[tuple[float, int, bytes]] = []

    async def feed():
        for part in (b"one ", b"two ", b"three"):
            yield part
            await asyncio.sleep(0.05)

    async def go():
        try:
            t0 = asyncio.get_running_loop().time()

            def on_output(fd: int, data: bytes) -> None:
                seen.append((asyncio.get_running_loop().time() - t0, fd, data))

            r = await b.exec(ref, ExecRequest(["sh", "-c", "echo first; sleep 1.5; cat; echo; echo last >&2"],
                                              on_output=on_output, stdin=feed()))
            return r, asyncio.get_running_loop().time() - t0
        finally:
            await b.aclose()

    r, total = run(go())
    assert r.exit_code == 0 and r.stdout == b""  # streamed, not kept
    out = b"".join(d for _, fd, d in seen if fd == 1)
    assert out == b"first\none two three\n" and b"".join(d for _, fd, d in seen if fd == 2) == b"last\n"
    first = next(t for t, fd, d in seen if fd == 1 and d.startswith(b"first"))
    assert first < total - 1.0  # arrived before the command finished


def test_timeout_kills_the_tree_signals_and_oom(sandbox):
    b, ref = sandbox

    async def go():
        try:
            r = await b.exec(ref, ExecRequest(["sh", "-c", "sleep 60 & echo $! > /tmp/bg; sleep 60"], timeout=1.0))
            assert r.timed_out and r.exit_code == 124
            alive = "kill -0 $(cat /tmp/bg) 2>/dev/null && echo alive || echo dead"
            r = await b.exec(ref, ExecRequest(["sh", "-c", alive]))
            assert r.stdout == b"dead\n"  # the background child went with the command
            r = await b.exec(ref, ExecRequest(["sh", "-c", "cat; kill -TERM $$"], stdin=b"x", timeout=30))
            assert (r.exit_code, r.signal, r.stdout) == (143, 15, b"x")
            r = await b.exec(ref, ExecRequest(["sh", "-c", "a=xxxxxxxxxxxxxxxx; while :; do a=$a$a; done"]))
            assert (r.exit_code, r.oom_killed) == (137, True)  # memory limit 128 MiB
            r = await b.exec(ref, ExecRequest(["sh", "-c", "kill -KILL $$"]))
            assert (r.exit_code, r.signal, r.oom_killed) == (137, 9, False)
        finally:
            await b.aclose()

    run(go())
