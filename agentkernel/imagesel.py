"""Which image a sandbox gets: the one rule, in one place (CLI, API, Python SDK, bench all call here).

1. An explicit image (``--image``, ``AGENTKERNEL_IMAGE``, ``[sandbox] image``, an API/SDK argument) wins.
2. Otherwise the runtime is detected from the command (``RUNTIMES[...].commands``), else, when the
   working directory is mounted, from its project files (``pyproject.toml`` -> python, ``package.json``
   -> node, ...); otherwise the default.
3. A runtime has a public image (the reference's choice, e.g. ``python:3.12-alpine``) and maybe a local
   one built offline by agentkernel (``agentkernel/debian`` has python3; ``agentkernel/busybox`` a shell).
   The public image is used when it is already in the backend's store, or when it can be pulled: the
   pull policy allows it and its registry was not found unreachable in the last ``UNREACHABLE_TTL``
   seconds. Runtimes that need no toolchain (``LOCAL_FIRST``: plain commands, ``sh``) use their local
   image unless the public one is present or a registry is configured: they never probe a registry.
   ``AGENTKERNEL_REGISTRY`` / ``[images] registry`` makes public names come from that registry (a mirror).
   Otherwise, and when the pull fails because the registry is unreachable, the local image is used (the
   failure is remembered, so later runs do not wait for it again).

``explain()`` reports the decision without pulling or running anything (``agentkernel run --explain``).
Which store a backend reads is its registry entry's ``image_store`` (``images.pull.store_of``).
"""

from __future__ import annotations

import os
import time

from .errors import NotFound
from .images.pull import store_of
from .resolvedspec import listing, note, volatile

TYPE_CHECKING = False  # typing costs ~2 ms at start-up; annotations here are never evaluated
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

UNREACHABLE_TTL = 600.0


class Runtime:
    __slots__ = ("commands", "files", "local", "name", "public")

    def __init__(self, name: str, public: str, local: str | None, commands: tuple[str, ...],
                 files: tuple[str, ...]) -> None:
        self.name, self.public, self.local, self.commands, self.files = name, public, local, commands, files


RUNTIMES = (
    Runtime("python", "python:3.12-alpine", "agentkernel/debian",
            ("python", "python3", "pip", "pip3", "poetry", "uv", "pytest", "ruff"),
            ("pyproject.toml", "requirements.txt", "setup.py", "setup.cfg", "Pipfile", "poetry.lock", "uv.lock")),
    Runtime("node", "node:22-alpine", None, ("node", "npm", "npx", "yarn", "pnpm", "bun", "tsx", "ts-node"),
            ("package.json", "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb")),
    Runtime("rust", "rust:1.85-alpine", None, ("cargo", "rustc", "rustup", "rustfmt", "clippy"),
            ("Cargo.toml", "Cargo.lock")),
    Runtime("go", "golang:1.23-alpine", None, ("go", "gofmt"), ("go.mod", "go.sum")),
    Runtime("ruby", "ruby:3.3-alpine", None, ("ruby", "gem", "bundle", "bundler", "rake", "rails"),
            ("Gemfile", "Gemfile.lock", "*.gemspec")),
    Runtime("java", "eclipse-temurin:21-alpine", None, ("java", "javac", "mvn", "gradle", "gradlew"),
            ("pom.xml", "build.gradle", "build.gradle.kts", "settings.gradle")),
    Runtime("c", "gcc:14-bookworm", None, ("gcc", "g++", "make", "cmake", "cc"), ("Makefile", "CMakeLists.txt")),
    Runtime("php", "php:8.3-alpine", None, ("php", "composer"), ("composer.json", "composer.lock")),
    Runtime("elixir", "elixir:1.16-alpine", None, ("elixir", "mix", "iex"), ("mix.exs", "mix.lock")),
    Runtime("debian", "agentkernel/debian", "agentkernel/debian", ("apt-get", "apt", "dpkg", "bash", "perl"), ()),
    Runtime("shell", "alpine:3.20", "agentkernel/busybox", ("sh", "ash", "busybox"), ("*.sh",)),
)
DEFAULT = Runtime("default", "alpine:3.20", "agentkernel/busybox", (), ())
DEFAULT_IMAGE = "agentkernel/busybox"  # what backends without an image store get
# runtimes that need no particular toolchain: their local image is used unless the public one is present or
# a registry is configured (so `agentkernel run -- echo hi` never probes a registry)
LOCAL_FIRST = ("default", "shell")


class Selection:
    """``present``: the selection already found ``image`` in the store (``choose_image`` then does not look
    again under the ``missing`` and ``never`` policies: the check is ~0.3 ms of the warm run)."""

    __slots__ = ("fallback", "image", "present", "reason", "runtime")

    def __init__(self, image: str, reason: str, *, fallback: str | None = None, runtime: str = "",
                 present: bool = False) -> None:
        self.image, self.reason, self.fallback, self.runtime = image, reason, fallback, runtime
        self.present = present

    def to_dict(self) -> dict:
        return {"image": self.image, "reason": self.reason, "fallback": self.fallback, "runtime": self.runtime}


def detect_runtime(argv: list[str] | None, cwd: str | None = None) -> tuple[Runtime, str]:
    """(runtime, why) from the command, then the project files of ``cwd`` (when given: it is mounted)."""
    prog = argv[0].rsplit("/", 1)[-1] if argv else ""
    for rt in RUNTIMES:
        if prog in rt.commands:
            return rt, f"command {prog!r}"
    if prog.startswith("python3.") or prog.startswith("python2"):
        return RUNTIMES[0], f"command {prog!r}"
    if cwd:
        names = listing(cwd)
        note(("listdir", cwd, names))
        names = names or []
        for rt in RUNTIMES:
            for pat in rt.files:
                hit = [n for n in names if n.endswith(pat[1:])] if pat.startswith("*") else \
                    ([pat] if pat in names else [])
                if hit:
                    return rt, f"project file {hit[0]!r} in the mounted directory"
    return DEFAULT, "no runtime detected from the command" + (" or the project files" if cwd else "")


def _marker(registry: str | None) -> str:
    from . import paths

    d = os.path.join(paths.cache_dir(), "images")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"unreachable-{(registry or 'default').replace('/', '_')}")


def registry_unreachable_since(registry: str | None) -> float | None:
    volatile()  # the mark expires with time: a decision that read it is never reused
    try:
        t = os.stat(_marker(registry)).st_mtime
    except OSError:
        return None
    return t if time.time() - t < UNREACHABLE_TTL else None


def mark_unreachable(registry: str | None, reachable: bool = False) -> None:
    volatile()
    path = _marker(registry)
    if reachable:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    with open(path, "w") as f:
        f.write(f"{time.time():.0f}\n")


def _public_name(rt: Runtime, config: dict | None) -> str:
    from .images.settings import configured_registry

    reg = configured_registry(config)
    if reg and rt.public != rt.local and "/" not in rt.public.split(":")[0]:
        return f"{reg}/library/{rt.public}"
    return rt.public


def _registry_of(image: str) -> str | None:
    first, sep, _ = image.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else None


def image_store(backend: str, options: dict[str, str] | None = None) -> str | None:
    """The image store ``backend`` runs images from (its registry entry's ``image_store``), or None."""
    return store_of(backend, options)


def select(backend: str, argv: list[str] | None, options: dict[str, str] | None = None, *, cwd: str | None = None,
           policy: str = "missing", config: dict | None = None) -> Selection:
    """The decision alone (no pull): what ``choose_image`` will try first, and its fallback."""
    from .images.pull import present

    rt, why = detect_runtime(argv, cwd)
    store = store_of(backend, options)
    if store is None:
        return Selection(rt.local or DEFAULT_IMAGE, f"{why}; backend {backend!r} has no image store", runtime=rt.name)
    public = _public_name(rt, config)
    local = rt.local
    if public == local:
        return Selection(local, f"{why} -> {rt.name}: agentkernel's local image", runtime=rt.name)
    if present(store, public):
        return Selection(public, f"{why} -> {rt.name}: {public} is already in {store}", runtime=rt.name,
                         present=True)
    local_ok = bool(local) and present(store, local)
    if rt.name in LOCAL_FIRST and local_ok and _public_name(rt, config) == rt.public:
        # no runtime-specific tools needed: never wait on an unconfigured registry for a plain shell
        return Selection(local, f"{why} -> {rt.name}: the local {local} ({rt.public} is not in {store}; it is "
                         "used when present or when a registry is configured)", runtime=rt.name, present=True)
    if policy == "never":
        if local_ok:
            return Selection(local, f"{why} -> {rt.name}: {public} is not in {store} and the pull policy is "
                             f"'never'; using the local {local}", runtime=rt.name, present=True)
        return Selection(public, f"{why} -> {rt.name}: {public} (not in {store}; pull policy 'never')",
                         runtime=rt.name)
    since = registry_unreachable_since(_registry_of(public))
    if since is not None and local_ok:
        return Selection(local, f"{why} -> {rt.name}: the registry for {public} was unreachable "
                         f"{time.time() - since:.0f} s ago; using the local {local}", runtime=rt.name)
    return Selection(public, f"{why} -> {rt.name}: {public}, pulled into {store} (not present)",
                     fallback=local if local_ok else None, runtime=rt.name)


def choose_image(backend: str, argv: list[str] | None, options: dict[str, str] | None = None, *,
                 cwd: str | None = None, policy: str = "missing", config: dict | None = None,
                 progress: bool | None = None, before_pull: Callable[[], None] | None = None) -> str:
    """Select, then make the image available (pulling per ``policy``; the local fallback when the
    registry is unreachable). ``before_pull``: see ``images.pull.ensure``."""
    from .images.pull import ensure
    from .images.pullerrors import PullError

    sel = select(backend, argv, options, cwd=cwd, policy=policy, config=config)
    if store_of(backend, options) is None or (sel.present and policy != "always"):
        return sel.image
    try:
        ensure(backend, sel.image, policy, config=config, progress=progress, options=options,
               before_pull=before_pull)
        if sel.fallback:
            mark_unreachable(_registry_of(sel.image), reachable=True)
        return sel.image
    except PullError as exc:
        if exc.kind not in ("unreachable", "insecure", "short-name") or not sel.fallback:
            raise
        mark_unreachable(_registry_of(sel.image))
        import sys

        if sys.stderr.isatty():  # quiet otherwise: --explain says it, and callers' stderr stays the command's
            sys.stderr.write(f"agentkernel: {exc.message}; using the local image {sel.fallback} instead\n")
        return sel.fallback


def image_for_spec(spec, argv: list[str] | None, *, config: dict | None, config_path: str | None = None,
                   explicit: bool, pull: str | None = None, progress: bool | None = None,
                   preflight: Callable[[Any], None] | None = None):
    """The one place a spec gets its image, for every entry point: an explicit image is pulled per the
    policy; otherwise ``[build]`` builds one (cached by content), else one is chosen for ``argv`` (and
    pulled, with the local fallback). ``pull`` is the --pull flag (None: environment / config / default).
    ``preflight(spec)`` (the backend's policy check) runs before any pull or build: a spec the backend
    refuses costs no download."""
    import os

    from .images.settings import pull_policy

    policy = pull_policy(pull, config)
    before_pull = None if preflight is None else (lambda: preflight(spec))
    if not explicit and (config or {}).get("build"):
        from .images.dockerbuild import build_from_config

        volatile()  # the build's inputs (Dockerfile, context) are not recorded
        if before_pull is not None:
            before_pull()
        return spec.replace(image=build_from_config(config, config_path, backend=spec.backend))
    if not explicit and argv:
        cwd = os.getcwd() if spec.policy.mount_cwd else None
        return spec.replace(image=choose_image(spec.backend, argv, spec.options, cwd=cwd, policy=policy,
                                               config=config, progress=progress, before_pull=before_pull))
    from .images.pull import ensure

    ensure(spec.backend, spec.image, policy, config=config, progress=progress, options=spec.options,
           before_pull=before_pull)
    return spec


def explicit_image(flags: dict | None, config: dict | None) -> bool:
    """Whether the image is named (flags, AGENTKERNEL_IMAGE, or the config's [sandbox] image) rather than
    left to be chosen for the command."""
    import os

    return bool((flags or {}).get("image") or os.environ.get("AGENTKERNEL_IMAGE")
                or (config or {}).get("sandbox", {}).get("image"))


def resolve_for_command(flags: dict | None, argv: list[str] | None, *,
                        config: dict | None = None, config_path: str | None = None,
                        environ: dict[str, str] | None = None, pull: str | None = None,
                        progress: bool | None = None, preflight: Callable[[Any], None] | None = None):
    """``config.resolve_spec`` plus the image, by one rule for every entry point (CLI, Python API, HTTP/MCP):
    ``image_for_spec`` with the image counted as explicit when the flags, ``AGENTKERNEL_IMAGE``
    or the config file name it (pulled per policy), else built from ``[build]`` or chosen for ``argv``.
    ``preflight``: see ``image_for_spec``."""
    from .config import resolve_spec

    spec = resolve_spec(flags, config=config, environ=environ)
    if spec.policy.mount_cwd and not spec.policy.mount_source:
        import os

        # the caller's directory, fixed now: a daemon or pool that creates the sandbox elsewhere binds it
        spec = spec.replace(policy=spec.policy.replace(mount_source=os.path.realpath(os.getcwd())))
    return image_for_spec(spec, argv, config=config, config_path=config_path,
                          explicit=explicit_image(flags, config), pull=pull, progress=progress,
                          preflight=preflight)


def explain(backend: str, argv: list[str] | None, *, image: str | None, image_source: str | None,
            cwd: str | None, policy: str, config: dict | None, options: dict[str, str] | None = None) -> str:
    from .images.pull import present

    store = store_of(backend, options)
    lines = [f"backend: {backend} (image store: {store or 'none'})", f"pull policy: {policy}"]
    if image:
        lines += [f"image: {image}", f"why: explicit ({image_source})"]
        target = image
    else:
        sel = select(backend, argv, options, cwd=cwd, policy=policy, config=config)
        lines += [f"image: {sel.image}", f"why: {sel.reason}"]
        if sel.fallback:
            lines.append(f"fallback: {sel.fallback} (if the registry is unreachable)")
        target = sel.image
    if store:
        have = present(store, target)
        lines.append(f"present in {store}: {'yes' if have else 'no'}"
                     + ("" if have else (" (would be pulled)" if policy != "never" else " (would fail: policy never)")))
    return "\n".join(lines)


# ---- presence (doctor, the API service) ----------------------------------------------------------------


def local_images(engine: str) -> set[str] | None:
    from .images.pull import _index_names

    return _index_names(engine)


def image_present(engine: str, image: str) -> bool:
    from .images.pull import present

    return present(engine, image)


def missing_image_error(engine: str, image: str) -> NotFound:
    return NotFound(
        f"image {image!r} is not present in {engine}",
        hint=f"pull it: agentkernel images pull {image} (or --pull missing); build agentkernel's local images: "
        "agentkernel images build",
    )
