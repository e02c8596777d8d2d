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


def auto_choice() -> dict:
    """What ``backend = "auto"`` picks on this host and why (probed afresh: doctor refreshes the cache)."""
    from ..backends import auto
    from ..config import default_spec_for

    try:
        decision = auto.decide(default_spec_for, refresh=True)
        return {"backend": decision[0], "order": list(auto.ORDER), "candidates": decision[1],
                "lines": auto.explain_lines(decision)}
    except AgentKernelError as exc:
        return {"backend": None, "order": list(auto.ORDER), "error": exc.message, "lines": [exc.message]}


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
    checks.extend(storage_checks())
    return checks


def storage_checks() -> list[dict]:
    """Whether each backend family can enforce the profiles' writable-storage cap here, and why (a backend
    that cannot refuses every spec with disk_mb: the default profiles all set one)."""
    from ..backends import docker, podman, wasm
    from ..diskquota import FIX

    out = []
    for label, status in (("podman, gvisor", podman.storage_cap_status), ("docker, gvisor-docker",
                                                                           docker.storage_cap_status),
                          ("wasm", wasm.storage_cap_status)):
        try:
            ok, why = status()
        except AgentKernelError as exc:
            ok, why = False, exc.message
        out.append({"check": f"storage cap ({label})", "ok": ok, "detail": why if ok else f"{why}; fix: {FIX}"})
    out.append({"check": "storage cap (oci)", "ok": True,
                "detail": "the writable layer is a tmpfs of disk_mb (its pages count against the memory limit too)"})
    return out


def doctor(args) -> int:
    rows = probe_all()
    checks = host_checks()
    auto = auto_choice()
    if args.json:
        print(json.dumps({"backends": rows, "checks": checks, "auto": auto}, indent=2))
        return 0
    w = max(len(r["backend"]) for r in rows)
    print("Backends:")
    for r in rows:
        mark = "ok " if r["available"] else "-- "
        print(f"  {mark} {r['backend']:<{w}}  {r['reason']}")
        if not r["available"] and r.get("fix"):
            print(f"      {'':<{w}}  fix: {r['fix']}")
    print("Default backend (auto):")
    print("\n".join("  " + line for line in auto["lines"]))
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
