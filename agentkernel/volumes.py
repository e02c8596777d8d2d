"""Named volumes: host directories that outlive sandboxes, mounted with ``volumes: ["name:/path[:ro]"]``.

Each volume is ``<data dir>/volumes/<name>/`` holding ``data/`` (what the sandbox sees) and
``volume.json`` (its metadata). Names follow the sandbox-name rules, so no path character gets in.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from . import paths
from .errors import AlreadyExists, NotFound, ValidationError
from .spec import check_sandbox_path, validate_name


def root() -> str:
    return os.path.join(paths.data_dir(), "volumes")


def _dir(name: str) -> str:
    return os.path.join(root(), validate_name(name, "volume name"))


def data_path(name: str) -> str:
    d = _dir(name)
    if not os.path.isfile(os.path.join(d, "volume.json")):
        raise NotFound(f"no such volume: {name}", hint=f"agentkernel volume create {name}")
    return os.path.join(d, "data")


def create(name: str) -> dict:
    d = _dir(name)
    os.makedirs(root(), exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        raise AlreadyExists(f"volume {name} already exists") from None
    os.mkdir(os.path.join(d, "data"), 0o777)
    os.chmod(os.path.join(d, "data"), 0o777)  # the sandbox's non-root user writes here
    meta = {"name": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(d, "volume.json"), "w") as f:
        json.dump(meta, f)
    return info(name)


def _size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total


def info(name: str) -> dict:
    data = data_path(name)
    with open(os.path.join(_dir(name), "volume.json")) as f:
        meta = json.load(f)
    return {**meta, "path": data, "size_bytes": _size(data)}


def list_volumes() -> list[dict]:
    if not os.path.isdir(root()):
        return []
    out = []
    for n in sorted(os.listdir(root())):
        try:
            out.append(info(n))
        except (NotFound, ValidationError, OSError, ValueError):
            continue
    return out


def remove(name: str) -> None:
    data_path(name)
    shutil.rmtree(_dir(name))


def parse_mounts(specs: list[str]) -> list[tuple[str, str, bool]]:
    """["name:/path[:ro]", ...] -> [(host dir, sandbox path, read_only)], every volume existing."""
    out = []
    seen: set[str] = set()
    for s in specs:
        parts = s.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValidationError(f"volume mount {s!r} must be NAME:/path or NAME:/path:ro")
        name, dest = parts[0], parts[1]
        check_sandbox_path(dest)
        if dest == "/" or dest in seen:
            raise ValidationError(f"volume mount {s!r}: {dest} cannot be mounted over (root, or mounted twice)")
        seen.add(dest)
        out.append((data_path(name), dest, len(parts) == 3 and parts[2] == "ro"))
    return out
