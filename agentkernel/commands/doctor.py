"""``agentkernel doctor``: every backend, whether it works on this host, and exactly why not."""

from __future__ import annotations

import json
import os
import sys

from .. import paths
from ..backends import REGISTRY, get_backend_class
from ..errors import AgentKernelError


def probe_all() -> list[dict]:
    rows = []
    for name, ent in REGISTRY.items():
        if ent.platform != sys.platform:
            rows.append({"backend": name, "available": False, "fix": None, "details": {},
                         "reason": f"runs on {_OS.get(ent.platform, ent.platform)} only (this host: {sys.platform})",
                         "registry": ent.to_dict()})
            continue
        try:
            cls = get_backend_class(name)
            a = cls.probe()
            row = {"backend": name, **a.to_dict(), "isolation": cls.capabilities.isolation,
                   "registry": REGISTRY[name].to_dict()}
        except AgentKernelError as exc:
            row = {"backend": name, "available": False, "reason": exc.message, "fix": exc.hint, "details": {}}
        except Exception as exc:  # a probe must never take doctor down
            row = {"backend": name, "available": False, "reason": f"probe failed: {exc!r}", "fix": None,
                   "details": {}}
        rows.append(row)
    return rows


_OS = {"darwin": "macOS", "linux": "Linux"}


def image_stores() -> list[str]:
    """Every image store a registered backend uses (registry metadata), in registry order."""
    return list(dict.fromkeys(e.image_store for e in REGISTRY.values() if e.image_store))


def host_checks() -> list[dict]:
    agent = paths.agent_binary()
    checks = [{"check": "agent binary", "ok": agent is not None,
               "detail": agent or "missing: make -C agent (bash scripts/setup.sh)"}]
    from ..imagesel import image_present

    for engine in image_stores():
        for image in ("agentkernel/busybox", "agentkernel/debian"):
            try:
                ok = image_present(engine, image)
            except OSError:
                ok = False
            checks.append({"check": f"image {image} in {engine}", "ok": ok,
                           "detail": "present" if ok else "missing: agentkernel images build"})
    d = paths.data_dir()
    checks.append({"check": "data dir writable", "ok": os.access(d, os.W_OK), "detail": d})
    return checks


def doctor(args) -> int:
    rows = probe_all()
    checks = host_checks()
    if args.json:
        print(json.dumps({"backends": rows, "checks": checks}, indent=2))
        return 0
    w = max(len(r["backend"]) for r in rows)
    print("Backends:")
    for r in rows:
        mark = "ok " if r["available"] else "-- "
        print(f"  {mark} {r['backend']:<{w}}  {r['reason']}")
        if not r["available"] and r.get("fix"):
            print(f"      {'':<{w}}  fix: {r['fix']}")
    print("Host:")
    for c in checks:
        print(f"  {'ok ' if c['ok'] else '-- '} {c['check']}: {c['detail']}")
    return 0


def list_images() -> int:
    from ..imagesel import local_images

    for engine in image_stores():
        names = local_images(engine)
        print(f"{engine}: " + (", ".join(sorted(names)) if names is not None else "(index not readable)"))
    return 0
