"""Build images from a Dockerfile/Containerfile: the reference's ``[build]`` table, cached by content.

``[build]`` keys: ``dockerfile`` (relative to the config file; default ``Dockerfile`` or ``Containerfile``
in the context), ``context`` (default: the Dockerfile's directory), ``target``, ``args`` (build args),
``no_cache``, and ours: ``tag`` (default ``agentkernel-build/<context dir name>:<content hash>``) and
``engine`` (``podman``, ``buildah`` or ``docker``; default: the backend's engine).

The content hash covers the Dockerfile, the target, the args and every file of the context (path, mode,
bytes; ``.dockerignore`` / ``.containerignore`` patterns excluded), so an unchanged project is never
rebuilt: the tag names the content. The oci backend runs images built by podman (its rootfs cache unpacks
from podman's store). MicroVM guest images are built by ``agentkernel images build --vm`` (agentkernel.vm).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys

from ..errors import AgentKernelError, ConfigError
from .pull import present, store_of

HASH_LEN = 12
DOCKERFILE_NAMES = ("Dockerfile", "Containerfile", "dockerfile", "containerfile")


class BuildSpec:
    __slots__ = ("args", "context", "dockerfile", "engine", "no_cache", "tag", "target")

    def __init__(self, dockerfile: str, context: str, *, target: str | None = None, args: dict | None = None,
                 no_cache: bool = False, tag: str | None = None, engine: str | None = None) -> None:
        self.dockerfile, self.context, self.target = dockerfile, context, target
        self.args, self.no_cache, self.tag, self.engine = dict(args or {}), no_cache, tag, engine


def spec_from_config(cfg: dict, cfg_path: str | None) -> BuildSpec:
    b = cfg.get("build") or {}
    base = os.path.dirname(os.path.abspath(cfg_path)) if cfg_path else os.getcwd()
    context = os.path.join(base, b["context"]) if b.get("context") else None
    dockerfile = os.path.join(base, b["dockerfile"]) if b.get("dockerfile") else None
    return make_spec(dockerfile, context, target=b.get("target"), args=b.get("args"),
                     no_cache=bool(b.get("no_cache")), tag=b.get("tag"), engine=b.get("engine"))


def make_spec(dockerfile: str | None, context: str | None, **kw) -> BuildSpec:
    if dockerfile is None:
        ctx = context or os.getcwd()
        for n in DOCKERFILE_NAMES:
            if os.path.isfile(os.path.join(ctx, n)):
                dockerfile = os.path.join(ctx, n)
                break
        else:
            raise ConfigError(f"no Dockerfile or Containerfile in {ctx}", hint="set [build] dockerfile, or -f PATH")
    if not os.path.isfile(dockerfile):
        raise ConfigError(f"Dockerfile {dockerfile!r} does not exist")
    context = context or os.path.dirname(os.path.abspath(dockerfile))
    if not os.path.isdir(context):
        raise ConfigError(f"build context {context!r} is not a directory")
    return BuildSpec(os.path.abspath(dockerfile), os.path.abspath(context), **kw)


def _ignore_patterns(context: str) -> list[str]:
    for n in (".containerignore", ".dockerignore"):
        try:
            with open(os.path.join(context, n)) as f:
                return [ln.strip().rstrip("/") for ln in f if ln.strip() and not ln.startswith("#")]
        except OSError:
            continue
    return []


def content_hash(b: BuildSpec) -> str:
    h = hashlib.sha256()
    with open(b.dockerfile, "rb") as f:
        h.update(b"dockerfile\0" + f.read())
    h.update(f"\0target\0{b.target or ''}\0".encode())
    for k in sorted(b.args):
        h.update(f"arg\0{k}={b.args[k]}\0".encode())
    ignore = _ignore_patterns(b.context)
    for dirpath, dirnames, filenames in os.walk(b.context):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, b.context)
        for n in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, n))
            if any(fnmatch.fnmatch(rel, p) or rel.startswith(p + "/") for p in ignore):
                continue
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            h.update(f"file\0{rel}\0{st.st_mode:o}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:HASH_LEN]


def _default_tag(b: BuildSpec, digest: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in os.path.basename(b.context).lower()) or "image"
    return f"agentkernel-build/{name.strip('-.') or 'image'}:{digest}"


def _engine_for(backend: str | None, wanted: str | None) -> str:
    if wanted:
        if wanted not in ("podman", "buildah", "docker"):
            raise ConfigError(f"[build] engine {wanted!r} is not podman, buildah or docker")
        return wanted
    store = store_of(backend or "podman")
    if store == "docker":
        return "docker"
    return "podman" if shutil.which("podman") else "buildah"


def build(b: BuildSpec, *, backend: str | None = None, quiet: bool | None = None) -> str:
    """Build (unless the same content was built before) and return the image's tag."""
    digest = content_hash(b)
    tag = b.tag or _default_tag(b, digest)
    engine = _engine_for(backend, b.engine)
    store = "docker" if engine == "docker" else "podman"
    if not b.no_cache and present(store, tag):
        return tag
    args = [engine, "build"] if engine != "buildah" else ["buildah", "bud"]
    args += ["-f", b.dockerfile, "-t", tag, "--label", f"agentkernel.build.hash={digest}"]
    if b.target:
        args += ["--target", b.target]
    for k in sorted(b.args):
        args += ["--build-arg", f"{k}={b.args[k]}"]
    if b.no_cache:
        args.append("--no-cache")
    show = sys.stderr.isatty() if quiet is None else not quiet
    env = dict(os.environ)
    if engine == "docker":
        env.setdefault("DOCKER_BUILDKIT", "0")  # the classic builder: no buildx plugin needed
    try:
        r = subprocess.run([*args, b.context], stdin=subprocess.DEVNULL, stdout=sys.stderr if show else subprocess.PIPE,
                           stderr=None if show else subprocess.STDOUT, text=True, env=env)
    except FileNotFoundError:
        raise AgentKernelError(f"{engine} is not installed", hint="apt-get install -y podman (or buildah)") from None
    if r.returncode != 0:
        out = (r.stdout or "").strip()[-1500:]
        what = f"{engine} build of {b.dockerfile} failed (exit {r.returncode})"
        raise AgentKernelError(what + (f":\n{out}" if out else ""),
                               hint="the builder's output is above" if show else None)
    return tag


def build_from_config(cfg: dict, cfg_path: str | None, *, backend: str | None = None) -> str:
    return build(spec_from_config(cfg, cfg_path), backend=backend)


def planned_tag(cfg: dict, cfg_path: str | None) -> str:
    b = spec_from_config(cfg, cfg_path)
    return b.tag or _default_tag(b, content_hash(b))
