"""The operations behind the reference clients' later routes (refroutes.py) and MCP tools (reftools.py):
batch file writes, sudo, detached commands, TTLs, lookup by UUID, git sources, named volumes, snapshots.

Detached commands run under supervisor processes of their own (agentkernel.detached: they survive the
client and a restart of the server, and end with the sandbox); TTLs are enforced by the serving process's
maintenance loop; snapshots are images committed by the sandbox's engine. State that must outlive the
process (TTLs, snapshot metadata, detached state and output) lives on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from .. import detached, paths
from ..errors import (
    AgentKernelError,
    AlreadyExists,
    InvalidState,
    NotFound,
    PolicyNotEnforceable,
    SandboxError,
    ValidationError,
)
from ..spec import check_sandbox_path, validate_name

log = logging.getLogger("agentkernel.api")

MAX_TTL_S = 30 * 24 * 3600
MAINTENANCE_INTERVAL_S = 2.0
SOURCE_MAX_BYTES = 256 << 20
SOURCE_MAX_FILES = 20000
SNAPSHOT_ENGINES = {"podman": "podman", "docker": "docker", "gvisor": "podman", "gvisor-docker": "docker"}
# backends whose snapshots hold the running sandbox's memory (RAM + device state + disk): a restore is a new
# sandbox whose processes are still running
MEMORY_SNAPSHOT_BACKENDS = ("qemu", "firecracker")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _tenant_key(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:12]


# ---- per-server state --------------------------------------------------------------------------------------


class RefState:
    def __init__(self, svc) -> None:
        self.svc = svc
        self.loop_task: asyncio.Task | None = None

    def ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        while True:
            try:
                await enforce_ttls(self.svc)
                await reap_detached(self)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maintenance pass failed")
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)

    async def close(self) -> None:
        tasks = [self.loop_task] if self.loop_task is not None else []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def state(svc) -> RefState:
    st = getattr(svc, "_refstate", None)
    if st is None:
        st = RefState(svc)
        svc._refstate = st
    return st


async def startup(svc) -> None:
    """Called when the server starts: enforce TTLs set by earlier runs of it, reap detached commands of
    sandboxes removed while it was down."""
    if os.path.isdir(_ttl_dir()) or os.path.isdir(detached.root(svc.manager.store.path)):
        state(svc).ensure_loop()


async def shutdown(svc) -> None:
    st = getattr(svc, "_refstate", None)
    if st is not None:
        await st.close()


# ---- sudo ---------------------------------------------------------------------------------------------------


def check_sudo(svc, tenant: str, name: str) -> None:
    """``sudo: true`` runs the command as root only when the server allows it ([api] allow_sudo_exec) and
    the sandbox's commands already run as uid 0 (they are never raised to root from another uid)."""
    allowed = bool((svc.config.get("api") or {}).get("allow_sudo_exec"))
    if not allowed:
        raise PolicyNotEnforceable("sudo is not allowed by this server",
                                   hint="set [api] allow_sudo_exec = true in the server's agentkernel.toml")
    rec = svc.manager.get(validate_name(name), tenant)
    user = ((rec.spec.get("policy") or {}).get("user")) or "1000:1000"
    if user.split(":")[0] != "0":
        raise PolicyNotEnforceable(
            f"sudo refused: sandbox {name} runs its commands as uid {user.split(':')[0]} with every capability "
            "dropped and no-new-privileges, so nothing in it can become root",
            hint='create the sandbox with [security] user = "0:0" (root inside the sandbox, still no capabilities)')


# ---- batch file write ----------------------------------------------------------------------------------------


async def write_files(svc, tenant: str, name: str, files: dict[str, str]) -> dict[str, Any]:
    """``{path: utf-8 content}``; relative paths are relative to the sandbox's working directory."""
    from ..backends.base import ExecRequest

    rec = svc.manager.get(validate_name(name), tenant)
    workdir = rec.spec.get("workdir") or "/workspace"
    resolved: list[tuple[str, bytes]] = []
    for p, content in files.items():
        full = p if p.startswith("/") else f"{workdir.rstrip('/')}/{p}"
        check_sandbox_path(full)
        if full.endswith("/"):
            raise ValidationError(f"{p!r} names a directory")
        resolved.append((full, content.encode()))
    parents = sorted({f.rsplit("/", 1)[0] for f, _ in resolved} - {""})
    if parents:
        r = await svc.manager.exec(name, ExecRequest(["mkdir", "-p", "--", *parents], timeout=60), tenant)
        if r.exit_code != 0:
            raise ValidationError(f"cannot create {', '.join(parents)}: {r.stderr.decode(errors='replace').strip()}")
    for full, data in resolved:
        await svc.write_file(tenant, name, full, data)
    return {"written": len(resolved), "paths": [f for f, _ in resolved]}


# ---- detached commands --------------------------------------------------------------------------------------
# Each runs under a supervisor process of its own with state and bounded output beside the store
# (agentkernel.detached): it survives the client and a restart of this server, and goes with the sandbox.


def _detached_dir(svc, sandbox_id: str) -> str:
    return detached.sandbox_dir(svc.manager.store.path, sandbox_id)


async def start_detached(svc, tenant: str, name: str, argv: list[str], *, env=None, cwd=None) -> dict[str, Any]:
    rec = svc.manager.get(validate_name(name), tenant)
    status = await svc.manager.status(name, tenant)
    if status != "running":
        raise InvalidState(f"sandbox {name} is {status}, not running", hint=f"start it: POST /sandboxes/{name}/start")
    req = svc.exec_request(argv, env=env, cwd=cwd, timeout=detached.TIMEOUT_S, output_limit=0)  # validates
    st = await asyncio.to_thread(detached.start, svc.manager.store.path, tenant=tenant, sandbox=name,
                                 sandbox_id=rec.id, argv=req.argv, env=req.env, cwd=req.cwd, timeout=req.timeout)
    from .. import audit

    audit.log("detached_started", sandbox=name, id=rec.id, cmd_id=st["id"], argv=list(argv))
    state(svc).ensure_loop()  # reaps the output of sandboxes removed behind this server's back
    return detached.view(_detached_dir(svc, rec.id), st)


def _get_detached(svc, tenant: str, name: str, cmd_id: str) -> tuple[str, dict[str, Any]]:
    rec = svc.manager.store.find(validate_name(name), tenant)
    d = _detached_dir(svc, rec.id) if rec is not None else None
    st = detached.read_state(d, cmd_id) if d else None
    if st is None or st.get("tenant") != tenant or st.get("sandbox") != name:
        raise NotFound(f"no detached command {cmd_id!r} in sandbox {name}")
    return d, st


def detached_status(svc, tenant: str, name: str, cmd_id: str) -> dict[str, Any]:
    return detached.view(*_get_detached(svc, tenant, name, cmd_id))


def detached_list(svc, tenant: str, name: str) -> list[dict[str, Any]]:
    rec = svc.manager.get(validate_name(name), tenant)
    d = _detached_dir(svc, rec.id)
    return [detached.view(d, st) for st in detached.list_states(d) if st.get("tenant") == tenant]


def detached_logs(svc, tenant: str, name: str, cmd_id: str, stream: str | None) -> dict[str, Any]:
    d, st = _get_detached(svc, tenant, name, cmd_id)
    out: dict[str, Any] = {}
    for key in ("stdout", "stderr"):
        if stream in (None, key):
            try:
                with open(detached.output_path(d, cmd_id, key), "rb") as f:
                    out[key] = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                out[key] = ""
    out["truncated"] = {k: bool(st["truncated"].get(k)) for k in ("stdout", "stderr") if k in out}
    out["status"] = st["status"]
    return out


async def detached_kill(svc, tenant: str, name: str, cmd_id: str) -> str:
    d, st = _get_detached(svc, tenant, name, cmd_id)
    if await asyncio.to_thread(detached.kill, d, cmd_id):
        return f"Killed detached command {cmd_id}"
    st = detached.read_state(d, cmd_id) or st
    return f"Detached command {cmd_id} had already ended ({st['status']})"


async def reap_detached(st: RefState) -> None:
    """Commands of sandboxes that no longer exist: kill, delete their state and output."""
    store = st.svc.manager.store
    if os.path.isdir(detached.root(store.path)):
        await asyncio.to_thread(detached.reap_orphans, store.path, store.ids())


# ---- TTL ----------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_ttl(value: str | int | float, what: str = "ttl") -> int:
    """"90s", "30m", "2h30m", "1d" or a number of seconds -> seconds (1 s .. 30 days)."""
    if isinstance(value, bool):
        raise ValidationError(f"{what} must be a duration such as \"30m\" or a number of seconds")
    if isinstance(value, int | float):
        secs = int(value)
    else:
        v = str(value).strip().lower()
        if v.lstrip("-").isdigit():
            secs = int(v)
        else:
            m = _DURATION.match(v)
            if not v or not m or not any(m.groups()):
                raise ValidationError(f"{what} {value!r} is not a duration (examples: 90s, 30m, 2h, 1d)")
            d, h, mi, s = (int(x or 0) for x in m.groups())
            secs = ((d * 24 + h) * 60 + mi) * 60 + s
    if secs <= 0:
        raise ValidationError(f"{what} {value!r} must be positive (an expiry in the past is not a TTL)")
    if secs > MAX_TTL_S:
        raise ValidationError(f"{what} {value!r} is more than 30 days")
    return secs


def _ttl_dir() -> str:
    return os.path.join(paths.data_dir(), "ttl")


def _ttl_path(sandbox_id: str) -> str:
    return os.path.join(_ttl_dir(), sandbox_id)


def get_expiry(sandbox_id: str) -> float | None:
    try:
        with open(_ttl_path(sandbox_id)) as f:
            return float(json.load(f)["expires_at"])
    except (OSError, ValueError, KeyError):
        return None


def set_expiry(svc, sandbox_id: str, expires_at: float) -> None:
    os.makedirs(_ttl_dir(), exist_ok=True)
    tmp = _ttl_path(sandbox_id) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"expires_at": expires_at}, f)
    os.replace(tmp, _ttl_path(sandbox_id))
    state(svc).ensure_loop()


def set_ttl(svc, tenant: str, name: str, ttl: str | int) -> str:
    rec = svc.manager.get(validate_name(name), tenant)
    exp = time.time() + parse_ttl(ttl)
    set_expiry(svc, rec.id, exp)
    return iso(exp)


def extend_ttl(svc, tenant: str, name: str, by: str | int) -> dict[str, Any]:
    rec = svc.manager.get(validate_name(name), tenant)
    base = get_expiry(rec.id)
    secs = parse_ttl(by, "by")
    exp = max(base or time.time(), time.time()) + secs
    if exp - time.time() > MAX_TTL_S:
        raise ValidationError("the TTL would end more than 30 days from now")
    set_expiry(svc, rec.id, exp)
    return {"name": name, "expires_at": iso(exp)}


async def enforce_ttls(svc) -> None:
    d = _ttl_dir()
    if not os.path.isdir(d):
        return
    now = time.time()
    records = {r.id: r for r in svc.manager.store.list_all()}
    for sid in os.listdir(d):
        if sid.endswith(".tmp"):
            continue
        rec = records.get(sid)
        if rec is None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, sid))
            continue
        exp = get_expiry(sid)
        if exp is not None and exp <= now:
            log.info("sandbox %s reached its TTL: removing it", rec.name)
            try:
                await svc.manager.remove(rec.name, rec.tenant)
                from .. import audit

                audit.log("sandbox_expired", sandbox=rec.name, id=rec.id)
            except AgentKernelError as exc:
                log.warning("removing expired sandbox %s failed: %s", rec.name, exc.message)
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, sid))


def expiry_of(rec_id: str | None) -> str | None:
    exp = get_expiry(rec_id) if rec_id else None
    return iso(exp) if exp else None


# ---- lookup by UUID -----------------------------------------------------------------------------------------


async def info_by_uuid(svc, tenant: str, sandbox_id: str) -> dict[str, Any]:
    for rec in svc.manager.store.list(tenant):
        if rec.id == sandbox_id:
            return await svc.info(tenant, rec.name)
    raise NotFound(f"no sandbox with uuid {sandbox_id!r}")


# ---- git sources -------------------------------------------------------------------------------------------

_ALLOWED_SCHEMES = ("https://", "http://", "git://", "ssh://")


def check_source_url(url: str) -> None:
    """Remote repositories only: no file://, no local paths, no ext:: transports."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(c in url for c in "\0\n\r "):
        raise ValidationError(f"source_url {url!r} is not a repository URL")
    low = url.lower()
    if low.startswith(_ALLOWED_SCHEMES):
        return
    if re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/]", url):  # scp-like git@host:path
        return
    raise ValidationError(
        f"source_url {url!r} is refused: only remote repositories (https://, http://, git://, ssh://, "
        "user@host:path) are cloned; file:// URLs and local paths would read the server's own files")


def check_source_ref(ref: str | None) -> None:
    if ref is None:
        return
    if (not ref or len(ref) > 255 or ref.startswith("-") or ".." in ref
            or not re.match(r"^[A-Za-z0-9._/@+-]+$", ref)):
        raise ValidationError(f"source_ref {ref!r} is not a branch, tag or commit")


async def _git(*args: str, cwd: str | None = None, timeout: float = 300) -> tuple[int, str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "GIT_CONFIG_NOSYSTEM": "1"}
    git = shutil.which("git")
    if git is None:
        raise PolicyNotEnforceable("source_url needs git on the server's host", hint="install git")
    proc = await asyncio.create_subprocess_exec(
        git, "-c", "protocol.file.allow=never", "-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null",
        *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"git {args[0]} timed out after {timeout:.0f} s") from None
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def clone_into(svc, tenant: str, name: str, url: str, ref: str | None) -> dict[str, Any]:
    """Clone ``url`` (at ``ref``) on the host, then copy the tree into the sandbox's working directory."""
    from ..backends.base import ExecRequest

    check_source_url(url)
    check_source_ref(ref)
    rec = svc.manager.get(validate_name(name), tenant)
    dest = rec.spec.get("workdir") or "/workspace"
    with tempfile.TemporaryDirectory(prefix="ak-src-") as tmp:
        repo = os.path.join(tmp, "repo")
        is_commit = bool(ref and re.fullmatch(r"[0-9a-fA-F]{7,40}", ref))
        args = ["clone", "--quiet", "--no-recurse-submodules"]
        if ref and not is_commit:
            args += ["--branch", ref]
        rc, out = await _git(*args, "--depth", "1", "--", url, repo) if not is_commit else (1, "shallow")
        if rc != 0 and ("shallow" in out or "dumb" in out):
            shutil.rmtree(repo, ignore_errors=True)
            rc, out = await _git(*args, "--", url, repo)
        if rc != 0:
            raise ValidationError(f"cannot clone {url}: {out[-500:]}")
        if is_commit:
            rc, out = await _git("checkout", "--quiet", "--detach", ref, cwd=repo)
            if rc != 0:
                raise ValidationError(f"cannot check out {ref} of {url}: {out[-300:]}")
        files: list[tuple[str, str, int]] = []
        dirs: set[str] = set()
        total = 0
        for dirpath, _dirnames, filenames in os.walk(repo):
            rel_dir = os.path.relpath(dirpath, repo)
            for fn in filenames:
                src = os.path.join(dirpath, fn)
                st = os.lstat(src)
                if not os.path.isfile(src) or os.path.islink(src):
                    continue
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                target = f"{dest.rstrip('/')}/{rel}"
                files.append((src, target, 0o755 if st.st_mode & 0o111 else 0o644))
                dirs.add(target.rsplit("/", 1)[0])
                total += st.st_size
                if total > SOURCE_MAX_BYTES or len(files) > SOURCE_MAX_FILES:
                    raise ValidationError(f"{url} is too large to copy in (limit {SOURCE_MAX_BYTES >> 20} MiB, "
                                          f"{SOURCE_MAX_FILES} files)")
        dl = sorted(dirs)
        for i in range(0, len(dl), 200):
            r = await svc.manager.exec(name, ExecRequest(["mkdir", "-p", "--", *dl[i:i + 200]], timeout=120), tenant)
            if r.exit_code != 0:
                raise SandboxError(f"cannot create directories under {dest}: {r.stderr.decode(errors='replace')}")
        for src, target, mode in files:
            with open(src, "rb") as f:
                await svc.manager.write_file(name, target, f.read(), mode, tenant)
        rc, head = await _git("rev-parse", "HEAD", cwd=repo)
    from .. import audit

    audit.log("source_cloned", sandbox=name, id=rec.id, url=url, ref=ref, commit=head if rc == 0 else None)
    return {"url": url, "ref": ref, "commit": head if rc == 0 else None, "files": len(files), "dest": dest}


# ---- snapshots ----------------------------------------------------------------------------------------------


def _snap_dir(tenant: str) -> str:
    return os.path.join(paths.data_dir(), "snapshots", _tenant_key(tenant))


def _snap_path(tenant: str, name: str) -> str:
    return os.path.join(_snap_dir(tenant), validate_name(name, "snapshot name") + ".json")


def _load_snap(tenant: str, name: str) -> dict[str, Any]:
    try:
        with open(_snap_path(tenant, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NotFound(f"no snapshot named {name!r}") from None


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("spec", "engine")}


async def _engine(engine: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(engine, *args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _snap_engine(rec) -> str:
    engine = SNAPSHOT_ENGINES.get(rec.backend)
    if engine is None or "container" not in (rec.handle or {}):
        raise PolicyNotEnforceable(f"snapshots are not available on backend {rec.backend!r}",
                                   hint="snapshots are committed images (podman, docker, gvisor) or VM memory "
                                        "snapshots (qemu, firecracker)")
    return engine


async def _take_memory_snapshot(svc, rec, snap: str) -> dict[str, Any]:
    from ..backends.base import SandboxRef
    from ..spec import SandboxSpec

    backend = svc.manager.backend_for(rec.backend, rec.spec.get("options") or {})
    info = await backend.take_memory_snapshot(SandboxRef(rec.backend, rec.id, rec.handle,
                                                         SandboxSpec.from_dict(rec.spec)))
    res = rec.spec.get("resources") or {}
    meta = {"name": snap, "sandbox": rec.name, "image_tag": None, "backend": rec.backend,
            "base_image": rec.spec.get("image"), "vcpus": int(res["vcpus"] + 0.999) if res.get("vcpus") else None,
            "memory_mb": res.get("memory_mb"), "created_at": iso(time.time()), "kind": "memory",
            "memory_snapshot": info["id"], "state_bytes": info["state_bytes"], "disk_bytes": info["disk_bytes"],
            "pause_ms": info["pause_ms"], "spec": rec.spec}
    return meta


async def take_snapshot(svc, tenant: str, sandbox: str, name: str | None) -> dict[str, Any]:
    rec = svc.manager.get(validate_name(sandbox), tenant)
    snap = validate_name(name or f"{sandbox}-{time.strftime('%Y%m%d%H%M%S')}", "snapshot name")
    path = _snap_path(tenant, snap)
    if os.path.exists(path):
        raise AlreadyExists(f"snapshot {snap!r} already exists", hint="delete it first or choose another name")
    if rec.backend in MEMORY_SNAPSHOT_BACKENDS:
        meta = await _take_memory_snapshot(svc, rec, snap)
        os.makedirs(_snap_dir(tenant), exist_ok=True)
        with open(path, "w") as f:
            json.dump(meta, f)
        from .. import audit

        audit.log("snapshot_taken", sandbox=sandbox, id=rec.id, snapshot=snap, memory_snapshot=meta["memory_snapshot"])
        return _public(meta)
    engine = _snap_engine(rec)
    tag = f"localhost/agentkernel-snap/{_tenant_key(tenant)}-{snap.lower()}:latest"
    rc, out = await _engine(engine, "commit", rec.handle["container"], tag)
    if rc != 0:
        raise SandboxError(f"{engine} commit of sandbox {sandbox} failed: {out[-300:]}")
    res = rec.spec.get("resources") or {}
    meta = {"name": snap, "sandbox": sandbox, "image_tag": tag, "backend": rec.backend,
            "base_image": rec.spec.get("image"), "vcpus": int(res["vcpus"] + 0.999) if res.get("vcpus") else None,
            "memory_mb": res.get("memory_mb"), "created_at": iso(time.time()), "kind": "image",
            "spec": rec.spec, "engine": engine}
    os.makedirs(_snap_dir(tenant), exist_ok=True)
    with open(path, "w") as f:
        json.dump(meta, f)
    from .. import audit

    audit.log("snapshot_taken", sandbox=sandbox, id=rec.id, snapshot=snap, image=tag)
    return _public(meta)


def list_snapshots(tenant: str) -> list[dict[str, Any]]:
    d = _snap_dir(tenant)
    out = []
    if os.path.isdir(d):
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".json"):
                with contextlib.suppress(OSError, ValueError), open(os.path.join(d, fn)) as f:
                    out.append(_public(json.load(f)))
    return out


def get_snapshot(tenant: str, name: str) -> dict[str, Any]:
    return _public(_load_snap(tenant, name))


async def delete_snapshot(tenant: str, name: str) -> None:
    meta = _load_snap(tenant, name)
    if meta.get("kind") == "memory":  # the backend that took it deletes it (sandboxes restored from it keep theirs)
        from ..backends import get_backend_class

        cls = get_backend_class(meta.get("backend") or "qemu")
        await asyncio.to_thread(cls.delete_memory_snapshot, meta["memory_snapshot"])
        os.unlink(_snap_path(tenant, name))
        return
    rc, out = await _engine(meta["engine"], "rmi", "-f", meta["image_tag"])
    if rc != 0 and "no such image" not in out.lower() and "image not known" not in out.lower():
        raise SandboxError(f"cannot delete the snapshot image {meta['image_tag']}: {out[-300:]}")
    os.unlink(_snap_path(tenant, name))


async def restore_snapshot(svc, tenant: str, name: str, as_name: str | None) -> dict[str, Any]:
    from ..spec import SandboxSpec

    meta = _load_snap(tenant, name)
    new = validate_name(as_name or name)
    if svc.manager.store.find(new, tenant) is not None:
        raise AlreadyExists(f"a sandbox named {new!r} exists", hint='restore under another name: {"as_name": "..."}')
    spec = SandboxSpec.from_dict(meta["spec"])
    if meta.get("kind") == "memory":  # the same VM (spec) with the snapshot's memory: a new VM from it
        spec = spec.replace(name=new, options={**spec.options, "restore": meta["memory_snapshot"]})
    else:
        spec = spec.replace(name=new, image=meta["image_tag"])
    return await svc.create(tenant, spec, start=True)


# ---- create-time extras -------------------------------------------------------------------------------------


def check_create(source_url: str | None, source_ref: str | None, ttl: str | int | None) -> None:
    """Validate the create-time extras before anything is created."""
    if source_url:
        check_source_url(source_url)
    if source_ref is not None:
        if not source_url:
            raise ValidationError("source_ref needs source_url")
        check_source_ref(source_ref)
    if ttl is not None:
        parse_ttl(ttl)


def volume_option(volumes: list[str] | None) -> dict[str, str]:
    """``volumes: ["name:/path[:ro]"]`` -> the backend option that mounts them (each volume must exist)."""
    if not volumes:
        return {}
    from ..volumes import parse_mounts

    parse_mounts(volumes)
    return {"volumes": ",".join(volumes)}


async def after_create(svc, tenant: str, name: str, *, source_url: str | None, source_ref: str | None,
                       ttl: str | int | None) -> dict[str, Any]:
    """[[files]], the git source and the TTL of a sandbox just created; on failure it is removed."""
    extra: dict[str, Any] = {}
    if not (svc.config.get("files") or source_url or ttl is not None):
        return extra
    try:
        if svc.config.get("files"):
            from ..refinject import copy_files

            await copy_files(svc.manager, name, svc.config["files"], tenant)
        if source_url:
            extra["source"] = await clone_into(svc, tenant, name, source_url, source_ref)
        if ttl is not None:
            extra["expires_at"] = set_ttl(svc, tenant, name, ttl)
    except BaseException:
        with contextlib.suppress(Exception):
            await svc.remove(tenant, name)
        raise
    return extra
