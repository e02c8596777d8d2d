"""Seccomp profiles: one source of truth for what each ``policy.seccomp`` value means.

- ``default``: the container engines' default filter (an allowlist of ~370 syscalls; with all
  capabilities dropped it also denies mount, ptrace-like, module and clock syscalls), **minus the
  creation of namespaces**, as Docker's own default does: ``unshare`` and ``setns`` fail with EPERM,
  ``clone`` is allowed only without namespace flags (CLONE_NEWUSER, CLONE_NEWNET, ...), ``clone3``
  answers ENOSYS (its flags are in memory a filter cannot read; libc then falls back to ``clone``).
  Podman's shipped default allows all of these, so ``unshare -rn`` inside a sandbox gave a full
  capability set in a fresh user namespace (and netlink, nf_tables, mount of new filesystems: the
  kernel attack surface that unprivileged user namespaces open). See docs/security.md (item 8).
- ``restrictive``: ``default`` with ``RESTRICTIVE_DENY`` removed from every allow rule and denied with
  EPERM explicitly (debugging/tracing, namespaces, io_uring, keyrings, BPF, userfaultfd).

The generated profiles are Docker/Podman-format JSON files (both engines read them); the ``oci``
backend converts the same data into the OCI runtime-spec form. Files are cached under a key made of
the source profile's stat and ``PROFILE_VERSION`` (one stat per run on the hot path, no parsing).
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


# Bump when what the profiles mean changes: cached files and the oci backend's compiled filters follow.
PROFILE_VERSION = "2-no-namespaces"

# clone flags that create namespaces (Docker's mask): NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
NAMESPACE_SYSCALLS = ("unshare", "setns")
ENOSYS = 38


def _without(rules: list[dict], names: set[str]) -> list[dict]:
    out = []
    for rule in rules:
        if rule.get("action") == "SCMP_ACT_ALLOW" or set(rule.get("names", [])) & names:
            kept = [n for n in rule.get("names", []) if n not in names]
            if not kept:
                continue
            rule = dict(rule, names=kept)
        out.append(rule)
    return out


def default_profile() -> dict:
    """The engines' default filter with namespace creation blocked (see the module docstring)."""
    prof = load_default_profile()
    rules = _without(prof.get("syscalls", []), {"clone", "clone3", *NAMESPACE_SYSCALLS})
    rules += [
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
         "excludes": {"arches": ["s390", "s390x"]}, "comment": "agentkernel: clone without namespace flags"},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
         "includes": {"arches": ["s390", "s390x"]}, "comment": "agentkernel: s390 has clone's flags second"},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS,
         "comment": "agentkernel: flags unreadable by a filter; ENOSYS makes libc use clone"},
        {"names": list(NAMESPACE_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
         "comment": "agentkernel: no new namespaces (user namespaces above all)"},
    ]
    prof["syscalls"] = rules
    return prof


def restrictive_profile() -> dict:
    prof = default_profile()
    deny = set(RESTRICTIVE_DENY)
    rules = _without(prof.get("syscalls", []), deny)
    rules.append({"names": sorted(deny), "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                  "comment": "agentkernel restrictive profile"})
    prof["syscalls"] = rules
    return prof


def source_stamp() -> list[str]:
    """Path, mtime (ns) and size of the first default profile source that exists ([] when none): what
    cache keys of generated profiles depend on, for one stat and no parsing."""
    for src in DEFAULT_PROFILE_SOURCES:
        try:
            st = os.stat(src)
        except OSError:
            continue
        return [src, str(st.st_mtime_ns), str(st.st_size)]
    return []


def profile_path(name: str) -> str:
    """Path of the Docker-format profile file for ``name`` (generated once, then one stat per call)."""
    if name not in ("default", "restrictive"):
        raise ValueError(f"unknown seccomp profile {name!r}")
    parts = [PROFILE_VERSION, name, ",".join(RESTRICTIVE_DENY) if name == "restrictive" else ""]
    parts += source_stamp()
    from _sha256 import sha256  # hashlib's OpenSSL import costs milliseconds on the hot path

    digest = sha256("|".join(parts).encode()).hexdigest()[:16]
    d = os.path.join(paths.cache_dir(), "seccomp")
    path = os.path.join(d, f"{name}-{digest}.json")
    if os.path.exists(path):
        return path
    import json

    os.makedirs(d, exist_ok=True)
    prof = default_profile() if name == "default" else restrictive_profile()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(prof, f, sort_keys=True)
    os.replace(tmp, path)
    return path
