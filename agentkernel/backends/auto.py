"""``backend = "auto"`` (the default): the first backend in ``ORDER`` that works on this host with the full
default policy, chosen once and cached. Standard library only (it runs on the CLI's hot path: a cache hit
is one small file read plus a few ``stat`` calls).

The order, fastest hardened backend first:

1. ``oci`` - engine-less crun/runc: only as root (rootless oci cannot set up cgroups) and only with crun
   on PATH (runc works, but at ~2x the start time podman's pooled path is the better default then);
2. ``podman`` - rootless or root, with ``podman`` on PATH;
3. ``docker`` - the Docker Engine socket (``DOCKER_HOST`` or /var/run/docker.sock) answering.

A candidate is taken when its preconditions hold (the probe inputs: effective uid, the binaries found on
PATH, the Docker socket), its ``probe()`` says it is available, and its ``check()`` accepts the default
spec (the default profile's full policy: fail closed). The choice is cached in
``cache_dir()/backend-auto-<crc32 of the installation's directory>`` together with a fingerprint of those
inputs (uid, each engine binary's path on PATH, its size and mtime - a new version of an engine changes
them - and the agentkernel version); any change re-runs the choice. A long-lived process (``serve``) reuses its
own last decision for ``PROCESS_TTL_S`` while its environment and the cache file are unchanged. ``--backend``,
``AGENTKERNEL_BACKEND`` and ``[sandbox] backend`` always win over auto.
"""

from __future__ import annotations

import os

from .. import paths

ORDER = ("oci", "podman", "docker")
BINARIES = ("crun", "runc", "podman", "docker", "dockerd")
CACHE_NAME = "backend-auto"


def which(name: str, path: str | None = None) -> str | None:
    """``shutil.which`` without importing shutil (hot path)."""
    from ..resolvedspec import candidate, is_exec, note, recording

    for d in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep):
        if not d:
            continue
        p = os.path.join(d, name)
        found = is_exec(p)
        if recording():
            note(candidate(d, p, found))  # each candidate: one appearing earlier on PATH wins (resolvedspec)
        if found:
            return p
    return None


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host[len("unix://"):]
    return host or "/var/run/docker.sock"


def facts() -> dict:
    """The probe inputs auto decides on (and caches against)."""
    found = {b: which(b) for b in BINARIES}
    return {"euid": os.geteuid(), "binaries": found, "docker_socket": docker_socket()}


def fingerprint(f: dict | None = None) -> str:
    # what it reads is recorded for a resolved-spec cache (resolvedspec): the files by stamp (stricter than
    # the mtimes and sizes it keeps), this file by the cache's own source stamps, the euid by its key
    from ..resolvedspec import note, stamp

    f = f or facts()
    sock = f["docker_socket"]
    try:
        here = os.stat(__file__).st_mtime_ns  # an agentkernel upgrade rewrites this file
    except OSError:
        here = 0
    sock_there = os.path.exists(sock)
    note(("exists", sock, sock_there))
    parts = [f"ak={here}", f"euid={f['euid']}", f"docker={sock}:{sock_there}"]
    # the storage cap every profile sets depends on where the engines keep their storage: podman's
    # storage.conf, a restarted dockerd (its pid file) and whether the quota volume is mounted
    from ..diskquota import volume

    for p in (os.environ.get("CONTAINERS_STORAGE_CONF") or "/etc/containers/storage.conf", "/var/run/docker.pid"):
        st = stamp(p)
        note(("stamp", p, st))
        parts.append(f"{p}={st[0]}" if st else f"{p}=-")
    vol = volume()
    mounted = os.path.ismount(vol)
    note(("call", "os.path", "ismount", (vol,), mounted))
    parts.append(f"volume={mounted}")
    for b in BINARIES:
        p = f["binaries"].get(b)
        if p:
            st = stamp(p)
            note(("stamp", p, st))
            parts.append(f"{b}={p}:{st[1]}:{st[0]}" if st else f"{b}={p}:?")
        else:
            parts.append(f"{b}=-")
    return "|".join(parts)


def preconditions(name: str, f: dict) -> str | None:
    """Why ``name`` is not a candidate on this host (None: it is one, subject to its probe)."""
    bins = f["binaries"]
    if name == "oci":
        if f["euid"] != 0:
            return "not root (rootless oci cannot set cgroup limits)"
        if not bins.get("crun"):
            return "crun is not on PATH"
        return None
    if name == "podman":
        return None if bins.get("podman") else "podman is not on PATH"
    if name == "docker":
        return None if os.path.exists(f["docker_socket"]) else f"no Docker socket at {f['docker_socket']}"
    return "not an auto candidate"


def choose(spec_for) -> tuple[str | None, list[dict]]:
    """Probe the candidates in order: (the chosen backend or None, one verdict row per candidate).
    ``spec_for(name)``: the default spec on backend ``name`` (``config.default_spec_for``)."""
    from ..errors import AgentKernelError
    from . import get_backend

    f = facts()
    rows: list[dict] = []
    chosen = None
    for name in ORDER:
        if chosen is not None:
            rows.append({"backend": name, "ok": None, "reason": f"not probed ({chosen} comes first)"})
            continue
        why_not = preconditions(name, f)
        if why_not:
            rows.append({"backend": name, "ok": False, "reason": why_not})
            continue
        try:
            backend = get_backend(name)
            avail = type(backend).probe()
            if not avail.available:
                rows.append({"backend": name, "ok": False, "reason": avail.reason})
                continue
            backend.check(spec_for(name))  # the full default policy, fail closed
        except AgentKernelError as exc:
            rows.append({"backend": name, "ok": False, "reason": exc.message})
            continue
        except Exception as exc:  # a probe must never break the choice
            rows.append({"backend": name, "ok": False, "reason": f"probe failed: {exc!r}"})
            continue
        rows.append({"backend": name, "ok": True, "reason": avail.reason})
        chosen = name
    return chosen, rows


def _cache_path() -> str:
    """One cache file per installation (its package directory): two checkouts or virtualenvs on one host
    have different fingerprints (``ak=``), and sharing one file made each rewrite the other's choice, so
    every command of both re-probed (~3-60 ms: the backend classes imported, crun's check)."""
    import binascii  # built in (no file to load): zlib/hashlib would cost an import

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))).encode()
    return os.path.join(paths.cache_dir(), f"{CACHE_NAME}-{binascii.crc32(here):08x}")


def _read_cache(fp: str) -> tuple[str, list[dict]] | None:
    from ..resolvedspec import note, read_file

    path = _cache_path()
    raw = read_file(path)
    note(("file", path, raw))
    if raw is None:
        return None
    try:
        lines = raw.decode().splitlines()
    except UnicodeDecodeError:
        return None
    if len(lines) < 2 or lines[0] != fp:
        return None
    rows = []
    for line in lines[2:]:
        name, ok, reason = [*line.split("\t", 2), "", ""][:3]
        rows.append({"backend": name, "ok": {"1": True, "0": False}.get(ok), "reason": reason})
    return lines[1], rows


def _write_cache(fp: str, chosen: str, rows: list[dict]) -> None:
    path = _cache_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    body = [fp, chosen] + [f"{r['backend']}\t{'1' if r['ok'] else '0' if r['ok'] is False else '-'}\t"
                           f"{r['reason'].replace(chr(10), ' ')}" for r in rows]
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(body) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def resolve(spec_for, *, refresh: bool = False) -> str:
    """The backend ``auto`` stands for on this host (cached; re-chosen when the host changed)."""
    return decide(spec_for, refresh=refresh)[0]


# This process's last decision, reused for PROCESS_TTL_S while the environment it was made in (the inputs read
# from os.environ, the uid) and the cache file (its stat: another process re-choosing rewrites it) are unchanged:
# a long-lived server resolves on every request, and the fingerprint plus the file read cost ~0.3 ms. An engine
# binary changed in place is noticed after at most PROCESS_TTL_S.
PROCESS_TTL_S = 2.0
_process: list = []  # [(environment key, cache file, its stat, monotonic deadline, (chosen, rows))]


def _process_key() -> tuple:
    """What the decision and the cache file's place depend on besides the files (``facts``, ``paths``)."""
    env = os.environ
    return (env.get("PATH"), env.get("DOCKER_HOST"), env.get("CONTAINERS_STORAGE_CONF"), env.get("AGENTKERNEL_CACHE"),
            env.get("AGENTKERNEL_HOME"), env.get("XDG_DATA_HOME"), env.get("HOME"), os.geteuid())


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember(chosen: str, rows: list[dict]) -> None:
    import time

    path = _cache_path()
    _process[:] = [(_process_key(), path, _stat(path), time.monotonic() + PROCESS_TTL_S, (chosen, rows))]


def decide(spec_for, *, refresh: bool = False) -> tuple[str, list[dict], bool]:
    """(chosen backend, verdict rows, whether it came from a cache: the file's or this process's). Raises when
    nothing works."""
    if not refresh and _process:
        import time

        key, path, stat, deadline, (chosen, rows) = _process[0]
        if time.monotonic() < deadline and key == _process_key() and stat == _stat(path):
            return chosen, [dict(r) for r in rows], True
    fp = fingerprint()
    if not refresh:
        cached = _read_cache(fp)
        if cached is not None:
            _remember(*cached)
            return cached[0], cached[1], True
    from ..resolvedspec import volatile

    volatile()  # probed now (not recorded): the next run reuses the cached choice, and records that
    chosen, rows = choose(spec_for)
    if chosen is None:
        from ..errors import BackendUnavailable

        raise BackendUnavailable(
            "backend auto: no backend works on this host ("
            + "; ".join(f"{r['backend']}: {r['reason']}" for r in rows) + ")",
            hint="agentkernel doctor; install crun (as root), podman or Docker, or pick one with --backend")
    _write_cache(fp, chosen, rows)
    _remember(chosen, [dict(r) for r in rows])
    return chosen, rows, False


def explain_lines(decision: tuple[str, list[dict], bool]) -> list[str]:
    """Human-readable: which backend auto picks here and why (for doctor and run --explain)."""
    chosen, rows, cached = decision
    out = [f"backend auto -> {chosen} (order: {', '.join(ORDER)}; {'cached' if cached else 'probed now'}, "
           f"re-chosen when the uid or an engine binary changes)"]
    for r in rows:
        mark = "ok " if r["ok"] else "-- " if r["ok"] is False else "   "
        out.append(f"  {mark} {r['backend']}: {r['reason']}")
    return out
