"""Pick an image for a command among the images that exist locally (no registry here).

Presence is read from the engines' own image indexes on disk (podman's containers/storage
``images.json``, dockerd's ``repositories.json``): ~1 ms instead of an engine round trip. When an index
cannot be read, the engine is asked.
"""

from __future__ import annotations

from .errors import NotFound
from .images import DEFAULT_IMAGE, candidates_for_command

PODMAN_INDEX = "/var/lib/containers/storage/overlay-images/images.json"
DOCKER_INDEX = "/var/lib/docker/image/overlay2/repositories.json"


def image_store(backend: str, options: dict[str, str] | None = None) -> str | None:
    """The engine whose image store ``backend`` runs images from (the registry entry says), or None."""
    from .backends import entry

    return entry(backend, options).image_store


def _normalize(ref: str) -> set[str]:
    """Spellings one reference may have in an index (implicit :latest, localhost/, docker.io/library/)."""
    name = ref if ":" in ref.rsplit("/", 1)[-1] or "@" in ref else f"{ref}:latest"
    out = {name, f"localhost/{name}"}
    if "/" not in ref.split(":")[0]:
        out.add(f"docker.io/library/{name}")
    return out


def local_images(engine: str) -> set[str] | None:
    import json

    try:
        if engine == "podman":
            with open(PODMAN_INDEX) as f:
                return {n for img in json.load(f) for n in (img.get("names") or [])}
        if engine == "docker":
            with open(DOCKER_INDEX) as f:
                return {t for repo in json.load(f).get("Repositories", {}).values() for t in repo}
    except (OSError, ValueError, AttributeError):
        return None
    return None


def image_present(engine: str, image: str) -> bool:
    names = local_images(engine)
    if names is not None:
        return bool(_normalize(image) & names)
    import subprocess

    r = subprocess.run([engine, "image", "inspect", image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return r.returncode == 0


def choose_image(backend: str, argv: list[str], options: dict[str, str] | None = None) -> str:
    cands = candidates_for_command(argv)
    engine = image_store(backend, options)
    if engine is None or len(cands) == 1:
        # nothing to choose between: a missing image is reported by the run itself, with a hint
        return cands[0] if cands else DEFAULT_IMAGE
    for c in cands:
        if image_present(engine, c):
            return c
    raise NotFound(
        f"no local image for {argv[0]!r} in {engine} (looked for: {', '.join(cands)}); no registry is "
        "reachable, so images must be built or imported locally",
        hint="bash scripts/setup.sh builds agentkernel/busybox and agentkernel/debian; or pass --image",
    )


def missing_image_error(engine: str, image: str) -> NotFound:
    return NotFound(
        f"image {image!r} is not present in {engine} (no registry is reachable: nothing is pulled)",
        hint="build the local images: agentkernel images build (or bash scripts/setup.sh), "
        f"or import one: {engine} import ROOTFS.tar NAME",
    )
