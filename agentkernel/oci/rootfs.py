"""Root filesystems for OCI bundles: images unpacked once into a content-addressed cache.

``<cache>/oci/rootfs/<image-id>/rootfs`` is the image's filesystem, read-only from then on: every
sandbox gets its own writable layer on top of it (an overlay whose upper/work dirs are the sandbox's,
or a read-only root plus sized tmpfs), never a shared writable base. ``<image-id>/image.json`` keeps
what the bundle needs from the image config (env, workdir, users' home directories).

Sources, in order: podman's store (``podman image mount``, copied), docker's (``docker export`` of a
created container), the project's own image builder (``agentkernel.images``: the tarball it imports
into the engines). Unpacking prints a progress line on stderr, happens under a lock, and is renamed into
place atomically, so concurrent first runs unpack once and nobody sees a half-written root.

Resolving a name costs one small JSON read and one ``stat`` of the engine's image index on the hot path
(``refs.json`` remembers name -> id with the index's stat; a changed index means re-resolve).
"""

from __future__ import annotations

import os

from ..errors import NotFound, SandboxError
from ..resolvedspec import note, read_file, recording, stamp

TYPE_CHECKING = False  # annotations are never evaluated here
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAYOUT_VERSION = "1"

# Mount points every bundle uses; created in the cached root at unpack time so that a runtime never has
# to create them (it would be writing into the shared base when the root is used read-only).
MOUNTPOINTS_DIRS = ("proc", "sys", "dev", "tmp", ".ak", ".ak/run")
MOUNTPOINTS_FILES = (".ak/ak-agent",)


class ImageRootfs:
    """An unpacked image: ``path`` is the (read-only by convention) root directory."""

    __slots__ = ("env", "homes", "id", "image", "path", "source", "workdir")

    def __init__(
        self, image: str, id: str, path: str, env: list[str], workdir: str, homes: dict[str, str], source: str
    ) -> None:
        self.image = image
        self.id = id
        self.path = path
        self.env = env
        self.workdir = workdir
        self.homes = homes
        self.source = source

    def home_for(self, uid: int | str) -> str:
        return self.homes.get(str(uid), "/")

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "id": self.id,
            "path": self.path,
            "env": self.env,
            "workdir": self.workdir,
            "homes": self.homes,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageRootfs:
        return cls(
            d["image"],
            d["id"],
            d["path"],
            list(d.get("env") or []),
            d.get("workdir") or "/",
            dict(d.get("homes") or {}),
            d.get("source") or "",
        )


def cache_root() -> str:
    from .. import paths

    base = paths.cache_dir()
    real = os.path.realpath(base)
    note(("call", "os.path", "realpath", (base,), real))  # a symlink re-pointed moves the cache (resolvedspec)
    d = os.path.join(real, "oci")  # runc wants resolved paths
    os.makedirs(d, exist_ok=True)
    return d


def rootfs_dir() -> str:
    d = os.path.join(cache_root(), "rootfs")
    os.makedirs(d, exist_ok=True)
    return d


def _stamp(path: str) -> list[int] | None:
    st = stamp(path)
    note(("stamp", path, st))  # lookup_cached decides by the stamp itself (resolvedspec)
    return st


def _index_stamps() -> list:
    from ..enginestore import docker_index, podman_index

    docker = docker_index()
    return [LAYOUT_VERSION, _stamp(podman_index()), _stamp(docker) if docker else None]


def _refs_path() -> str:
    return os.path.join(cache_root(), "refs.json")


def _read_refs() -> dict:
    from .._fastjson import load

    path = _refs_path()
    if recording():  # what load() may read: the file and its marshal sidecar (resolvedspec)
        note(("file", path, read_file(path)))
        note(("file", path + ".m", read_file(path + ".m")))
    try:
        return load(path)
    except (OSError, ValueError):
        return {}


def _write_refs(update: dict) -> None:
    from .._fastjson import save

    refs = _read_refs()
    refs.update(update)
    save(_refs_path(), refs)  # with its marshal sidecar: the next run's lookup parses nothing


def lookup_cached(image: str) -> ImageRootfs | None:
    """The hot path: the cached rootfs for ``image`` if the engines' image indexes did not change."""
    ent = _read_refs().get(image)
    # entries unpacked from an engine's store are valid while its index is unchanged; pulled ones always
    if not ent or (ent.get("stamps") != _index_stamps() and ent.get("stamps") != "registry"):
        return None
    rf = ImageRootfs.from_dict(ent["rootfs"])
    found = os.path.isdir(rf.path)
    if recording():
        note(("isdir", rf.path, found))
    return rf if found else None


def resolve(image: str, *, quiet: bool = False) -> ImageRootfs:
    """The unpacked rootfs for ``image``, unpacking it first if needed (with a progress line)."""
    rf = lookup_cached(image)
    if rf is not None:
        return rf
    stamps = _index_stamps()
    src = _find_source(image)
    if src is None:
        from ..images import LOCAL_IMAGES

        hint = (
            "bash scripts/setup.sh (builds and imports the local images)"
            if image.split(":")[0] in LOCAL_IMAGES
            else f"import it into podman first: podman import ROOTFS.tar {image}"
        )
        raise NotFound(
            f"image {image!r} is not in the oci cache nor in podman's or docker's store, and agentkernel "
            "cannot build it",
            hint=f"pull it: agentkernel images pull --backend oci {image}; or {hint}",
        )
    kind, image_id, cfg = src
    rf = _ensure_unpacked(image, kind, image_id, cfg, quiet=quiet)
    _write_refs({image: {"stamps": stamps, "rootfs": rf.to_dict()}})
    return rf


# ---- sources ------------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _inspect(engine: str, image: str) -> tuple[str, dict] | None:
    import json
    import subprocess

    if not _which(engine):
        return None
    try:
        r = subprocess.run(
            [engine, "image", "inspect", "--format", "json", image],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        data = json.loads(r.stdout)
        data = data[0] if isinstance(data, list) else data
        image_id = data["Id"].split(":")[-1]
        cfg = data.get("Config") or {}
    except (ValueError, LookupError, TypeError, AttributeError):
        return None
    return image_id, cfg


def _find_source(image: str) -> tuple[str, str, dict] | None:
    for engine in ("podman", "docker"):
        got = _inspect(engine, image)
        if got:
            return engine, got[0], got[1]
    from ..images import build

    name = image.split(":")[0]
    if name.startswith("localhost/"):
        name = name[len("localhost/") :]
    if name in build.IMAGES:
        recipe_fn, _ = build.IMAGES[name]
        try:
            recipe = recipe_fn()
        except Exception:
            return None
        return (
            "builder",
            f"recipe-{name.replace('/', '_')}-{recipe}",
            {"Env": [f"PATH={build.PATH_ENV}"], "WorkingDir": "/workspace", "Name": name},
        )
    return None


def _ensure_unpacked(image: str, kind: str, image_id: str, cfg: dict, *, quiet: bool) -> ImageRootfs:
    def fill(root: str, final_root: str) -> ImageRootfs:
        from ..images.build import Progress

        label = f"agentkernel: unpacking {image} ({image_id[:12]}, from {kind}) for the oci backend"
        if quiet:
            _unpack(kind, image, image_id, cfg, root)
        else:
            with Progress(label):
                _unpack(kind, image, image_id, cfg, root)
        _add_mountpoints(root)
        return ImageRootfs(image, image_id, final_root, _image_env(cfg), cfg.get("WorkingDir") or "/", _homes(root),
                           kind)

    return unpack_once(image_id, fill)


def unpack_once(image_id: str, fill: Callable[[str, str], ImageRootfs]) -> ImageRootfs:
    """The unpacked rootfs of ``image_id``: the cached one, else the one ``fill(root, final_root)`` makes
    under the image's lock in ``root`` (a fresh 0755 directory in a temporary dir) and returns; it is
    renamed into place (``final_root``) with its image.json. A failed fill leaves nothing behind."""
    import fcntl
    import json

    base = rootfs_dir()
    final = os.path.join(base, image_id)
    meta_path = os.path.join(final, "image.json")
    lock_fd = os.open(os.path.join(base, f".lock-{image_id}"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.exists(meta_path):
            from .._fastjson import load

            return ImageRootfs.from_dict(load(meta_path))
        tmp = os.path.join(base, f".tmp-{image_id}-{os.getpid()}")
        _rmtree(tmp)
        root = os.path.join(tmp, "rootfs")
        os.makedirs(root)
        os.chmod(root, 0o755)
        try:
            rf = fill(root, os.path.join(final, "rootfs"))
            with open(os.path.join(tmp, "image.json"), "w") as f:
                json.dump(rf.to_dict(), f)
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
        return rf
    finally:
        os.close(lock_fd)


def _image_env(cfg: dict) -> list[str]:
    env = [e for e in (cfg.get("Env") or []) if isinstance(e, str) and "=" in e]
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    return env


def _unpack(kind: str, image: str, image_id: str, cfg: dict, root: str) -> None:
    import subprocess

    if kind == "podman":
        r = subprocess.run(
            ["podman", "image", "mount", image_id],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
        if r.returncode != 0:
            raise SandboxError(f"podman image mount {image} failed: {r.stderr.strip()[-500:]}")
        src = r.stdout.strip().splitlines()[-1]
        try:
            _copy_tree(src, root)
        finally:
            subprocess.run(
                ["podman", "image", "unmount", image_id],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=300,
            )
    elif kind == "docker":
        r = subprocess.run(
            ["docker", "create", image_id, "/"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
        if r.returncode != 0:
            raise SandboxError(f"docker create {image} failed: {r.stderr.strip()[-500:]}")
        cid = r.stdout.strip()
        try:
            exp = subprocess.Popen(
                ["docker", "export", cid], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            tar = subprocess.run(
                ["tar", "-C", root, "--numeric-owner", "-xpf", "-"],
                stdin=exp.stdout,
                capture_output=True,
                text=True,
            )
            exp.stdout.close()
            if exp.wait() != 0 or tar.returncode != 0:
                raise SandboxError(f"docker export {image} failed: {tar.stderr.strip()[-500:]}")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, stdin=subprocess.DEVNULL)
    elif kind == "builder":
        from ..images import build

        path, _ = build.ensure_tar(cfg["Name"])
        r = subprocess.run(
            ["tar", "-C", root, "--numeric-owner", "-xpf", path], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise SandboxError(f"unpacking {path} failed: {r.stderr.strip()[-500:]}")
    else:
        raise AssertionError(kind)


def _copy_tree(src: str, dst: str) -> None:
    import subprocess

    # cp -a keeps owners, modes, times, hard links, xattrs and special files; reflinks where the fs can.
    r = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", dst], capture_output=True, text=True)
    if r.returncode != 0:
        raise SandboxError(f"copying the image root failed: {r.stderr.strip()[-500:]}")


def _no_symlinks(root: str, rel: str) -> bool:
    """True when no component of ``rel`` below ``root`` is a symlink (an image's symlink must never make
    us create or read something outside its root)."""
    p = root
    for part in rel.split("/"):
        p = os.path.join(p, part)
        if os.path.islink(p):
            return False
    return True


def _add_mountpoints(root: str) -> None:
    for d in MOUNTPOINTS_DIRS:
        if not _no_symlinks(root, d):
            continue
        p = os.path.join(root, d)
        if not os.path.exists(p):
            os.makedirs(p, mode=0o755, exist_ok=True)
            if d == "tmp":
                os.chmod(p, 0o1777)
    for fn in MOUNTPOINTS_FILES:
        p = os.path.join(root, fn)
        if _no_symlinks(root, fn) and not os.path.exists(p) and os.path.isdir(os.path.dirname(p)):
            with open(p, "w"):
                pass
            os.chmod(p, 0o755)


def _homes(root: str) -> dict[str, str]:
    homes: dict[str, str] = {}
    if not _no_symlinks(root, "etc/passwd"):
        return homes
    try:
        with open(os.path.join(root, "etc", "passwd"), errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 6 and parts[2].isdigit() and parts[2] not in homes:
                    homes[parts[2]] = parts[5] or "/"
    except OSError:
        pass
    return homes


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
