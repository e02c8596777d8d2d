"""``agentkernel images list|pull|build|rm|prune``: every backend's image store in one view.

Stores: podman (podman and gVisor-on-podman), docker (docker and gVisor-on-docker), and the oci backend's
own cache (unpacked roots + pulled blobs). ``list`` shows each image once with its size in each store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from ..errors import AgentKernelError, ValidationError

STORES = ("podman", "docker", "oci")
AGENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images", "agents")


def add_parser(sub) -> None:
    p = sub.add_parser("images", help="list, pull, build, remove and prune images in every backend's store")
    a = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = a.add_parser("list", aliases=["ls"], help="images in podman, docker and the oci cache, with sizes")
    ls.add_argument("--json", action="store_true")
    pl = a.add_parser("pull", help="pull images into a backend's store")
    pl.add_argument("images", nargs="+", metavar="IMAGE")
    pl.add_argument("-B", "--backend", default=None, help="backend whose store to fill (default: podman)")
    pl.add_argument("--always", action="store_true", help="ask the registry even when the image is present")
    b = a.add_parser("build", help="build from a Dockerfile/Containerfile ([build] table), an agent image, or "
                     "agentkernel's local images")
    b.add_argument("names", nargs="*", help="a build context directory; or local image names (busybox, debian)")
    b.add_argument("-f", "--file", help="the Dockerfile/Containerfile")
    b.add_argument("-t", "--tag", help="image name (default: agentkernel-build/<dir>:<content hash>)")
    b.add_argument("--target")
    b.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    b.add_argument("--no-cache", action="store_true")
    b.add_argument("-B", "--backend", default=None, help="backend whose engine builds (podman, docker, oci)")
    b.add_argument("--agent", choices=sorted(os.listdir(AGENTS_DIR)) if os.path.isdir(AGENTS_DIR) else [],
                   help="build an agent image (Claude Code, Codex, Gemini CLI, OpenCode)")
    b.add_argument("--base", help="--agent: the base image (must have node and npm; default node:22-alpine)")
    b.add_argument("-c", "--config", help="agentkernel.toml with a [build] table")
    # microVM guest images: implemented by agentkernel.vm (its owner's module); this is only the hook
    b.add_argument("--vm", nargs="*", metavar="IMAGE", default=None,
                   help="build microVM guest images (kernel, initramfs, root disk) of these images")
    rm = a.add_parser("rm", help="remove images from every store that has them")
    rm.add_argument("images", nargs="+", metavar="IMAGE")
    rm.add_argument("-B", "--backend", default=None, help="only this backend's store")
    pr = a.add_parser("prune", help="remove unused oci cache entries (and, with --engines, dangling engine images)")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--engines", action="store_true", help="also remove podman's and docker's dangling images")
    pr.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS",
                    help="oci cache: only what is at least this old (default 3600: pulls in progress are safe)")


def images_cmd(args) -> int:
    return {"list": list_cmd, "ls": list_cmd, "pull": pull_cmd, "build": build_cmd, "rm": rm_cmd,
            "prune": prune_cmd}[args.action](args)


# ---- inventory ---------------------------------------------------------------------------------------------


def _podman_images() -> list[dict]:
    if not shutil.which("podman"):
        return []
    r = subprocess.run(["podman", "images", "--format", "json"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        return []
    out = []
    for img in json.loads(r.stdout or "[]"):
        names = img.get("Names") or [f"<none>@{img.get('Id', '')[:12]}"]
        out.append({"id": img.get("Id", ""), "names": names, "size": int(img.get("Size") or 0)})
    return out


def _docker_images() -> list[dict]:
    try:
        from ..backends.docker_api import SyncClient

        with SyncClient() as c:
            imgs = c.json("GET", "/images/json")
    except (AgentKernelError, OSError):
        return []
    out = []
    for img in imgs or []:
        tags = [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"]
        out.append({"id": img.get("Id", "").split(":")[-1], "names": tags or [f"<none>@{img.get('Id', '')[7:19]}"],
                    "size": int(img.get("Size") or 0)})
    return out


def _du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def _oci_images() -> list[dict]:
    from ..oci import rootfs

    try:
        base = rootfs.rootfs_dir()
    except OSError:
        return []
    refs = rootfs._read_refs()
    by_id: dict[str, list[str]] = {}
    for name, ent in refs.items():
        rid = (ent.get("rootfs") or {}).get("id")
        if rid:
            by_id.setdefault(rid, []).append(name)
    out = []
    for rid in sorted(os.listdir(base)):
        if rid.startswith("."):
            continue
        out.append({"id": rid, "names": sorted(by_id.get(rid) or [f"<unreferenced>@{rid[:12]}"]),
                    "size": _du(os.path.join(base, rid))})
    return out


def inventory() -> list[dict]:
    """One row per image name: {name, id per store, size per store}."""
    rows: dict[str, dict] = {}
    for store, items in (("podman", _podman_images()), ("docker", _docker_images()), ("oci", _oci_images())):
        for img in items:
            for n in img["names"]:
                key = n[len("localhost/"):] if n.startswith("localhost/") else n
                if ":" not in key.rsplit("/", 1)[-1] and "@" not in key and not key.startswith("<"):
                    key += ":latest"
                row = rows.setdefault(key, {"name": key, "stores": {}})
                row["stores"][store] = {"id": img["id"][:12], "size": img["size"]}
    return sorted(rows.values(), key=lambda r: r["name"])


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def list_cmd(args) -> int:
    rows = inventory()
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    w = max([len(r["name"]) for r in rows] + [5])
    print(f"{'IMAGE':<{w}}  {'PODMAN':>9}  {'DOCKER':>9}  {'OCI':>9}  BACKENDS")
    from ..images.pull import _STORE_OF

    for r in rows:
        s = r["stores"]
        cells = [_size(s[k]["size"]) if k in s else "-" for k in STORES]
        backends = sorted(b for b, st in _STORE_OF.items() if st in s)
        print(f"{r['name']:<{w}}  {cells[0]:>9}  {cells[1]:>9}  {cells[2]:>9}  {', '.join(backends)}")
    return 0


# ---- pull ----------------------------------------------------------------------------------------------------


def pull_cmd(args) -> int:
    from ..images import settings
    from ..images.pull import ensure, store_of

    backend = args.backend or os.environ.get("AGENTKERNEL_BACKEND") or "podman"
    store = store_of(backend)
    if store is None:
        raise ValidationError(f"backend {backend!r} has no image store (stores: podman, docker, oci)")
    cfg = settings.load_user_config()
    for image in args.images:
        from ..images.reference import parse

        parse(image)  # a malformed reference is refused before anything runs
        ensure(backend, image, "always" if args.always else "missing", config=cfg)
    return 0


# ---- build ---------------------------------------------------------------------------------------------------


def build_cmd(args) -> int:
    if args.vm is not None:
        try:
            from ..vm.guestimage import build_cli  # the microVM guest image builder (agentkernel.vm)
        except ImportError:
            raise AgentKernelError("microVM guest images cannot be built: this agentkernel has no agentkernel.vm "
                                   "module") from None
        return build_cli(args.vm + args.names)
    from .. import config
    from ..images import dockerbuild
    from ..images.build import IMAGES, build_all

    backend = args.backend or os.environ.get("AGENTKERNEL_BACKEND")
    bargs = {}
    for kv in args.build_arg:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValidationError(f"--build-arg expects K=V, got {kv!r}")
        bargs[k] = v
    if args.agent:
        if args.base:
            bargs["BASE"] = args.base
        dockerfile_spec = dockerbuild.make_spec(os.path.join(AGENTS_DIR, args.agent, "Dockerfile"), None,
                                                       args=bargs, no_cache=args.no_cache,
                                                       tag=args.tag or f"agentkernel/agent-{args.agent}:latest")
        print(dockerbuild.build(dockerfile_spec, backend=backend))
        return 0
    local = [n for n in args.names if n in IMAGES or f"agentkernel/{n}" in IMAGES]
    if local and len(local) == len(args.names):
        build_all(args.names)
        return 0
    if args.file or args.names:
        if len(args.names) > 1:
            raise ValidationError("images build takes one context directory")
        spec = dockerbuild.make_spec(args.file, args.names[0] if args.names else None, target=args.target,
                                     args=bargs, no_cache=args.no_cache, tag=args.tag)
        print(dockerbuild.build(spec, backend=backend))
        return 0
    cfg_path = config.find_config(args.config, os.getcwd())
    cfg = config.load_config(cfg_path)
    if cfg.get("build"):
        spec = dockerbuild.spec_from_config(cfg, cfg_path)
        if args.no_cache:
            spec.no_cache = True
        print(dockerbuild.build(spec, backend=backend or (cfg.get("sandbox") or {}).get("backend")))
        return 0
    if any(os.path.isfile(n) for n in dockerbuild.DOCKERFILE_NAMES):
        spec = dockerbuild.make_spec(None, os.getcwd(), target=args.target, args=bargs, no_cache=args.no_cache,
                                     tag=args.tag)
        print(dockerbuild.build(spec, backend=backend))
        return 0
    build_all(None)  # agentkernel's own offline images
    return 0


# ---- rm / prune ----------------------------------------------------------------------------------------------


def rm_cmd(args) -> int:
    from ..images.pull import store_of

    stores = [store_of(args.backend)] if args.backend else list(STORES)
    removed = 0
    for image in args.images:
        for store in stores:
            if store == "podman" and shutil.which("podman"):
                r = subprocess.run(["podman", "rmi", image], capture_output=True, text=True, stdin=subprocess.DEVNULL)
                removed += r.returncode == 0
            elif store == "docker":
                try:
                    from ..backends.docker_api import SyncClient, quote

                    with SyncClient() as c:
                        removed += c.request("DELETE", f"/images/{quote(image)}", ok=(404, 409)).status == 200
                except (AgentKernelError, OSError):
                    pass
            elif store == "oci":
                removed += _oci_forget(image)
    if not removed:
        raise AgentKernelError(f"no store had {', '.join(args.images)}")
    return 0


def _oci_forget(image: str) -> bool:
    """Drop a name from the oci cache; its root goes once no name refers to it (prune)."""
    import json as _json

    from ..oci import rootfs

    refs = rootfs._read_refs()
    if image not in refs:
        return False
    del refs[image]
    path = rootfs._refs_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        _json.dump(refs, f)
    os.replace(tmp, path)
    return True


def prune_cmd(args) -> int:
    from ..images.oci_pull import prune as oci_prune

    freed = oci_prune(dry_run=args.dry_run, min_age_s=args.older_than)
    for path, size in freed:
        print(f"{'would remove' if args.dry_run else 'removed'} {path} ({_size(size)})")
    if args.engines and not args.dry_run:
        if shutil.which("podman"):
            subprocess.run(["podman", "image", "prune", "-f"], capture_output=True, stdin=subprocess.DEVNULL)
        try:
            from ..backends.docker_api import SyncClient

            with SyncClient() as c:
                c.request("POST", "/images/prune", params={"filters": {"dangling": ["true"]}})
        except (AgentKernelError, OSError):
            pass
    return 0
