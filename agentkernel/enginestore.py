"""Where the container engines keep their storage, read from their configuration files (no engine call):
podman's ``storage.conf`` and dockerd's daemon config. ``scripts/setup.sh`` moves both onto the quota
volume (btrfs drivers), so nothing may assume ``/var/lib/containers/storage`` or ``/var/lib/docker``.

Standard library only, no json import: the image-index paths are read on the CLI's hot path.
"""

from __future__ import annotations

import os

DOCKER_CONFIGS = ("/etc/agentkernel/dockerd.json", "/etc/docker/daemon.json")
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"


def podman_storage() -> tuple[str, str]:
    """(driver, graphroot) of rootful podman's storage from its storage.conf ($CONTAINERS_STORAGE_CONF,
    else /etc/containers/storage.conf), podman's defaults where it says nothing. A line reader, not a TOML
    parser: setup.sh writes the file with one plain ``key = "value"`` per line."""
    conf = os.environ.get("CONTAINERS_STORAGE_CONF") or "/etc/containers/storage.conf"
    driver, graphroot, section = "overlay", "/var/lib/containers/storage", ""
    from .resolvedspec import note, read_file

    raw = read_file(conf)
    note(("file", conf, raw))  # the index's location (resolvedspec)
    lines = raw.decode(errors="replace").splitlines() if raw is not None else []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[] ")
        elif section == "storage" and "=" in line:
            key, _, val = line.partition("=")
            key, val = key.strip(), val.strip().strip('"').strip("'")
            if key == "driver" and val:
                driver = val
            elif key == "graphroot" and val:
                graphroot = val
    return driver, graphroot


def podman_index() -> str:
    """podman's image index (images.json) of its configured driver and graphroot."""
    driver, graphroot = podman_storage()
    return os.path.join(graphroot, f"{driver}-images", "images.json")


def docker_storage() -> tuple[str, str] | None:
    """(driver, data-root) of the local dockerd from its config file ($AGENTKERNEL_DOCKERD_CONFIG names the
    config of the daemon DOCKER_HOST points at); None when DOCKER_HOST names another daemon whose config is
    not named (its storage is not knowable without asking it)."""
    host = os.environ.get("DOCKER_HOST", "")
    named = os.environ.get("AGENTKERNEL_DOCKERD_CONFIG")
    if not named and host and host not in ("unix://" + DEFAULT_DOCKER_SOCKET, "unix:///run/docker.sock"):
        return None
    driver, root = "overlay2", "/var/lib/docker"
    from .resolvedspec import note, read_file

    for path in (named,) if named else DOCKER_CONFIGS:
        raw = read_file(path)
        note(("file", path, raw))  # the index's location (resolvedspec)
        if raw is None:
            continue
        try:
            from ._fastjson import loads

            cfg = loads(raw)
        except ValueError:
            continue
        if isinstance(cfg, dict):
            driver = str(cfg.get("storage-driver") or driver)
            root = str(cfg.get("data-root") or root)
        break
    return driver, root


def docker_index() -> str | None:
    """dockerd's image index (repositories.json), or None when it cannot be located (ask dockerd then)."""
    st = docker_storage()
    if st is None:
        return None
    return os.path.join(st[1], "image", st[0], "repositories.json")
