"""Backend registry: names map to "module:Class" strings, imported on first use (like fsspec).

``agentkernel run`` on podman never imports the Kubernetes client or wasmtime. A backend whose
optional dependencies are missing fails with a clear error naming the extra to install.
"""

from __future__ import annotations

import importlib

from ..errors import MissingExtra, NotFound

# name -> (module:Class, extra that provides its dependencies or None)
REGISTRY: dict[str, tuple[str, str | None]] = {
    "podman": ("agentkernel.backends.podman:PodmanBackend", None),
    "docker": ("agentkernel.backends.docker:DockerBackend", None),
    "gvisor": ("agentkernel.backends.gvisor:GVisorBackend", None),
    "oci": ("agentkernel.backends.oci:OCIBackend", None),
    "wasm": ("agentkernel.backends.wasm:WasmBackend", "wasm"),
    "qemu": ("agentkernel.backends.qemu:QemuBackend", None),
    "firecracker": ("agentkernel.backends.firecracker:FirecrackerBackend", None),
    "kubernetes": ("agentkernel.backends.kubernetes:KubernetesBackend", "k8s"),
    "nomad": ("agentkernel.backends.nomad:NomadBackend", "nomad"),
    "apple": ("agentkernel.backends.apple:AppleBackend", None),
}

ALIASES = {"k8s": "kubernetes", "runsc": "gvisor", "hyperlight": "wasm"}

_loaded: dict[str, type] = {}


def names() -> list[str]:
    return list(REGISTRY)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def get_backend_class(name: str) -> type:
    name = canonical(name)
    cls = _loaded.get(name)
    if cls is not None:
        return cls
    try:
        target, extra = REGISTRY[name]
    except KeyError:
        raise NotFound(
            f"unknown backend {name!r} (known: {', '.join(REGISTRY)})",
            hint="agentkernel doctor lists every backend and whether it works here",
        ) from None
    mod_name, cls_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("agentkernel"):
            raise MissingExtra(
                f"backend {name!r} needs the Python package {exc.name!r}",
                hint=f"pip install 'agentkernel-sandbox[{extra}]'" if extra else "reinstall agentkernel",
            ) from exc
        if exc.name == mod_name:
            raise NotFound(f"backend {name!r} is not built into this version of agentkernel") from exc
        raise
    cls = getattr(mod, cls_name)
    _loaded[name] = cls
    return cls


def get_backend(name: str, options: dict[str, str] | None = None):
    return get_backend_class(name)(options)
