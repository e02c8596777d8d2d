"""Seccomp profiles: one source of truth for what each ``policy.seccomp`` value means.

- ``default``: the container engines' own default filter (an allowlist of ~370 syscalls; with all
  capabilities dropped it also denies mount, ptrace-like, module and clock syscalls).
- ``restrictive``: that same default with ``RESTRICTIVE_DENY`` removed from every allow rule and
  denied with EPERM explicitly (debugging/tracing, namespaces, io_uring, keyrings, BPF, userfaultfd).
  ``clone3`` stays allowed (the reference's restrictive profile returned EPERM for it, which breaks
  thread creation in newer glibc).

The generated profile is a Docker/Podman-format JSON file (both engines read it); the ``oci`` backend
converts the same data into the OCI runtime-spec form.
"""

from __future__ import annotations

import os

from . import paths
from .errors import BackendUnavailable

DEFAULT_PROFILE_SOURCES = ("/usr/share/containers/seccomp.json",)

RESTRICTIVE_DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "perf_event_open",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "bpf", "userfaultfd",
    "name_to_handle_at", "open_by_handle_at", "personality", "acct", "quotactl",
)


def load_default_profile() -> dict:
    import json

    for src in DEFAULT_PROFILE_SOURCES:
        if os.path.exists(src):
            with open(src) as f:
                return json.load(f)
    raise BackendUnavailable(
        "the engines' default seccomp profile was not found (" + ", ".join(DEFAULT_PROFILE_SOURCES) + ")",
        hint="install podman (it ships /usr/share/containers/seccomp.json): bash scripts/setup.sh",
    )


def restrictive_profile() -> dict:
    prof = load_default_profile()
    deny = set(RESTRICTIVE_DENY)
    rules = []
    for rule in prof.get("syscalls", []):
        if rule.get("action") == "SCMP_ACT_ALLOW":
            names = [n for n in rule.get("names", []) if n not in deny]
            if not names:
                continue
            rule = dict(rule, names=names)
        rules.append(rule)
    rules.append({"names": sorted(deny), "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                  "comment": "agentkernel restrictive profile"})
    prof["syscalls"] = rules
    return prof


def profile_path(name: str) -> str | None:
    """Path of a Docker-format profile file for ``name``; None means the engine's built-in default."""
    if name == "default":
        return None
    if name != "restrictive":
        raise ValueError(f"unknown seccomp profile {name!r}")
    import hashlib
    import json

    blob = json.dumps(restrictive_profile(), sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    d = os.path.join(paths.cache_dir(), "seccomp")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"restrictive-{digest}.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    return path
