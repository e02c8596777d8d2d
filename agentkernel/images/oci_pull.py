"""The oci backend's own pull: registry -> content-addressed blob store -> unpacked rootfs cache.

Layout under ``<cache>/oci`` (the rootfs part is the one ``oci/rootfs.py`` already uses):

- ``blobs/sha256/<hex>``: manifests' config and layer blobs, verified before they get this name, shared by
  every image that has them (a layer common to two images is downloaded once);
- ``rootfs/<config-hex>/{rootfs,image.json}``: the unpacked image, named by its image id (the config
  digest: the same id podman gives it, so an image unpacked from podman's store is not unpacked twice);
- ``refs.json``: reference -> rootfs, with ``"stamps": "registry"`` and the manifest digest for pulled
  images (engine-sourced entries keep their index stamps);
- ``locks/``: one lock file per reference (concurrent pulls of one image: one download) and per blob.

Every write goes to a ``.tmp-*`` name first and is renamed into place only when complete and verified; a
failed or interrupted pull removes its temporaries, so no cache ever holds half an image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

from ..oci import rootfs as rfs
from . import settings
from .auth import credentials
from .layers import Extractor, enospc
from .progress import PullProgress
from .pullerrors import PullError
from .reference import Reference, parse
from .registry import RegistryClient

REGISTRY_STAMP = "registry"


def blobs_dir() -> str:
    d = os.path.join(rfs.cache_root(), "blobs", "sha256")
    os.makedirs(d, exist_ok=True)
    return d


def locks_dir() -> str:
    d = os.path.join(rfs.cache_root(), "locks")
    os.makedirs(d, exist_ok=True)
    return d


class _Lock:
    def __init__(self, name: str) -> None:
        self.path = os.path.join(locks_dir(), name)

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _ref_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def qualify(ref: Reference, config: dict | None) -> Reference:
    if not ref.short:
        return ref
    reg = settings.default_registry(config)
    if not reg:
        raise PullError("short-name", f"{ref} is a short name and no registry is configured for short names",
                        hint="use a full reference (HOST/REPOSITORY:TAG), or set AGENTKERNEL_REGISTRY / [images] "
                        "registry, or unqualified-search-registries in /etc/containers/registries.conf")
    return ref.with_registry(reg)


def cached(image: str) -> rfs.ImageRootfs | None:
    """A pulled image's rootfs if this reference was pulled before (no network)."""
    ent = rfs._read_refs().get(image)
    if not ent or ent.get("stamps") != REGISTRY_STAMP:
        return None
    rf = rfs.ImageRootfs.from_dict(ent["rootfs"])
    return rf if os.path.isdir(rf.path) else None


def pull(image: str, *, policy: str = "missing", config: dict | None = None,
         progress: PullProgress | None = None) -> rfs.ImageRootfs:
    """Pull ``image`` into the oci cache (per ``policy``: ``missing`` returns a cached pull untouched,
    ``always`` re-resolves the manifest and re-uses what did not change)."""
    ref = qualify(parse(image), config)
    prog = progress or PullProgress(image)
    with _Lock(f"pull-{_ref_key(str(ref))}"):
        if policy != "always":
            rf = cached(image)
            if rf is not None:
                return rf
        try:
            rf = _pull_locked(image, ref, config, prog)
        except BaseException:
            prog.fail()
            raise
        prog.done()
        return rf


def _pull_locked(image: str, ref: Reference, config: dict | None, prog: PullProgress) -> rfs.ImageRootfs:
    reg = ref.registry or ""
    client = RegistryClient(reg, credentials=credentials(reg), insecure=reg in settings.insecure_registries(config))
    try:
        prog.status("resolving")
        digest, manifest = client.image_manifest(ref.repository, ref.ref)
        ent = rfs._read_refs().get(image)
        if ent and ent.get("digest") == digest and ent.get("stamps") == REGISTRY_STAMP:
            rf = rfs.ImageRootfs.from_dict(ent["rootfs"])
            if os.path.isdir(rf.path):
                return rf  # unchanged upstream
        cfg_desc = manifest["config"]
        layers = manifest.get("layers") or []
        missing = [d for d in layers if not os.path.exists(os.path.join(blobs_dir(), _hex(d["digest"])))]
        prog.plan(len(layers), sum(int(d.get("size") or 0) for d in missing))
        prog.layers_done = len(layers) - len(missing)
        cfg_path = _ensure_blob(client, ref, cfg_desc, None)
        with open(cfg_path, "rb") as f:
            cfg = json.load(f)
        for d in layers:
            _ensure_blob(client, ref, d, prog)
            if d in missing:
                prog.layer_done()
    finally:
        client.close()
    image_id = _hex(cfg_desc["digest"])
    diff_ids = ((cfg.get("rootfs") or {}).get("diff_ids")) or []
    if len(diff_ids) != len(layers):
        raise PullError("failed", f"{ref}: the image config lists {len(diff_ids)} layers, the manifest "
                        f"{len(layers)}")
    rf = _unpack(image, image_id, cfg, [(_hex(d["digest"]), diff_ids[i]) for i, d in enumerate(layers)], config)
    rfs._write_refs({image: {"stamps": REGISTRY_STAMP, "digest": digest, "ref": str(ref),
                             "blobs": [cfg_desc["digest"], *(d["digest"] for d in layers)],
                             "rootfs": rf.to_dict()}})
    return rf


def _hex(digest: str) -> str:
    algo, _, hx = digest.partition(":")
    if algo != "sha256" or len(hx) != 64 or not all(c in "0123456789abcdef" for c in hx):
        raise PullError("unsupported", f"unsupported or malformed digest {digest!r}")
    return hx


def _ensure_blob(client: RegistryClient, ref: Reference, desc: dict, prog: PullProgress | None) -> str:
    hx = _hex(desc["digest"])
    final = os.path.join(blobs_dir(), hx)
    if os.path.exists(final):
        return final
    with _Lock(f"blob-{hx}"):
        if os.path.exists(final):
            return final  # a concurrent pull of another image sharing this layer fetched it
        tmp = os.path.join(blobs_dir(), f".tmp-{hx}-{os.getpid()}")
        try:
            resp = client.blob(ref.repository, desc["digest"])
            h = hashlib.sha256()
            size = 0
            with open(tmp, "wb") as f:
                while True:
                    try:
                        chunk = resp.read(1 << 20)
                    except (OSError, ValueError) as exc:
                        raise PullError("unreachable", f"{ref}: connection lost while downloading "
                                        f"{desc['digest'][:19]}: {exc}") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    if prog:
                        prog.advance(len(chunk))
            want = int(desc.get("size") or 0)
            if want and size < want:
                raise PullError("unreachable", f"{ref}: download of {desc['digest'][:19]} ended after {size} of "
                                f"{want} bytes (registry gone?)")
            if h.hexdigest() != hx:
                raise PullError("digest-mismatch", f"{ref}: blob {desc['digest']} has digest sha256:{h.hexdigest()}")
            os.rename(tmp, final)
        except OSError as exc:
            if enospc(exc):
                raise PullError("disk-full", f"{ref}: no space left in {blobs_dir()}") from None
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return final


def _unpack(image: str, image_id: str, cfg: dict, layers: list[tuple[str, str]], config: dict | None):
    def fill(root: str, final_root: str) -> rfs.ImageRootfs:
        ex = Extractor(root, keep_setuid=settings.keep_setuid(config))
        for hx, diff_id in layers:
            ex.layer(os.path.join(blobs_dir(), hx), diff_id)
        rfs._add_mountpoints(root)
        c = cfg.get("config") or {}
        return rfs.ImageRootfs(image, image_id, final_root, rfs._image_env(c), c.get("WorkingDir") or "/",
                               rfs._homes(root), REGISTRY_STAMP)

    try:
        rf = rfs.unpack_once(image_id, fill)
    except OSError as exc:
        if enospc(exc):
            raise PullError("disk-full", f"{image}: no space left unpacking into {rfs.rootfs_dir()}") from None
        raise
    rf.image = image
    return rf


def _in_use(path: str) -> bool:
    """Whether a running sandbox (of any session) uses the root under ``path``: an overlay whose lower dir
    it is, or a process whose root is inside it."""
    try:
        with open("/proc/self/mountinfo") as f:
            if path in f.read():
                return True
    except OSError:
        pass
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/root").startswith(path):
                    return True
            except OSError:
                continue
    return False


def prune(*, dry_run: bool = False, min_age_s: float = 3600.0) -> list[tuple[str, int]]:
    """Remove what no reference needs: blobs no pulled image lists, unpacked roots no name refers to and no
    running sandbox uses, and temporaries of pulls that died. Only what is older than ``min_age_s`` (a pull in
    progress writes its blobs before its reference). Returns (path, bytes) removed."""
    import time

    refs = rfs._read_refs()
    used_blobs = {_hex(d) for ent in refs.values() for d in ent.get("blobs") or []}
    used_roots = {(ent.get("rootfs") or {}).get("id") for ent in refs.values()}
    out: list[tuple[str, int]] = []
    now = time.time()

    def old(p: str) -> bool:
        try:
            return now - os.lstat(p).st_mtime >= min_age_s
        except OSError:
            return False

    def drop(path: str) -> None:
        size = sum(os.lstat(os.path.join(dp, n)).st_blocks * 512 for dp, _, ns in os.walk(path) for n in ns) \
            if os.path.isdir(path) else os.lstat(path).st_blocks * 512
        out.append((path, size))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)

    bdir = blobs_dir()
    for n in os.listdir(bdir):
        p = os.path.join(bdir, n)
        if (n.startswith(".tmp-") or n not in used_blobs) and old(p):
            drop(p)
    base = rfs.rootfs_dir()
    for n in os.listdir(base):
        p = os.path.join(base, n)
        stale_tmp = n.startswith(".tmp-") and old(p)
        if stale_tmp or (not n.startswith(".") and n not in used_roots and old(p) and not _in_use(p)):
            drop(p)
    return out
