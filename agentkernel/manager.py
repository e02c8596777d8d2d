"""The sandbox manager: named-sandbox lifecycle and one-shot runs over any backend (asyncio).

The daemon, the in-process Python API and the daemon-less CLI all go through this class, so the
rules (name reservation, fail-closed policy check, ownership, audit) live in one place.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from . import audit, owner
from .backends import canonical, get_backend
from .backends.base import Backend, ExecRequest, ExecResult, SandboxRef
from .errors import InvalidState
from .owner import new_id
from .spec import SandboxSpec, check_sandbox_path, validate_name
from .store import LOCAL, SandboxRecord, Store

_LOOKUPS_KEPT = 1024  # named sandboxes whose record lookup() keeps (all of them are dropped beyond that)


class SandboxManager:
    def __init__(self, store: Store | None = None) -> None:
        self._store = store
        self._backends: dict[tuple[str, tuple], Backend] = {}
        self._lookups: dict[tuple[str, str], tuple[tuple[int, int], SandboxRecord, SandboxSpec]] = {}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store()
        return self._store

    def backend_for(self, name: str, options: dict[str, str] | None = None) -> Backend:
        key = (canonical(name), tuple(sorted((options or {}).items())))
        b = self._backends.get(key)
        if b is None:
            b = self._backends[key] = get_backend(name, options)
        return b

    def _owner(self, named: bool = True) -> dict[str, Any]:
        o = owner.current_owner()
        if named:
            o["store"] = self.store.id
        return o

    def _ref(self, rec: SandboxRecord) -> SandboxRef:
        return SandboxRef(rec.backend, rec.id, rec.handle, SandboxSpec.from_dict(rec.spec))

    def _backend_of(self, rec: SandboxRecord) -> Backend:
        return self.backend_for(rec.backend, rec.spec.get("options") or {})

    async def aclose(self) -> None:
        for b in self._backends.values():
            await b.aclose()
        self._backends.clear()

    # -- named sandboxes --
    async def create(self, spec: SandboxSpec, *, start: bool = False, tenant: str = "local") -> SandboxRecord:
        if not spec.name:
            from .errors import ValidationError

            raise ValidationError("a named sandbox needs a name")
        validate_name(spec.name)
        spec = spec.replace(backend=canonical(spec.backend))
        backend = self.backend_for(spec.backend, spec.options)
        backend.check(spec)
        sid = new_id(spec.name)
        self.store.reserve(spec.name, sid, spec.backend, spec.to_dict(), tenant)
        # Until the store row says "created", this process owns whatever the engine makes.
        owner.claim(backend.name, sid, backend.planned_handle(sid))
        try:
            ref = await backend.create(spec, sandbox_id=sid, owner=self._owner())
        except BaseException:
            self.store.delete(sid)
            try:
                await backend.remove(SandboxRef(spec.backend, sid, backend.planned_handle(sid), spec))
            finally:
                owner.release(backend.name, sid)
            raise
        self.store.update(sid, state="created", handle=ref.handle)
        owner.release(backend.name, sid)
        audit.log("sandbox_created", sandbox=spec.name, id=sid, backend=spec.backend, image=spec.image,
                  profile=spec.policy.profile, tenant=tenant)
        if start:
            await self.start(spec.name, tenant=tenant)
        return self.store.get(spec.name, tenant)

    def get(self, name: str, tenant: str | None = None) -> SandboxRecord:
        return self.store.get(name, tenant)

    def lookup(self, name: str, tenant: str | None = None) -> tuple[SandboxRecord, SandboxSpec]:
        """A named sandbox's record and spec for the exec path, kept in this process while the store's
        ``stamp`` stays equal: a commit by any connection (another process's too: the CLI, another server,
        gc) moves it, so a removed or changed sandbox is never served from here. A hit costs one pragma read
        instead of a row read, two JSON parses and a spec rebuild. The record is shared: read it only."""
        store = self.store
        stamp = store.stamp()  # before the row: a commit in between leaves a stale stamp (a re-read), not a stale row
        key = (tenant or LOCAL, name)
        hit = self._lookups.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        rec = store.get(name, tenant)
        spec = SandboxSpec.from_dict(rec.spec)
        if len(self._lookups) >= _LOOKUPS_KEPT:
            self._lookups.clear()
        self._lookups[key] = (stamp, rec, spec)
        return rec, spec

    async def start(self, name: str, tenant: str | None = None) -> None:
        rec = self.store.get(name, tenant)
        if rec.state == "creating":
            raise InvalidState(f"sandbox {name!r} is still being created (or its creator died)",
                               hint=f"agentkernel rm {name}")
        ref = self._ref(rec)
        await self._backend_of(rec).start(ref)
        self.store.update(rec.id, state="running", handle=ref.handle)
        audit.log("sandbox_started", sandbox=name, id=rec.id, backend=rec.backend)

    async def exec(self, name: str, req: ExecRequest, tenant: str | None = None, *,
                   found: tuple[SandboxRecord, SandboxSpec] | None = None) -> ExecResult:
        """``found``: what ``lookup`` just returned for this sandbox (the caller looked it up already)."""
        rec, spec = found or self.lookup(name, tenant)
        # a copy of the handle: a backend may note things in it during an exec (not persisted, as before)
        result = await self._backend_of(rec).exec(SandboxRef(rec.backend, rec.id, dict(rec.handle), spec), req)
        audit.log("command_executed", sandbox=name, id=rec.id, argv=req.argv, exit_code=result.exit_code,
                  timed_out=result.timed_out, oom_killed=result.oom_killed)
        return result

    async def write_file(self, name: str, path: str, data: bytes | AsyncIterator[bytes], mode: int = 0o644,
                         tenant: str | None = None) -> int:
        check_sandbox_path(path)
        rec = self.store.get(name, tenant)
        n = await self._backend_of(rec).write_file(self._ref(rec), path, data, mode)
        audit.log("file_written", sandbox=name, id=rec.id, path=path, bytes=n)
        return n

    async def read_file(self, name: str, path: str, tenant: str | None = None) -> AsyncIterator[bytes]:
        check_sandbox_path(path)
        rec = self.store.get(name, tenant)
        audit.log("file_read", sandbox=name, id=rec.id, path=path)
        async for chunk in self._backend_of(rec).read_file(self._ref(rec), path):
            yield chunk

    async def open_agent(self, name: str, tenant: str | None = None):
        """A connected agent client for named sandbox ``name`` (the caller closes it), or None when its
        backend has no host-reachable agent (``AgentAccess``)."""
        from .backends.base import AgentAccess

        rec = self.store.get(name, tenant)
        backend = self._backend_of(rec)
        if not isinstance(backend, AgentAccess):
            return None
        return await backend.open_agent(self._ref(rec))

    async def stop(self, name: str, tenant: str | None = None) -> None:
        rec = self.store.get(name, tenant)
        await self._backend_of(rec).stop(self._ref(rec))
        self.store.update(rec.id, state="stopped")
        audit.log("sandbox_stopped", sandbox=name, id=rec.id)

    async def remove(self, name: str, tenant: str | None = None) -> None:
        rec = self.store.get(name, tenant)
        await self._backend_of(rec).remove(self._ref(rec))
        self.store.delete(rec.id)
        from . import detached

        if os.path.isdir(detached.sandbox_dir(self.store.path, rec.id)):  # its detached commands go with it
            import asyncio

            await asyncio.to_thread(detached.reap, self.store.path, rec.id)
        audit.log("sandbox_removed", sandbox=name, id=rec.id)

    async def status(self, name: str, tenant: str | None = None) -> str:
        rec = self.store.get(name, tenant)
        if rec.state == "creating":
            return "creating"
        return await self._backend_of(rec).status(self._ref(rec))

    async def list(self, tenant: str | None = None, live: bool = True,
                   all_tenants: bool = False) -> list[dict[str, Any]]:
        """Named sandboxes with their live engine state (one engine query per backend in use)."""
        records = self.store.list_all() if all_tenants else self.store.list(tenant)
        live_state: dict[str, str] = {}
        if live:
            for bname in sorted({r.backend for r in records}):
                try:
                    for info in await self.backend_for(bname).list():
                        live_state[info.id] = info.status
                except Exception:  # engine down: report what the store knows
                    continue
        out = []
        for r in records:
            d = {"name": r.name, "id": r.id, "backend": r.backend, "image": r.spec.get("image"),
                 "profile": (r.spec.get("policy") or {}).get("profile"), "state": r.state,
                 "created_at": r.created_at}
            if live and r.state != "creating":
                d["state"] = live_state.get(r.id, "missing")
            out.append(d)
        return out

    # -- one-shot --
    async def run(self, spec: SandboxSpec, req: ExecRequest, *, start_gate=None, phased: bool = False) -> ExecResult:
        """A fresh sandbox for one command, destroyed afterwards; owned by this process meanwhile.
        ``start_gate`` (a semaphore: the daemon's start limiter) bounds its create+start, not its command.
        ``phased``: create, start, exec and remove as separate steps, each timed in the result's timings (the
        benchmark's phase table), instead of the one-shot path."""
        spec = spec.replace(backend=canonical(spec.backend))
        from .oneshot import run_async

        return await run_async(self.backend_for(spec.backend, spec.options), spec, req, self._owner(named=False),
                               start_gate=start_gate, phased=phased)
