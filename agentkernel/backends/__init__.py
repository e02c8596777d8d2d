"""Backend registry: one line per backend, name -> lazily imported class plus metadata (like fsspec).

``agentkernel run`` on podman never imports wasmtime or a cluster client. A backend whose optional
dependencies are missing fails with a clear error naming the extra to install. The metadata here is the
only list of backends: ``doctor`` probes every entry, ``gc`` scans the entries marked ``gc``, image
selection asks the entry's ``image_store``, and the conformance suite runs every entry (and variant).

Adding a backend: its module (implementing ``base.Backend`` and the optional protocols it supports),
one ``_entry(...)`` line below, and a green ``tests/conformance`` run. See docs/architecture.md.
"""

from __future__ import annotations

import sys

from ..errors import MissingExtra, NotFound

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from typing import Any


class BackendEntry:
    """One registry line.

    - ``target``: "module:Class", imported on first use;
    - ``extra``: the pip extra providing its Python dependencies (None: none needed);
    - ``image_store``: where its images live ("podman", "docker", "oci": the oci backend's own cache, which
      also unpacks from podman's and docker's stores; None: it does not run OCI images) -
      image selection and doctor's image checks read it;
    - ``gc``: ``agentkernel gc`` and the daemon's start-up scan list this backend's resources (False when
      another entry's scan already covers them, e.g. gVisor's containers are podman's);
    - ``platform``: the ``sys.platform`` it runs on;
    - ``isolation``: a short class of isolation ("container", "user-space kernel", "wasm", "vm", ...);
    - ``variants``: option sets the conformance suite runs besides the defaults (e.g. oci's runtimes);
    - ``routes``: ``{(option, value): entry}``: a spec for this backend with that option is served by
      another entry (``gvisor -o engine=docker`` is ``gvisor-docker``).
    """

    __slots__ = ("extra", "gc", "image_store", "isolation", "name", "platform", "routes", "target", "variants")

    def __init__(self, name: str, target: str, *, extra: str | None = None, image_store: str | None = None,
                 gc: bool = False, platform: str = "linux", isolation: str = "container",
                 variants: tuple[dict[str, str], ...] = (),
                 routes: dict[tuple[str, str], str] | None = None) -> None:
        self.name = name
        self.target = target
        self.extra = extra
        self.image_store = image_store
        self.gc = gc
        self.platform = platform
        self.isolation = isolation
        self.variants = variants
        self.routes = routes or {}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "extra": self.extra, "image_store": self.image_store,
                "gc": self.gc, "platform": self.platform, "isolation": self.isolation,
                "variants": [dict(v) for v in self.variants]}


def _entry(name: str, target: str, **meta: Any) -> tuple[str, BackendEntry]:
    return name, BackendEntry(name, target, **meta)


REGISTRY: dict[str, BackendEntry] = dict([
    _entry("podman", "agentkernel.backends.podman:PodmanBackend", image_store="podman", gc=True),
    _entry("docker", "agentkernel.backends.docker:DockerBackend", image_store="docker", gc=True),
    _entry("gvisor", "agentkernel.backends.gvisor:GVisorBackend", image_store="podman",
           isolation="user-space kernel", routes={("engine", "docker"): "gvisor-docker"}),
    _entry("gvisor-docker", "agentkernel.backends.gvisor_docker:GVisorDockerBackend", image_store="docker",
           isolation="user-space kernel"),
    _entry("oci", "agentkernel.backends.oci:OCIBackend", image_store="oci", gc=True,
           variants=({"runtime": "runc"}, {"runtime": "runsc"})),
    # gc: scratch directories of dead processes and named sandboxes (issue 12 item 6)
    _entry("wasm", "agentkernel.backends.wasm:WasmBackend", extra="wasm", isolation="wasm", gc=True),
    _entry("qemu", "agentkernel.backends.qemu:QemuBackend", image_store="podman", gc=True, isolation="vm"),
    _entry("firecracker", "agentkernel.backends.firecracker:FirecrackerBackend", image_store="podman", gc=True,
           isolation="vm"),
    _entry("apple", "agentkernel.backends.apple:AppleBackend", platform="darwin", isolation="vm"),
    # clusters: images are the cluster's (no local image store); gc scans them when one is configured
    _entry("kubernetes", "agentkernel.backends.kubernetes:KubernetesBackend", extra="k8s", gc=True,
           isolation="container (pod)"),
    _entry("nomad", "agentkernel.backends.nomad:NomadBackend", extra="nomad", gc=True,
           isolation="container (nomad allocation)"),
])

ALIASES = {"runsc": "gvisor", "hyperlight": "wasm", "k8s": "kubernetes"}

_loaded: dict[str, type] = {}


def names() -> list[str]:
    return list(REGISTRY)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def entry(name: str, options: dict[str, str] | None = None) -> BackendEntry:
    """The registry entry serving backend ``name`` with ``options`` (aliases and routes applied)."""
    name = canonical(name)
    try:
        e = REGISTRY[name]
    except KeyError:
        raise NotFound(
            f"unknown backend {name!r} (known: {', '.join(REGISTRY)})",
            hint="agentkernel doctor lists every backend and whether it works here",
        ) from None
    if options and e.routes:
        for (opt, value), target in e.routes.items():
            if options.get(opt) == value:
                return REGISTRY[target]
    return e


def get_backend_class(name: str, options: dict[str, str] | None = None) -> type:
    e = entry(name, options)
    cls = _loaded.get(e.name)
    if cls is not None:
        return cls
    mod_name, cls_name = e.target.split(":")
    try:
        __import__(mod_name)  # not importlib.import_module: `importlib` (+ warnings) costs the CLI's warm path
        mod = sys.modules[mod_name]
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("agentkernel"):
            raise MissingExtra(
                f"backend {e.name!r} needs the Python package {exc.name!r}",
                hint=f"pip install 'agentkernel-sandbox[{e.extra}]'" if e.extra else "reinstall agentkernel",
            ) from exc
        if exc.name == mod_name:
            raise NotFound(f"backend {e.name!r} is not built into this version of agentkernel") from exc
        raise
    cls = getattr(mod, cls_name)
    _loaded[e.name] = cls
    return cls


def get_backend(name: str, options: dict[str, str] | None = None):
    return get_backend_class(name, options)(options)
