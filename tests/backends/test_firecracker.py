"""The ``firecracker`` backend against the real Firecracker binary.

Everywhere: the VMM starts and accepts the whole machine configuration through its real API, and on a
host without hardware KVM (this project's PVM machines) ``create`` refuses at once with the probe's
reason. Where the KVM probe passes (and a Firecracker-ready kernel is given with
AGENTKERNEL_FC_KERNEL), the end-to-end tests boot real guests.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from agentkernel import owner
from agentkernel.backends import get_backend
from agentkernel.backends.base import ExecRequest, SandboxRef
from agentkernel.backends.firecracker import (
    VMM,
    FirecrackerBackend,
    find_binary,
    machine_config,
    memory_snapshot_dir,
    sandboxes_dir,
)
from agentkernel.errors import BackendUnavailable, ConfigError
from agentkernel.spec import SandboxSpec
from agentkernel.vm import guestimage, kvmprobe
from tests.conftest import need

pytestmark = [pytest.mark.engine("firecracker"), pytest.mark.timeout(120)]

SPEC = SandboxSpec(backend="firecracker", image="agentkernel/busybox")


@pytest.fixture(scope="module")
def binary():
    exe = find_binary()
    need(exe is not None, "no firecracker binary (AGENTKERNEL_SETUP_FIRECRACKER=1 bash scripts/setup.sh)")
    return exe


def test_vmm_accepts_the_full_configuration(binary, tmp_path):
    g = guestimage.build(SPEC.image, quiet=True)
    kernel = guestimage.ensure_vmlinux(g["kernel"])
    with open(kernel, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    (tmp_path / "rootfs.ext4").write_bytes(b"")
    spec = SPEC.replace(resources=SPEC.resources.replace(vcpus=2, memory_mb=300))
    cfg = machine_config(spec, kernel=kernel, initrd=g["initramfs"]["path"])

    async def go():
        vmm = VMM(str(tmp_path), binary)
        try:
            api_ms = await vmm.spawn()
            await vmm.configure(cfg)
            return api_ms, await vmm.config()
        finally:
            await vmm.kill()

    api_ms, got = asyncio.run(go())
    assert api_ms < 5000
    assert got["machine-config"]["vcpu_count"] == 2 and got["machine-config"]["mem_size_mib"] == 300
    assert got["boot-source"]["kernel_image_path"] == kernel
    assert got["boot-source"]["initrd_path"] == g["initramfs"]["path"]
    args = got["boot-source"]["boot_args"]
    assert "i8042.nokbd i8042.noaux" in args and "--vsock 52000" in args and "--user 1000:1000" in args
    assert got["drives"][0]["drive_id"] == "rootfs" and got["drives"][0]["is_root_device"]
    assert got["vsock"] == {"guest_cid": 3, "uds_path": "v.sock"}
    assert got["network-interfaces"] == []


def test_jailed_vmm_accepts_the_configuration_with_files_in_its_chroot(binary, tmp_path):
    jailer = find_binary("jailer")
    need(jailer is not None, "no jailer binary next to firecracker")
    g = guestimage.build(SPEC.image, quiet=True)
    kernel = guestimage.ensure_vmlinux(g["kernel"])
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"")

    async def go():
        vmm = VMM(str(tmp_path), binary, jailer=jailer, sandbox_id="tf-jail-1")
        try:
            await vmm.spawn()
            k, i, d = vmm.stage(kernel, g["initramfs"]["path"], str(disk))
            await vmm.configure(machine_config(SPEC, kernel=k, initrd=i, disk=d))
            return vmm.root, await vmm.config()
        finally:
            await vmm.kill()

    root, got = asyncio.run(go())
    assert root.startswith(str(tmp_path / "jail")) and os.path.isfile(os.path.join(root, "vmlinux"))
    assert got["boot-source"]["kernel_image_path"] == "vmlinux"  # relative to the chroot
    assert os.stat(os.path.join(root, "rootfs.ext4")).st_uid == 65534


def test_api_rejects_a_bad_configuration_clearly(binary, tmp_path):
    from agentkernel.backends.firecracker import api_ok
    from agentkernel.errors import SandboxError

    async def go():
        vmm = VMM(str(tmp_path), binary)
        try:
            await vmm.spawn()
            with pytest.raises(SandboxError, match="machine-config"):
                await api_ok(vmm.sock, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
        finally:
            await vmm.kill()

    asyncio.run(go())


def test_create_fails_fast_without_hardware_kvm():
    v = kvmprobe.probe()
    if v.ok:
        pytest.skip("this host has hardware KVM: see the end-to-end tests")
    b = get_backend("firecracker")
    t = time.perf_counter()
    with pytest.raises(BackendUnavailable) as exc:
        asyncio.run(b.create(SPEC, sandbox_id=owner.new_id("tf"), owner=owner.current_owner()))
    ms = (time.perf_counter() - t) * 1e3
    assert ms < 500, ms
    assert v.reason in str(exc.value)
    assert not FirecrackerBackend.probe().available
    assert os.listdir(sandboxes_dir()) == []


def test_memory_snapshots_fail_fast_without_hardware_kvm():
    """The API's snapshot routes on firecracker (take = ``take_memory_snapshot``, restore = a sandbox with
    option ``restore=<id>``) refuse at once with the probe's reason, making nothing."""
    v = kvmprobe.probe()
    if v.ok:
        pytest.skip("this host has hardware KVM: see the end-to-end tests")
    snaps = os.path.dirname(memory_snapshot_dir("0" * 32))
    before = sorted(os.listdir(snaps))
    sid = owner.new_id("tf")
    ref = SandboxRef("firecracker", sid, {"dir": os.path.join(sandboxes_dir(), sid)}, SPEC)
    for call in (lambda: get_backend("firecracker").take_memory_snapshot(ref),
                 lambda: get_backend("firecracker", {"restore": "ab" * 16}).create(
                     SPEC, sandbox_id=sid, owner=owner.current_owner())):
        t = time.perf_counter()
        with pytest.raises(BackendUnavailable) as exc:
            asyncio.run(call())
        assert (time.perf_counter() - t) * 1e3 < 500
        assert v.reason in str(exc.value)
    assert sorted(os.listdir(snaps)) == before
    assert sid not in os.listdir(sandboxes_dir())
    with pytest.raises(ConfigError, match="snapshot id"):
        get_backend("firecracker", {"restore": "../x"})


# ---- end to end, where hardware KVM exists -------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(binary):
    v = kvmprobe.probe()
    if not v.ok:
        pytest.skip(f"no hardware KVM here: {v.reason}")
    kernel = os.environ.get("AGENTKERNEL_FC_KERNEL")
    need(bool(kernel), "AGENTKERNEL_FC_KERNEL: a vmlinux with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
    return get_backend("firecracker", {"kernel": kernel})


def test_e2e_run_exec_files(e2e):
    async def go():
        ref = await e2e.create(SPEC, sandbox_id=owner.new_id("tf"), owner=owner.current_owner())
        try:
            await e2e.start(ref)
            r = await e2e.exec(ref, ExecRequest(["sh", "-c", "echo hi; exit 3"]))
            assert (r.exit_code, r.stdout) == (3, b"hi\n")
            data = bytes(range(256)) * 100
            await e2e.write_file(ref, "/workspace/f", data)
            assert b"".join([c async for c in e2e.read_file(ref, "/workspace/f")]) == data
            r = await e2e.exec(ref, ExecRequest(["sleep", "30"], timeout=0.5))
            assert r.timed_out
        finally:
            await e2e.remove(ref)
        assert await e2e.status(ref) == "missing"

    asyncio.run(go())


def test_e2e_memory_snapshot_restore_outlives_the_snapshot(e2e):
    """take = the running VM's memory + devices + disk (it goes on running); restore = a new VM with the
    original's processes still running, re-seeded; deleting the snapshot leaves the copy bootable."""
    kernel = e2e.options["kernel"]

    async def sh(b, ref, script):
        return await b.exec(ref, ExecRequest(["sh", "-c", script]))

    async def go():
        src = await e2e.create(SPEC, sandbox_id=owner.new_id("tf"), owner=owner.current_owner())
        copy = None
        snap = None
        try:
            await e2e.start(src)
            await sh(e2e, src, "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/c.tmp; "
                               "mv /workspace/c.tmp /workspace/counter; sleep 0.1; done' >/dev/null 2>&1 </dev/null & "
                               "echo $! > /workspace/counter.pid; echo before > /workspace/mark")
            time.sleep(0.5)
            info = await e2e.take_memory_snapshot(src)
            snap = info["id"]
            assert info["state_bytes"] > 0 and info["disk_bytes"] > 0
            await sh(e2e, src, "echo after > /workspace/mark")
            restorer = get_backend("firecracker", {"kernel": kernel, "restore": snap})
            copy = await restorer.create(SPEC, sandbox_id=owner.new_id("tf"), owner=owner.current_owner())
            await restorer.start(copy)
            pid = (await sh(restorer, copy, "cat /workspace/counter.pid")).stdout.decode().strip()
            assert (await sh(restorer, copy, f"kill -0 {pid} && echo alive")).stdout == b"alive\n"
            assert (await sh(restorer, copy, "cat /workspace/mark")).stdout == b"before\n"
            assert (await sh(e2e, src, "cat /workspace/mark")).stdout == b"after\n"
            FirecrackerBackend.delete_memory_snapshot(snap)
            snap = None
            await restorer.stop(copy)
            await restorer.start(copy)  # a cold boot from the copy's own disk
            assert (await sh(restorer, copy, "cat /workspace/mark")).stdout == b"before\n"
        finally:
            if copy is not None:
                await e2e.remove(copy)
            await e2e.remove(src)
            if snap is not None:
                FirecrackerBackend.delete_memory_snapshot(snap)

    asyncio.run(go())
