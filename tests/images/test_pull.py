"""Pulling from a real registry on loopback through podman, docker and the oci backend's own client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from conftest import BUSYBOX, docker_ok, oci_leftovers, oci_refs
from loopback_registry import busybox_entries, push_layers, tar_bytes

FAKE_DIGEST = "sha256:" + "ab" * 32


def present(backend: str, image: str, cache: str) -> bool:
    if backend == "podman":
        return subprocess.run(["podman", "image", "exists", image]).returncode == 0
    if backend == "docker":
        return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    return image in oci_refs(cache)


def test_pull_by_tag_and_digest_with_credentials(registry, env, backend):
    env.login(registry)
    tag_ref = registry.ref("library/busybox:1")
    dig_ref = registry.ref(f"library/busybox@{registry.digests['busybox']}")
    env.track(tag_ref, dig_ref)
    r = env.ak("run", "-B", backend, "-i", tag_ref, "--", "echo", f"tag-{backend}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"tag-{backend}\n"
    r = env.ak("run", "-B", backend, "-i", dig_ref, "--", "echo", f"digest-{backend}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"digest-{backend}\n"
    assert present(backend, tag_ref, env.cache)
    if backend == "oci":
        assert oci_refs(env.cache)[dig_ref]["digest"] == registry.digests["busybox"]
        assert not oci_leftovers(env.cache)


def test_refused_without_credentials(registry, env, backend):
    ref = registry.ref("library/busybox:1")
    env.track(ref)
    r = env.ak("images", "pull", "-B", backend, ref)
    assert r.returncode == 125
    assert "refused" in r.stderr or "requires credentials" in r.stderr, r.stderr
    assert "log in" in r.stderr  # the hint
    assert not present(backend, ref, env.cache)


def test_wrong_credentials_refused(registry, env, backend):
    import base64
    import json

    path = os.path.join(env.home, ".docker", "config.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"auths": {registry.host: {"auth": base64.b64encode(b"akuser:wrong").decode()}}}, f)
    ref = registry.ref("library/busybox:1")
    env.track(ref)
    r = env.ak("images", "pull", "-B", backend, ref)
    assert r.returncode == 125
    assert "refused" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "containers"])
def test_credentials_from_each_place(registry, env, where):
    ref = registry.ref("library/busybox:1")
    if where == "REGISTRY_AUTH_FILE":
        extra = {"REGISTRY_AUTH_FILE": env.login(registry, os.path.join(env.root, "auth", "auth.json"))}
    elif where == "DOCKER_CONFIG":
        env.login(registry, os.path.join(env.root, "dockercfg", "config.json"))
        extra = {"DOCKER_CONFIG": os.path.join(env.root, "dockercfg")}
    else:
        env.login(registry, "containers")
        extra = {}
    r = env.ak("images", "pull", "-B", "oci", ref, **extra)
    assert r.returncode == 0, r.stderr


def test_missing_tag_and_unknown_image(registry, env, backend):
    env.login(registry)
    missing_tag = registry.ref("library/busybox:no-such-tag")
    unknown = registry.ref("library/no-such-image:1")
    env.track(missing_tag, unknown)
    r = env.ak("images", "pull", "-B", backend, missing_tag)
    assert r.returncode == 125
    assert "no-such-tag not found" in r.stderr and "tags: 1" in r.stderr, r.stderr
    r = env.ak("images", "pull", "-B", backend, unknown)
    assert r.returncode == 125
    assert "does not exist" in r.stderr, r.stderr


def test_wrong_digest_refused(registry, env, backend):
    env.login(registry)
    ref = registry.ref(f"library/busybox@{FAKE_DIGEST}")
    env.track(ref)
    r = env.ak("run", "-B", backend, "-i", ref, "--", "echo", "never")
    assert r.returncode == 125
    assert "never" not in r.stdout
    assert "not found" in r.stderr, r.stderr
    if backend == "oci":
        assert not oci_leftovers(env.cache) and ref not in oci_refs(env.cache)


def _tamper_blob(reg, digest: str) -> None:
    hx = digest.split(":")[1]
    path = os.path.join(reg.dir, "data", "docker", "registry", "v2", "blobs", "sha256", hx[:2], hx, "data")
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))


def test_content_not_matching_its_digest_refused(fresh_registry, env):
    """The registry serves a layer whose bytes do not match the manifest's digest: refused, nothing kept."""
    import json

    reg = fresh_registry
    push_layers(reg, "library/tampered:1", [tar_bytes(busybox_entries(200_000))])
    env.login(reg)
    out = subprocess.run(["skopeo", "inspect", "--raw", f"--creds={reg.user}:{reg.password}",
                          f"docker://{reg.ref('library/tampered:1')}"], capture_output=True, text=True, check=True)
    layer = json.loads(out.stdout)["layers"][0]["digest"]
    _tamper_blob(reg, layer)
    ref = reg.ref("library/tampered:1")
    env.track(ref)
    r = env.ak("images", "pull", "-B", "oci", ref)
    assert r.returncode == 125
    assert "digest" in r.stderr, r.stderr
    assert not oci_leftovers(env.cache) and ref not in oci_refs(env.cache)
    blobs = os.path.join(env.cache, "oci", "blobs", "sha256")
    assert layer.split(":")[1] not in os.listdir(blobs)
    r = env.ak("images", "pull", "-B", "podman", ref)
    assert r.returncode == 125 and not present("podman", ref, env.cache), r.stderr


class CuttingProxy:
    """A TCP proxy on loopback that drops every connection once ``limit`` bytes went to the client:
    the registry disappearing mid-download. ``limit = None`` passes everything."""

    def __init__(self, target_port: int, limit: int | None) -> None:
        self.target_port, self.limit = target_port, limit
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.cut = 0
        self._sent = [0]  # bytes to clients over all connections
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        if self.cut and self.limit is not None:  # the registry is gone: every later connection too
            c.close()
            return
        try:
            u = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            c.close()
            return
        sent = self._sent

        def pump(src, dst, count: bool) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if count and self.limit is not None and sent[0] + len(data) > self.limit:
                        dst.sendall(data[: max(0, self.limit - sent[0])])
                        self.cut += 1
                        break
                    dst.sendall(data)
                    if count:
                        sent[0] += len(data)
            except OSError:
                pass
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(c, u, False), daemon=True).start()
        pump(u, c, True)
        c.close()
        u.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_registry_gone_mid_pull_leaves_nothing_and_next_pull_succeeds(backend, env):
    """Plain-HTTP registry (configured insecure), reached through a proxy that dies after 300 kB."""
    from loopback_registry import LoopbackRegistry

    with LoopbackRegistry(tls=False, auth=False) as reg:
        push_layers(reg, "library/busybox:1", [tar_bytes(busybox_entries(1_000_000))])  # no engine has it
        proxy = CuttingProxy(reg.port, limit=500_000)
        host = f"127.0.0.1:{proxy.port}"
        ref = f"{host}/library/busybox:1"
        env.track(ref)
        try:
            r = env.ak("images", "pull", "-B", backend, ref, AGENTKERNEL_INSECURE_REGISTRIES=host)
            assert r.returncode == 125, r.stderr
            assert proxy.cut >= 1
            assert not present(backend, ref, env.cache)
            if backend == "oci":
                assert "connection lost" in r.stderr or "ended after" in r.stderr or "unreachable" in r.stderr, \
                    r.stderr
                assert not oci_leftovers(env.cache)
                blobs = os.path.join(env.cache, "oci", "blobs", "sha256")
                assert all(not n.startswith(".tmp") for n in os.listdir(blobs))
            proxy.limit, proxy.cut = None, 0
            r = env.ak("run", "-B", backend, "-i", ref, "--", "echo", "second-try",
                       AGENTKERNEL_INSECURE_REGISTRIES=host)
            assert r.returncode == 0, r.stderr
            assert r.stdout == "second-try\n"
        finally:
            proxy.close()


def test_concurrent_pulls_download_once(fresh_registry, env, backend):
    reg = fresh_registry
    push_layers(reg, "library/busybox:1", [tar_bytes(busybox_entries(300_000))])  # layers no engine has
    env.login(reg)
    ref = reg.ref("library/busybox:1")
    env.track(ref)
    before = reg.blob_gets()
    procs = []
    for _ in range(2):
        e = dict(os.environ)
        e.update({k: v for k, v in env.vars.items() if v})
        for k in [k for k, v in env.vars.items() if not v]:
            e.pop(k, None)
        procs.append(subprocess.Popen([__import__("sys").executable, "-m", "agentkernel", "run", "-B", backend,
                                       "-i", ref, "--", "echo", "ok"], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=env.root))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out == "ok\n"
    time.sleep(0.2)  # the access log line is written after the response
    # one image: a config blob + one layer blob, each fetched once in all
    assert reg.blob_gets() - before == 2, reg.read_log()[-3000:]


def test_pull_policy_never_and_always(registry, env):
    env.login(registry)
    ref = registry.ref("library/busybox:1")
    r = env.ak("run", "-B", "oci", "--pull", "never", "-i", ref, "--", "echo", "x")
    assert r.returncode == 125 and "pull policy is 'never'" in r.stderr, r.stderr
    r = env.ak("run", "-B", "oci", "-i", ref, "--", "echo", "x")
    assert r.returncode == 0, r.stderr
    gets = registry.blob_gets()
    manifests = registry.read_log().count('"GET /v2/library/busybox/manifests/1 ')
    r = env.ak("run", "-B", "oci", "--pull", "always", "-i", ref, "--", "echo", "y", AGENTKERNEL_PULL="never")
    assert r.returncode == 0 and r.stdout == "y\n", r.stderr
    time.sleep(0.2)
    assert registry.read_log().count('"GET /v2/library/busybox/manifests/1 ') > manifests  # asked again
    assert registry.blob_gets() == gets  # nothing downloaded again: unchanged
    r = env.ak("run", "-B", "oci", "-i", ref, "--", "echo", "z", AGENTKERNEL_PULL="never")
    assert r.returncode == 0, r.stderr  # present now: never is fine


def test_untrusted_tls_refused_unless_configured(env):
    """A self-signed registry whose CA is not trusted: refused; listed as insecure: pulled."""
    from loopback_registry import LoopbackRegistry

    with LoopbackRegistry(tls=True, auth=False, trust_ca=False) as reg:
        reg.push(BUSYBOX, "library/busybox:1")
        ref = reg.ref("library/busybox:1")
        env.track(ref)
        for backend in ("oci", "podman"):
            r = env.ak("images", "pull", "-B", backend, ref)
            assert r.returncode == 125 and ("certificate" in r.stderr or "x509" in r.stderr), r.stderr
            r = env.ak("images", "pull", "-B", backend, ref, AGENTKERNEL_INSECURE_REGISTRIES=reg.host)
            assert r.returncode == 0, r.stderr


def test_disk_full_leaves_nothing(registry, env):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = os.path.join(env.root, "small")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", small], check=True)
    try:
        env.login(registry)
        r = env.ak("images", "pull", "-B", "oci", registry.ref("library/busybox:1"), AGENTKERNEL_CACHE=small)
        assert r.returncode == 125
        assert "no space left" in r.stderr, r.stderr
        assert not oci_leftovers(small)
    finally:
        subprocess.run(["umount", small], check=True)


def test_images_list_rm_prune(registry, env):
    env.login(registry)
    ref = registry.ref("library/busybox:1")
    env.track(ref)
    for backend in ("oci", "podman"):
        assert env.ak("images", "pull", "-B", backend, ref).returncode == 0
    r = env.ak("images", "list")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(ref))
    assert "oci" in line and "podman" in line and "MB" in line
    assert env.ak("images", "rm", "-B", "oci", ref).returncode == 0
    r = env.ak("images", "prune")
    assert r.returncode == 0 and r.stdout == "", r.stdout  # younger than an hour: kept
    r = env.ak("images", "prune", "--older-than", "0")
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout and "blobs" in r.stdout
    assert os.listdir(os.path.join(env.cache, "oci", "blobs", "sha256")) == []
    r = env.ak("images", "list", "--json")
    import json

    row = next(x for x in json.loads(r.stdout) if x["name"] == ref)
    assert set(row["stores"]) == {"podman"}
    if docker_ok():
        assert shutil.which("docker")


def test_progress_on_a_terminal_quiet_otherwise(fresh_registry, env):
    import pty
    import sys

    reg = fresh_registry
    push_layers(reg, "library/progress:1", [tar_bytes(busybox_entries(2_000_000))])
    env.login(reg)
    ref = reg.ref("library/progress:1")
    r = env.ak("images", "pull", "-B", "oci", ref)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""  # not a terminal: quiet
    e = dict(os.environ)
    e.update({k: v for k, v in env.vars.items() if v})
    e["AGENTKERNEL_CACHE"] = os.path.join(env.root, "cache2")
    for k in [k for k, v in env.vars.items() if not v]:
        e.pop(k, None)
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "agentkernel", "images", "pull", "-B", "oci", ref], env=e,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=env.root)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "layers 0/1" in text and "MB/s" in text and f"pulled {ref}" in text, text


@pytest.mark.parametrize("backend", ["gvisor", "gvisor-docker"])
def test_gvisor_backends_pull_into_their_engine(registry, env, backend):
    if backend == "gvisor-docker" and not docker_ok():
        pytest.fail("dockerd is not running") if os.environ.get("CI") == "true" else pytest.skip("no dockerd")
    env.login(registry)
    ref = registry.ref("library/busybox:1")
    env.track(ref)
    r = env.ak("run", "-B", backend, "-i", ref, "--", "echo", f"hi-{backend}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"hi-{backend}\n"
