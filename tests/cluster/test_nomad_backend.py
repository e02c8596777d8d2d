"""The nomad backend end to end: against the emulator here (ACL token required), unchanged against a
real Nomad when NOMAD_ADDR is set. Lifecycle, exec over the allocation exec websocket, files as tar
streams, job shape, placement and driver errors, pools by parameterized dispatch with CAS claims."""

from __future__ import annotations

import asyncio
import os

import pytest

from agentkernel.backends.base import ExecRequest
from agentkernel.backends.nomad import NomadBackend
from agentkernel.errors import NotFound, SandboxError
from agentkernel.owner import current_owner, new_id
from agentkernel.spec import Policy, Resources, SandboxSpec

from .conftest import IMAGE, create_and_start, stop_start_remove

pytestmark = [pytest.mark.wire, pytest.mark.timeout(180)]

EXIT_CODES = list(range(256)) if os.environ.get("AGENTKERNEL_TEST_ALL_EXIT_CODES") else \
    [0, 1, 2, 42, 125, 126, 127, 128, 137, 255]


def spec(**policy) -> SandboxSpec:
    return SandboxSpec(backend="nomad", image=IMAGE, resources=Resources(memory_mb=64, vcpus=0.5),
                       policy=Policy(**policy))


def test_lifecycle_exec_files(nomad):
    b = NomadBackend(nomad.options())
    sid = new_id("nl")

    async def go():
        try:
            ref = await b.create(spec(), sandbox_id=sid, owner=current_owner())
            job, _ = await b._api().request("GET", f"/v1/job/{ref.handle['job']}")
            task = job["TaskGroups"][0]["Tasks"][0]
            assert task["Config"]["cap_drop"] == ["ALL"] and task["Config"]["network_mode"] == "none"
            assert job["TaskGroups"][0]["Networks"] == [{"Mode": "none"}] or \
                job["TaskGroups"][0]["Networks"][0]["Mode"] == "none"
            await b.start(ref)
            assert await b.status(ref) == "running"
            codes = [(await b.exec(ref, ExecRequest(["sh", "-c", 'exit "$1"', "sh", str(c)]))).exit_code
                     for c in EXIT_CODES]
            assert codes == EXIT_CODES
            blob = bytes(range(256)) * 512
            r = await b.exec(ref, ExecRequest(["cat"], stdin=blob))
            assert r.stdout == blob
            r = await b.exec(ref, ExecRequest(["wc", "-c"]))
            assert r.stdout.strip() == b"0"
            r = await b.exec(ref, ExecRequest(["sh", "-c", 'printf "$A\\0"; echo e >&2; id -u; exit 5'],
                                              env={"A": "v w"}))
            assert (r.exit_code, r.stdout, r.stderr) == (5, b"v w\0001000\n", b"e\n")
            r = await b.exec(ref, ExecRequest(["sleep", "30"], timeout=1))
            assert r.timed_out and r.exit_code == 124
            data = os.urandom(100_000)
            await b.write_file(ref, "/workspace/a b/c.bin", data, mode=0o640)
            assert b"".join([c async for c in b.read_file(ref, "/workspace/a b/c.bin")]) == data
            with pytest.raises(NotFound):
                [c async for c in b.read_file(ref, "/workspace/nope")]
            assert sid in {i.id for i in await b.list()}
            await stop_start_remove(b, ref)
        finally:
            await b.aclose()

    asyncio.run(go())


def test_start_errors_are_clear(nomad):
    def attempt(s, **opts):
        asyncio.run(create_and_start(NomadBackend(nomad.options(ready_timeout_s="30", **opts)), s))

    with pytest.raises(SandboxError, match="Failed to pull"):
        attempt(SandboxSpec(backend="nomad", image="agentkernel/no-such-image"))
    with pytest.raises(SandboxError, match="cannot place"):
        attempt(spec(), nomad_datacenter="no-such-dc")


def test_acl_token_required(nomad):
    if nomad.emulator is None and not nomad.token:
        pytest.skip("the configured Nomad has no ACLs")
    opts = nomad.options()
    opts["nomad_token"] = "wrong-token"

    async def go():
        b = NomadBackend(opts)
        try:
            await b.list()
        finally:
            await b.aclose()

    with pytest.raises(SandboxError, match="403"):
        asyncio.run(go())


def test_pool_dispatch_and_claim_race(nomad):
    s = SandboxSpec(backend="nomad", image=IMAGE, resources=Resources(memory_mb=64), env={"P": new_id("np")})

    async def go():
        filler = NomadBackend(nomad.options())
        assert await filler.fill_pool(s, 2) == 2
        backends = [NomadBackend(nomad.options()) for _ in range(8)]
        refs = await asyncio.gather(*(b.claim(s, sandbox_id=new_id("nc"), owner=current_owner()) for b in backends))
        won = [r for r in refs if r is not None]
        assert len(won) == 2 and len({r.handle["job"] for r in won}) == 2
        await filler.start(won[0])
        r = await filler.exec(won[0], ExecRequest(["sh", "-c", "echo $P"]))
        assert r.stdout.strip() == s.env["P"].encode()
        assert won[0].id in {i.id for i in await filler.list()}  # listed under its claimer
        for ref in won:
            await filler.remove(ref)
        await filler._api().request("DELETE", f"/v1/job/{filler._pool_job(s)}", params={"purge": "true"})
        for b in [*backends, filler]:
            await b.aclose()

    asyncio.run(go())


def test_network_open_and_allowlist_refused_fail_closed(nomad):
    """Nomad's networks filter no egress: open and allowlist are refused with the reason, nothing is created."""
    from agentkernel.errors import PolicyNotEnforceable

    b = NomadBackend(nomad.options())
    for pol, ctl in (({"network": True}, "network_full"),
                     ({"network": True, "network_allow": ["api.example.com"]}, "network_allowlist"),
                     ({"network": True, "network_allow": ["api.example.com"],
                       "secrets": ["TOKEN:api.example.com"]}, "secret_injection")):
        s = SandboxSpec(backend="nomad", image=IMAGE, policy=Policy(**pol))
        with pytest.raises(PolicyNotEnforceable, match=ctl) as ei:
            b.check(s)
        assert "filter no egress" in (ei.value.hint or "")
        assert "no NetworkPolicy to fence a task to an egress gateway" in ei.value.hint
        assert "connecting to an IP" in ei.value.hint
