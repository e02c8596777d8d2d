"""Fixtures for the image tests: a real registry on loopback (TLS with a throw-away CA, htpasswd auth),
filled with skopeo from the engines' local images; each test gets its own HOME (credentials), oci cache
and a clean-up of every image it pulled into podman or docker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from loopback_registry import LoopbackRegistry

BUSYBOX = "containers-storage:localhost/agentkernel/busybox:latest"


def _require(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        msg = f"not installed: {', '.join(missing)} (bash scripts/setup.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def docker_ok() -> bool:
    return subprocess.run(["docker", "version"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def registry():
    _require("docker-registry", "skopeo", "podman", "openssl")
    with LoopbackRegistry() as r:
        r.digests = {"busybox": r.push(BUSYBOX, "library/busybox:1")}
        r.push(BUSYBOX, "library/alpine:3.20")
        yield r


@pytest.fixture
def fresh_registry():
    """A registry of the test's own (for tests that break or stop it)."""
    _require("docker-registry", "skopeo", "podman", "openssl")
    r = LoopbackRegistry()
    r.start()
    try:
        yield r
    finally:
        r.stop()


class Env:
    def __init__(self, root: str) -> None:
        self.root = root
        self.home = os.path.join(root, "home")
        self.cache = os.path.join(root, "cache")
        os.makedirs(self.home)
        self.vars = {"HOME": self.home, "AGENTKERNEL_CACHE": self.cache, "AGENTKERNEL_NO_DAEMON": "1",
                     "XDG_RUNTIME_DIR": os.path.join(root, "xdg")}
        os.makedirs(self.vars["XDG_RUNTIME_DIR"])
        for k in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "AGENTKERNEL_REGISTRY", "AGENTKERNEL_PULL",
                  "AGENTKERNEL_IMAGE", "AGENTKERNEL_BACKEND", "AGENTKERNEL_INSECURE_REGISTRIES"):
            self.vars[k] = ""
        self.pulled: list[str] = []

    def login(self, reg: LoopbackRegistry, where: str = "docker") -> str:
        path = {"docker": os.path.join(self.home, ".docker", "config.json"),
                "containers": os.path.join(self.home, ".config", "containers", "auth.json")}.get(where, where)
        return reg.auth_file(path)

    def ak(self, *args: str, timeout: float = 120, cwd: str | None = None, **extra: str):
        env = dict(os.environ)
        env.update(self.vars)
        env.update(extra)
        for k in [k for k, v in env.items() if v == ""]:
            del env[k]
        return subprocess.run([sys.executable, "-m", "agentkernel", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd or self.root, stdin=subprocess.DEVNULL)

    def track(self, *images: str) -> None:
        self.pulled.extend(images)

    def cleanup(self) -> None:
        engines = ["podman", "docker"] if docker_ok() else ["podman"]
        for engine in engines:
            keep = _local_image_ids(engine)
            for img in self.pulled:
                # a pull of an image pushed from our local busybox has the same image ID: `rmi -f` of the
                # pulled name would delete agentkernel/busybox itself, so such an image only loses that name
                iid = _image_id(engine, img)
                if iid is None:
                    continue
                if iid in keep:
                    subprocess.run([engine, "rmi", img], capture_output=True)
                else:
                    subprocess.run([engine, "rmi", "-f", img], capture_output=True)


def _image_id(engine: str, ref: str) -> str | None:
    r = subprocess.run([engine, "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return r.stdout.strip().removeprefix("sha256:") if r.returncode == 0 and r.stdout.strip() else None


def _local_image_ids(engine: str) -> set[str]:
    """IDs of the images setup made (agentkernel/*), which no test cleanup may delete."""
    ids = set()
    for name in ("agentkernel/busybox", "agentkernel/debian"):
        iid = _image_id(engine, name)
        if iid:
            ids.add(iid)
    return ids


@pytest.fixture
def env():
    root = tempfile.mkdtemp(prefix="ak-img-")
    e = Env(root)
    try:
        yield e
    finally:
        e.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["oci", "podman", "docker"])
def backend(request):
    if request.param == "docker" and not docker_ok():
        if os.environ.get("CI") == "true":
            pytest.fail("dockerd is not running")
        pytest.skip("dockerd is not running")
    return request.param


def oci_leftovers(cache: str) -> list[str]:
    """Temporaries left in an oci cache (there must be none after any pull, failed or not)."""
    out = []
    for sub in ("oci/blobs/sha256", "oci/rootfs"):
        d = os.path.join(cache, sub)
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in os.listdir(d) if n.startswith(".tmp-")]
    return out


def oci_refs(cache: str) -> dict:
    import json

    try:
        with open(os.path.join(cache, "oci", "refs.json")) as f:
            return json.load(f)
    except OSError:
        return {}
