"""The sandbox model: what to run, with which resources, under which policy.

One ``SandboxSpec`` is resolved per sandbox (``config.resolve_spec``), checked against the backend's
declared capabilities (``backends.base.check_policy``: fail closed), persisted with the sandbox, and
compiled by the backend into engine flags / an OCI config. It is the single source of truth for every
control; nothing downstream re-derives a default.

Standard library only: this module is imported on the CLI's hot path.
"""

from __future__ import annotations

from ._model import Field, Model, is_env_name
from .errors import ValidationError

TYPE_CHECKING = False  # typing costs ~2 ms at start-up; annotations here are never evaluated
if TYPE_CHECKING:
    from typing import Any

# Character sets instead of regular expressions: compiling regexes costs milliseconds at every CLI
# start, and these rules are simple.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# Sandbox names: 1-63 chars, letters/digits/'-'/'_', alphanumeric at both ends. No path or shell
# metacharacters can get through, so a name is safe in container names, paths and labels.
_NAME_CHARS = _ALNUM | frozenset("-_")
# Image references: registry/path:tag@digest characters only.
_IMAGE_CHARS = _ALNUM | frozenset("._/:@-")


def _is_name(s: str) -> bool:
    return (0 < len(s) <= 63 and s[0] in _ALNUM and s[-1] in _ALNUM and set(s) <= _NAME_CHARS)


PROFILE_NAMES = ("permissive", "moderate", "restrictive")
SECCOMP_PROFILES = ("default", "restrictive")


def validate_name(name: str, what: str = "sandbox name") -> str:
    if not isinstance(name, str) or not _is_name(name) or "--" in name or "__" in name:
        raise ValidationError(
            f"invalid {what} {name!r}: use 1-63 letters, digits, '-' or '_', starting and ending "
            "with a letter or digit (no path or shell characters)"
        )
    return name


def validate_image(image: str, label: str = "image") -> str:
    if (not image or len(image) > 256 or image[0] not in _ALNUM or not set(image) <= _IMAGE_CHARS
            or ".." in image or "//" in image):
        raise ValidationError(f"invalid {label} reference {image!r}")
    return image


def check_sandbox_path(path: str) -> str:
    """A path inside a sandbox: absolute, no '..' component, no NUL. Symlinks are resolved by the agent
    inside the sandbox's own mount namespace, so they cannot lead outside the sandbox's root."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValidationError(f"sandbox path must be absolute, got {path!r}")
    if any(part == ".." for part in path.split("/")):
        raise ValidationError(f"sandbox path must not contain '..': {path!r}")
    return path


def _check_name(value: str, label: str) -> None:
    validate_name(value, label)


def _check_image(value: str, label: str) -> None:
    validate_image(value, label)


def _check_abs_path(value: str, label: str) -> None:
    if not value.startswith("/") or "\0" in value or any(p == ".." for p in value.split("/")):
        raise ValidationError(f"{label} must be an absolute path without '..', got {value!r}")


# Engines take mount paths inside option strings: podman's ``--tmpfs PATH:OPTS`` and ``-v SRC:DST:MODE``,
# docker's ``Binds`` ("SRC:DST:MODE") and ``Tmpfs`` options, overlayfs' ``lowerdir=...,upperdir=...``.
# None of them has an escape for these characters, so a path carrying one is refused, not spliced.
ENGINE_PATH_FORBIDDEN = frozenset(":,\\") | frozenset(chr(c) for c in range(32)) | {"\x7f"}


def check_engine_path(value: str, label: str) -> str:
    """A host or sandbox path that is placed inside an engine's option syntax (see ENGINE_PATH_FORBIDDEN)."""
    bad = sorted(set(value) & ENGINE_PATH_FORBIDDEN)
    if bad:
        raise ValidationError(
            f"{label} {value!r} contains {', '.join(repr(c) for c in bad)}: engines' mount options cannot "
            "carry these characters",
            hint="use a path made of letters, digits, '/', '.', '-', '_' (and other plain characters)",
        )
    return value


def _check_workdir(value: str, label: str) -> None:
    _check_abs_path(value, label)
    check_engine_path(value, label)


def _check_mount_source(value: str, label: str) -> None:
    _check_abs_path(value, label)
    check_engine_path(value, label)


# Longest --timeout / API timeout accepted (one day): also rejects inf/nan/1e12, which engines and
# monotonic-clock deadlines cannot represent sensibly.
MAX_TIMEOUT_S = 24 * 3600.0


def validate_timeout(value, label: str = "timeout") -> float | None:
    """The one check every entry point (CLI flags, config, HTTP/MCP) applies to a command timeout."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{label} must be a number of seconds, got {value!r}")
    v = float(value)
    if v != v or not 0 < v <= MAX_TIMEOUT_S:
        raise ValidationError(f"{label} must be more than 0 and at most {MAX_TIMEOUT_S:g} seconds, got {value!r}")
    return v


def _check_env(value: dict[str, str], label: str) -> None:
    for k, v in value.items():
        if not is_env_name(k):
            raise ValidationError(f"{label}: invalid environment variable name {k!r}")
        if "\0" in v:
            raise ValidationError(f"{label}: value of {k} contains a NUL byte")


def _check_env_names(value: tuple[str, ...], label: str) -> None:
    for k in value:
        if not is_env_name(k):
            raise ValidationError(f"{label}: invalid environment variable name {k!r}")


def _check_user(value: str, label: str) -> None:
    uid, sep, gid = value.partition(":")
    if not (uid.isascii() and uid.isdigit() and len(uid) <= 10
            and (not sep or (gid.isascii() and gid.isdigit() and len(gid) <= 10))):
        raise ValidationError(f"{label} must be numeric 'uid' or 'uid:gid', got {value!r}")


def _check_net_entries(value: tuple[str, ...], label: str) -> None:
    if value:
        from .egress.rules import check_allow

        check_allow(value, label)


def _check_secret_bindings(value: tuple[str, ...], label: str) -> None:
    if value:
        from .egress.rules import check_bindings

        check_bindings(value, label)


NETWORK_MODES = ("none", "allowlist", "open")


def network_mode(policy: Policy) -> str:
    """none (only loopback), allowlist (only what network_allow names, through the egress gateway) or
    open (the outside world, never the host, other sandboxes or metadata addresses)."""
    if policy.network_allow:
        return "allowlist"
    return "open" if policy.network else "none"


class Resources(Model):
    """Limits. ``None`` means unlimited; a backend that cannot enforce a set limit refuses."""

    vcpus = Field("float", 1.0, optional=True, min=0.01, max=1024, doc="CPU quota in cores")
    memory_mb = Field("int", 512, optional=True, min=6, max=1 << 24, doc="memory limit (no swap)")
    pids = Field("int", 256, optional=True, min=8, max=1 << 22, doc="max processes/threads")
    disk_mb = Field("int", None, optional=True, min=1, max=1 << 24,
                    doc="writable storage cap in MiB (each profile sets one; None: unlimited, an explicit opt-out)")


class Policy(Model):
    """Security controls. Capabilities are always all dropped and no-new-privileges always set."""

    profile = Field("str", "moderate", choices=PROFILE_NAMES)
    network = Field("bool", False, doc="any network at all (loopback is always there)")
    network_allow = Field("strlist", (), check=_check_net_entries,
                          doc="egress allowlist: host, *.domain, CIDR, each with an optional :port")
    network_block = Field("strlist", (), check=_check_net_entries, doc="destinations refused whatever the mode")
    secrets = Field("strlist", (), check=_check_secret_bindings,
                    doc="secrets bound to hosts (NAME:HOST[:HEADER]); the sandbox sees a placeholder")
    tls_intercept = Field("bool", False, doc="the gateway terminates TLS to secret-bound hosts with a per-sandbox CA")
    read_only_root = Field("bool", False)
    mount_cwd = Field("bool", False, doc="bind the caller's working directory at /workspace")
    mount_source = Field("str", None, optional=True, check=_check_mount_source,
                         doc="the host directory mount_cwd binds (the caller's cwd, filled in by the caller)")
    pass_env = Field("strlist", (), check=_check_env_names, doc="host variables passed through")
    user = Field("str", "1000:1000", check=_check_user, doc="uid[:gid] commands run as")
    seccomp = Field("str", "default", choices=SECCOMP_PROFILES)


class SandboxSpec(Model):
    """Everything needed to create one sandbox. Persisted as JSON; hashed for pool keys."""

    name = Field("str", None, optional=True, check=_check_name)
    backend = Field("str", "podman", check=lambda v, lbl: validate_name(v, "backend name"))
    image = Field("str", "agentkernel/busybox", check=_check_image)
    resources = Field(Resources, Resources)
    policy = Field(Policy, Policy)
    env = Field("strdict", dict, check=_check_env)
    workdir = Field("str", "/workspace", check=_check_workdir)
    hostname = Field("str", "sandbox", check=_check_name)
    options = Field("strdict", dict, doc="backend-specific options (e.g. runtime=runsc)")

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        import json

        return cls.from_dict(json.loads(text))

    def pool_key(self) -> str:
        """Stable key for warm pools: the full effective spec except the name."""
        import hashlib
        import json

        data = self.to_dict()
        data.pop("name", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def mount_source_of(spec: SandboxSpec, cwd: str | None = None) -> str:
    """The host directory ``policy.mount_cwd`` binds: the one the spec names (the caller's cwd, sent by
    the CLI), else ``cwd``/this process's cwd; checked for the engines' option syntax either way."""
    import os

    src = spec.policy.mount_source or os.path.realpath(cwd or os.getcwd())
    return check_engine_path(src, "the directory to mount (policy.mount_source)")


# The three profiles. Shape as in the reference system (network, cwd mount, read-only root, memory,
# cpu); three deliberate differences, all toward safety: `moderate` has network OFF (DESIGN.md: network
# off unless asked), every profile has a pids limit (the reference has none, so a fork bomb wins), and
# every profile caps writable storage (disk_mb; the reference has none, so a sandbox can fill the host's
# disk). A backend that cannot enforce the cap refuses; `--disk unlimited` is the explicit opt-out.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "permissive": {
        "policy": {"network": True, "mount_cwd": True, "read_only_root": False, "seccomp": "default"},
        "resources": {"vcpus": None, "memory_mb": None, "pids": 4096, "disk_mb": 8192},
    },
    "moderate": {
        "policy": {"network": False, "mount_cwd": False, "read_only_root": False, "seccomp": "default"},
        "resources": {"vcpus": 1.0, "memory_mb": 512, "pids": 256, "disk_mb": 2048},
    },
    "restrictive": {
        "policy": {"network": False, "mount_cwd": False, "read_only_root": True, "seccomp": "restrictive"},
        "resources": {"vcpus": 0.5, "memory_mb": 256, "pids": 128, "disk_mb": 64},
    },
}

# Size of each tmpfs (/tmp, $HOME, workdir) under a read-only root when the spec sets no disk_mb.
DEFAULT_TMPFS_MB = 64


def profile_defaults(profile: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(policy fields, resources fields) for a profile name."""
    try:
        p = PROFILES[profile]
    except KeyError:
        raise ValidationError(
            f"unknown profile {profile!r} (choose one of {', '.join(PROFILE_NAMES)})"
        ) from None
    return dict(p["policy"], profile=profile), dict(p["resources"])
