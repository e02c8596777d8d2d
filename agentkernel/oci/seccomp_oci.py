"""Seccomp for OCI bundles: the project's profiles (``agentkernel.seccomp``, Docker/Podman JSON format)
converted to the OCI runtime-spec ``linux.seccomp`` form, plus the precompiled BPF crun loads directly.

Conversion (what the engines do when they hand a profile to the runtime):
- ``archMap``: the entry for this machine's native arch gives ``architectures`` = native + its
  sub-architectures (x86_64 -> x86_64, x86, x32).
- each rule's ``includes`` / ``excludes`` conditions are evaluated for *this* container: ``caps``
  against the effective capabilities (always none: every capability is dropped, so rules that need a
  capability disappear and their "deny unless capability" twins stay), ``arches`` against the native
  arch (Go names: amd64, arm64, ...), ``minKernel`` against the running kernel.
- ``defaultAction``/``defaultErrnoRet`` and per-rule ``errnoRet``/``args`` are kept as they are.

The result equals what podman writes into its own config.json for a ``--cap-drop all`` container.

Precompiled BPF: turning ~400 rules into BPF with libseccomp costs crun ~20 ms per container (two
thirds of a hardened ``crun run`` here). crun accepts a ready filter in the annotation
``run.oci.seccomp_bpf_data`` (base64), so we let crun compile each profile once (``crun create`` of a
stub bundle writes the filter it generated to its state dir) and cache the bytes; the filter is crun's
own output for the very same ``linux.seccomp``, so nothing is lost. runc and runsc get ``linux.seccomp``.
"""

from __future__ import annotations

import os

CONVERTER_VERSION = "1"

# uname machine -> (libseccomp native arch, Go arch name used in profile "includes.arches")
_ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
}
# sub-architectures' Go names (a rule for "x86" or "x32" applies to an amd64 container too, like docker)
_GO_SUBARCH = {"amd64": ("x86", "x32"), "arm64": ("arm",), "s390x": ("s390",)}


def _kernel_tuple(release: str) -> tuple[int, ...]:
    out = []
    for part in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def convert(
    profile: dict,
    caps: frozenset[str] | set[str] = frozenset(),
    machine: str | None = None,
    kernel: str | None = None,
) -> dict:
    """A Docker-format profile -> OCI ``linux.seccomp`` for a container with ``caps`` on this host."""
    uname = os.uname()
    machine = machine or uname.machine
    kern = _kernel_tuple(kernel or uname.release)
    native, goarch = _ARCHES.get(machine, (f"SCMP_ARCH_{machine.upper()}", machine))
    go_names = {goarch, *_GO_SUBARCH.get(goarch, ())}
    arches: list[str] = []
    for entry in profile.get("archMap") or ():
        if entry.get("architecture") == native:
            arches = [native, *(entry.get("subArchitectures") or [])]
            break
    if not arches:
        arches = list(profile.get("architectures") or [native])

    rules = []
    for rule in profile.get("syscalls") or ():
        inc = rule.get("includes") or {}
        exc = rule.get("excludes") or {}
        if inc.get("arches") and goarch not in inc["arches"]:
            continue
        if exc.get("arches") and go_names & set(exc["arches"]):
            continue
        if inc.get("caps") and not all(c in caps for c in inc["caps"]):
            continue
        if exc.get("caps") and any(c in caps for c in exc["caps"]):
            continue
        if inc.get("minKernel") and kern < _kernel_tuple(inc["minKernel"]):
            continue
        names = list(rule.get("names") or ([rule["name"]] if rule.get("name") else []))
        if not names:
            continue
        out: dict = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        args = []
        for a in rule.get("args") or ():
            arg = {"index": a["index"], "value": a["value"], "op": a["op"]}
            if a.get("valueTwo"):
                arg["valueTwo"] = a["valueTwo"]
            args.append(arg)
        if args:
            out["args"] = args
        rules.append(out)
    result: dict = {"defaultAction": profile.get("defaultAction", "SCMP_ACT_ERRNO")}
    if profile.get("defaultErrnoRet") is not None:
        result["defaultErrnoRet"] = profile["defaultErrnoRet"]
    result["architectures"] = arches
    if profile.get("flags"):
        result["flags"] = list(profile["flags"])
    result["syscalls"] = rules
    return result


# ---- cached results -------------------------------------------------------------------------------------


def _cache_dir() -> str:
    from .. import paths

    d = os.path.join(paths.cache_dir(), "oci", "seccomp")
    os.makedirs(d, exist_ok=True)
    return d


def profile_key(name: str) -> str:
    """Cache key of a profile's converted form: one stat of the source file, no parsing."""
    from .. import seccomp

    if name not in ("default", "restrictive"):
        raise ValueError(f"unknown seccomp profile {name!r}")
    parts = [CONVERTER_VERSION, seccomp.PROFILE_VERSION, name, os.uname().release, os.uname().machine]
    parts += seccomp.source_stamp()
    if name == "restrictive":
        parts.append(",".join(seccomp.RESTRICTIVE_DENY))
    return _digest("|".join(parts))


def _digest(text: str) -> str:
    # the key of cached seccomp filters: sha256 from the built-in _sha256 module (hashlib's OpenSSL
    # import costs ~3-5 ms per CLI run)
    from _sha256 import sha256

    return sha256(text.encode()).hexdigest()[:32]


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def oci_seccomp(name: str) -> dict:
    """The OCI ``linux.seccomp`` object for policy.seccomp = ``name`` (all capabilities dropped)."""
    path = os.path.join(_cache_dir(), f"{profile_key(name)}.json")
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    from .. import seccomp

    prof = seccomp.default_profile() if name == "default" else seccomp.restrictive_profile()
    result = convert(prof)
    _atomic_write(path, json.dumps(result, separators=(",", ":")).encode())
    return result


def _binary_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_mtime_ns}-{st.st_size}"


def crun_bpf_path(name: str, crun: str) -> str:
    key = _digest(f"{profile_key(name)}|{crun}|{_binary_stamp(crun)}")
    return os.path.join(_cache_dir(), f"{key}.crun.bpf.b64")


def crun_bpf_b64(name: str, crun: str) -> str | None:
    """Base64 of the BPF crun generates for profile ``name``; compiled once (by crun) and cached.
    None if it cannot be produced (then the bundle carries ``linux.seccomp`` and crun compiles it)."""
    path = crun_bpf_path(name, crun)
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        pass
    try:
        bpf = harvest_crun_bpf(oci_seccomp(name), crun)
    except Exception:
        return None
    if not bpf:
        return None
    import base64

    b64 = base64.b64encode(bpf).decode()
    _atomic_write(path, b64.encode())
    return b64


def harvest_crun_bpf(sec: dict, crun: str) -> bytes | None:
    """Have crun compile ``sec``: ``crun create`` a stub bundle (an empty root, nothing is started),
    read the filter it wrote to its state dir (``<root>/<id>/seccomp.bpf``), delete the container."""
    import shutil
    import subprocess
    import tempfile

    work = tempfile.mkdtemp(prefix="bpf-", dir=_cache_dir())
    cid = f"ak-bpf-{os.getpid()}-{os.urandom(3).hex()}"
    state = os.path.join(work, "state")
    try:
        root = os.path.join(work, "rootfs")
        os.makedirs(os.path.join(root, "dev"))
        with open(os.path.join(root, "stub"), "w"):
            pass
        os.chmod(os.path.join(root, "stub"), 0o755)
        cfg = {
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/stub"],
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "env": [],
                "noNewPrivileges": True,
                "capabilities": {},
            },
            "root": {"path": root, "readonly": True},
            "mounts": [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}],
            "linux": {
                "namespaces": [{"type": "mount"}, {"type": "pid"}],
                "seccomp": sec,
                "cgroupsPath": f"/agentkernel/{cid}",
            },
        }
        import json

        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(cfg, f)
        # never a pipe on the container's stdio: its init keeps it open and we would wait forever
        r = subprocess.run(
            [crun, "--root", state, "create", "--bundle", work, cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        try:
            if r.returncode != 0:
                return None
            with open(os.path.join(state, cid, "seccomp.bpf"), "rb") as f:
                data = f.read()
            # a BPF program is a whole number of 8-byte instructions
            return data if data and len(data) % 8 == 0 else None
        finally:
            subprocess.run(
                [crun, "--root", state, "delete", "--force", cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
