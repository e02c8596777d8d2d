"""Make an image available to a backend, per the pull policy: the one entry point every caller uses
(CLI run/create, the API service, ``agentkernel images pull``).

- ``never``: use what is local; a missing image is an error naming the policy.
- ``missing`` (default): pull only when the backend's store lacks the image. The presence check reads the
  engine's own image index file (no engine round trip, no json import): ~1 ms on the run path.
- ``always``: ask the registry every time (an unchanged image is not downloaded again).

Which store a backend uses: its registry entry's ``image_store`` (podman and gVisor-on-podman: podman;
docker and gVisor-on-docker: docker; oci: its own rootfs cache, which may also unpack from podman's or
docker's store; backends without images: None).
"""

from __future__ import annotations

import os

from ..errors import NotFound
from ..resolvedspec import note, volatile
from .pullerrors import PullError

TYPE_CHECKING = False  # typing costs ~2 ms at start-up; annotations here are never evaluated
if TYPE_CHECKING:
    from collections.abc import Callable

_STORE_OF = {"podman": "podman", "gvisor": "podman", "gvisor-podman": "podman", "docker": "docker",
             "gvisor-docker": "docker", "oci": "oci"}


def store_of(backend: str, options: dict | None = None) -> str | None:
    """The image store ``backend`` (with ``options``) runs images from: its registry entry says."""
    try:
        from ..backends import entry

        return entry(backend, options).image_store
    except Exception:  # an unknown backend: the run reports it, with the known names
        return _STORE_OF.get(backend)


def spellings(image: str) -> set[str]:
    """Names one reference may have in an engine's index (implicit :latest, localhost/, library/)."""
    name = image if ":" in image.rsplit("/", 1)[-1] or "@" in image else f"{image}:latest"
    out = {name, f"localhost/{name}"}
    first = image.split("/", 1)[0]
    if "/" not in image or not ("." in first or ":" in first or first == "localhost"):
        out.add(f"docker.io/{name}")
        if "/" not in image.split(":")[0]:
            out.add(f"docker.io/library/{name}")
    return out


def _index_names(store: str) -> set[str] | None:
    from .._fastjson import loads

    def load(path: str):
        try:
            with open(path, "rb") as f:  # no marshal sidecar: never write into an engine's directory
                raw = f.read()
        except OSError:
            note(("file", path, None))
            raise
        note(("file", path, raw))
        return loads(raw)

    try:
        if store == "podman":
            from ..enginestore import podman_index

            data = load(podman_index())
            out = set()
            for img in data:
                out.update(img.get("names") or [])
                for dg in img.get("digests") or []:
                    for n in img.get("names") or []:
                        out.add(f"{n.rsplit(':', 1)[0] if ':' in n.rsplit('/', 1)[-1] else n}@{dg}")
            return out
        if store == "docker":
            from ..enginestore import docker_index

            index = docker_index()
            if index is None:
                return None
            return {t for repo in load(index).get("Repositories", {}).values() for t in repo}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return None


def present(store: str, image: str) -> bool:
    """Whether ``image`` is in ``store``. What it reads is recorded for a resolved-spec cache
    (``resolvedspec``): the files' contents and stamps, or volatile when an engine is asked."""
    if store == "oci":
        from ..oci import rootfs

        if rootfs.lookup_cached(image) is not None:  # unpacked from an engine, or pulled (stamps "registry")
            return True
        return any(present(s, image) for s in ("podman", "docker"))
    names = _index_names(store)
    if names is not None:
        return bool(spellings(image) & names)
    volatile()  # the engine's answer: no stamp to re-check it by
    import subprocess

    try:
        r = subprocess.run([store, "image", "inspect", image], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return False
    return r.returncode == 0


def pull(store: str, image: str, *, policy: str = "missing", config: dict | None = None,
         progress: bool | None = None) -> None:
    """Pull ``image`` into ``store`` now (whatever is local)."""
    if store == "podman":
        from .engine_pull import podman_pull

        podman_pull(image, config=config, progress=progress)
    elif store == "docker":
        from .engine_pull import docker_pull

        docker_pull(image, config=config, progress=progress)
    elif store == "oci":
        from . import oci_pull
        from .progress import PullProgress

        oci_pull.pull(image, policy=policy, config=config, progress=PullProgress(image, enabled=progress))
    else:
        raise PullError("unsupported", f"no image store {store!r}")


def ensure(backend: str, image: str, policy: str, *, config: dict | None = None,
           progress: bool | None = None, options: dict | None = None,
           before_pull: Callable[[], None] | None = None) -> bool:
    """Make ``image`` usable by ``backend`` under ``policy``; True when something was pulled.
    ``before_pull`` runs only when a pull is about to start (e.g. the backend's policy check: a spec the
    backend will refuse is refused before a download, not after)."""
    store = store_of(backend, options)
    if store is None or not image:
        return False
    if policy == "always":
        volatile()
        if before_pull is not None:
            before_pull()
        with pull_lock(store, image):
            pull(store, image, policy=policy, config=config, progress=progress)
        return True
    if present(store, image):
        return False
    volatile()  # about to pull (or fail): the next run resolves again, against the new store
    if policy == "never":
        raise NotFound(f"image {image!r} is not present in {store} and the pull policy is 'never'",
                       hint=f"pull it (agentkernel images pull --backend {backend} {image}), or use --pull missing")
    if before_pull is not None:
        before_pull()
    with pull_lock(store, image):
        if present(store, image):  # a concurrent run pulled it while we waited: one download
            return False
        try:
            pull(store, image, policy=policy, config=config, progress=progress)
        except PullError as exc:
            exc.message = f"image {image!r} is not present in {store} and pulling it failed: {exc.message}"
            exc.args = (exc.message,)
            raise
    return True


class pull_lock:
    """One pull of one image into one store at a time, across processes (an flock'd file)."""

    def __init__(self, store: str, image: str) -> None:
        import hashlib

        from .. import paths

        d = os.path.join(paths.cache_dir(), "images", "locks")
        os.makedirs(d, exist_ok=True)
        self.path = os.path.join(d, f"{store}-{hashlib.sha256(image.encode()).hexdigest()[:32]}")

    def __enter__(self) -> pull_lock:
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
