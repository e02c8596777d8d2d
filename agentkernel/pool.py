"""Warm pools of started sandboxes, keyed by the full effective spec (``SandboxSpec.pool_key``).

Rules (DESIGN.md "Use once"):
- every member is created and started with the agent, and health-checked (agent ping) at hand-out;
- each member serves exactly one run and is then destroyed in the background; nothing is reused;
- the pool refills in the background to a target that adapts to the observed demand and start time
  (``pool_policy``: at least ``min_size``, never above ``max_size`` members alive, shrinking back to
  ``min_size`` when idle), with at most ``max_concurrent_starts`` starts at once across all pools (a
  shared semaphore); a pool whose engine cannot start members as fast as they are consumed says so;
- members older than ``max_age_s`` are replaced;
- an empty pool makes the caller wait up to ``wait_s`` for a member being started, then cold-starts
  one for it (through the same start semaphore as refills): acquire never fails because the pool is
  exhausted.
Pool members are owned by the daemon process (ownership journal + labels), so a SIGKILLed daemon's
members are reaped by the next agentkernel command.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from . import owner
from .backends.base import Backend, SandboxRef
from .pool_policy import PoolPolicy
from .spec import SandboxSpec

REFILL_DELAY_S = 0.15
CLOSE_WAIT_STARTS_S = 60.0


class PoolClosed(Exception):
    """The pool closed before a member's start began."""


class PoolConfig:
    __slots__ = ("max_age_s", "max_concurrent_starts", "max_size", "min_size", "wait_s")

    def __init__(self, min_size: int = 2, max_size: int = 32, max_age_s: float = 600.0,
                 max_concurrent_starts: int = 4, wait_s: float = 5.0) -> None:
        from .errors import ConfigError

        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigError(f"pool sizes must satisfy 0 <= min <= max and max >= 1 (min={min_size}, max={max_size})")
        if max_concurrent_starts < 1:
            raise ConfigError("pool max_concurrent_starts must be at least 1")
        self.min_size, self.max_size, self.max_age_s = min_size, max_size, max_age_s
        self.max_concurrent_starts, self.wait_s = max_concurrent_starts, wait_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolConfig:
        return cls(min_size=int(d.get("min", 2)), max_size=int(d.get("max", 32)),
                   max_age_s=float(d.get("max_age_s", 600)),
                   max_concurrent_starts=int(d.get("max_concurrent_starts", 4)),
                   wait_s=float(d.get("wait_s", 5.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min_size, "max": self.max_size, "max_age_s": self.max_age_s,
                "max_concurrent_starts": self.max_concurrent_starts, "wait_s": self.wait_s}


class Member:
    __slots__ = ("created", "lent_to", "ref", "start_ms")

    def __init__(self, ref: SandboxRef, start_ms: float) -> None:
        self.ref = ref
        self.start_ms = start_ms
        self.created = time.monotonic()
        self.lent_to: dict[str, Any] | None = None  # the lease's client its journal entry was lent to


class WarmPool:
    def __init__(self, spec: SandboxSpec, backend: Backend, cfg: PoolConfig, start_sem: asyncio.Semaphore,
                 owner_info: dict[str, Any]) -> None:
        self.spec = spec
        self.key = spec.pool_key()
        self.backend = backend
        self.cfg = cfg
        self._sem = start_sem
        self._owner = owner_info
        self.ready: collections.deque[Member] = collections.deque()
        self._starting = 0
        self._in_use = 0
        self._tasks: set[asyncio.Task] = set()  # member starts (cancellable)
        self._destroying: set[asyncio.Task] = set()  # member removals (always awaited, never cancelled)
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._closed = False
        self.last_used = time.monotonic()
        self.policy = PoolPolicy(min_size=cfg.min_size, max_size=cfg.max_size,
                                 max_starts=cfg.max_concurrent_starts, refill_delay_s=REFILL_DELAY_S)
        self._decision = None
        self.stats = {"hits": 0, "misses": 0, "cold_starts": 0, "started": 0, "destroyed": 0,
                      "start_failures": 0, "health_failures": 0, "expired": 0, "refill_ms_total": 0.0,
                      "refill_ms_last": None, "last_error": None}

    # -- public --
    def alive(self) -> int:
        return len(self.ready) + self._starting + self._in_use

    async def acquire(self) -> tuple[Member, bool]:
        """A started, healthy member for exactly one use, and whether it came warm from the pool."""
        self.last_used = time.monotonic()
        while self.ready:
            m = self.ready.popleft()
            if await self._healthy(m):
                self.stats["hits"] += 1
                self._in_use += 1
                self.policy.on_acquire(time.monotonic(), True, self._in_use)
                # When demand is low, start the replacement a moment later: on a small machine an engine
                # start competes for the CPU with the very command this member is about to run. Under
                # sustained demand the policy starts it at once.
                delay = self._decision.refill_delay_s if self._decision else REFILL_DELAY_S
                if delay:
                    asyncio.get_running_loop().call_later(delay, self.refill)
                else:
                    self.refill()
                return m, True
            self.stats["health_failures"] += 1
            self._destroy_later(m)
        self.stats["misses"] += 1
        self.policy.on_acquire(time.monotonic(), False, self._in_use + 1)
        self.refill()
        if self._starting:
            fut: asyncio.Future[Member] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                m = await asyncio.wait_for(asyncio.shield(fut), self.cfg.wait_s)
                self._in_use += 1
                return m, False
            except TimeoutError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._in_use += 1
                    return fut.result(), False
        self.stats["cold_starts"] += 1
        m = await self._start_member(use_semaphore=True)  # cold starts share the refills' start limiter
        self._in_use += 1
        return m, False

    def release(self, m: Member) -> None:
        """The member has served its one run: destroy it and top the pool up."""
        self._in_use -= 1
        self._destroy_later(m)
        self.refill()

    def refill(self) -> None:
        """Start what the policy asks for (demand-sized target, bounded concurrency); release surplus
        ready members of an idle pool."""
        if self._closed:
            return
        d = self._decision = self.policy.decide(time.monotonic(), ready=len(self.ready), starting=self._starting,
                                                in_use=self._in_use)
        for _ in range(d.shrink):
            if self.ready:
                self._destroy_later(self.ready.pop())
        for _ in range(d.launch):
            self._starting += 1
            self._spawn(self._refill_one())

    async def maintain(self) -> None:
        """Replace members older than max_age."""
        now = time.monotonic()
        keep: collections.deque[Member] = collections.deque()
        while self.ready:
            m = self.ready.popleft()
            if now - m.created > self.cfg.max_age_s:
                self.stats["expired"] += 1
                self._destroy_later(m)
            else:
                keep.append(m)
        self.ready = keep
        self.refill()

    async def close(self) -> None:
        """Destroy every member: ready ones, ones being started (once their start completes) and ones
        already being destroyed (awaited, not cancelled: a cancelled removal would leave the container,
        its run dir and its journal entry behind)."""
        self._closed = True
        for fut in self._waiters:
            fut.cancel()
        self._destroy_all_ready()
        # Let member starts finish rather than cancel them: a start cancelled mid-request can leave the
        # engine creating a container after our removal of it already ran. They destroy what they made
        # as soon as they see the pool closed; only a start stuck past the bound is cancelled.
        starting = list(self._tasks)
        if starting:
            _, stuck = await asyncio.wait(starting, timeout=CLOSE_WAIT_STARTS_S)
            for t in stuck:
                t.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        self._destroy_all_ready()  # members that finished starting while we cancelled
        while self._destroying:
            await asyncio.gather(*list(self._destroying), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        st = dict(self.stats)
        started = st["started"] or 0
        st["refill_ms_avg"] = round(st.pop("refill_ms_total") / started, 1) if started else None
        total = st["hits"] + st["misses"]
        st["hit_rate"] = round(st["hits"] / total, 3) if total else None
        st.update(self.policy.status(time.monotonic()))
        d = self._decision
        st["target_ready"] = d.target_ready if d else self.cfg.min_size
        st["start_concurrency"] = d.concurrency if d else None
        st["keeping_up"] = d.keeping_up if d else True
        st["cannot_keep_up"] = d.note if d else None
        return {"key": self.key, "backend": self.spec.backend, "image": self.spec.image,
                "profile": self.spec.policy.profile, "ready": len(self.ready), "starting": self._starting,
                "in_use": self._in_use, "config": self.cfg.to_dict(), "metrics": st}

    # -- internals --
    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _destroy_later(self, m: Member) -> None:
        t = asyncio.get_running_loop().create_task(self._destroy(m))
        self._destroying.add(t)
        t.add_done_callback(self._destroying.discard)

    def _destroy_all_ready(self) -> None:
        """Destroy every ready member with one ``remove_many`` (an engine call per batch, not per member)."""
        members, self.ready = list(self.ready), collections.deque()
        if members:
            t = asyncio.get_running_loop().create_task(self._destroy_many(members))
            self._destroying.add(t)
            t.add_done_callback(self._destroying.discard)

    async def _destroy_many(self, members: list[Member]) -> None:
        try:
            errors = await self.backend.remove_many([m.ref for m in members])
        except Exception as exc:
            errors = [exc] * len(members)
        gone = [m for m, exc in zip(members, errors, strict=True) if exc is None]
        for m, exc in zip(members, errors, strict=True):
            if exc is not None:  # keep the journal entry: the daemon's next sweep or the next CLI retries
                self.stats["last_error"] = f"destroy {m.ref.id}: {exc}"[:300]
        if gone:
            await _off_loop(_release_all, [(m.ref.backend, m.ref.id, ()) for m in gone])
            self.stats["destroyed"] += len(gone)

    async def _refill_one(self) -> None:
        try:
            m = await self._start_member(use_semaphore=True, counted=True)
        except PoolClosed:
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats["start_failures"] += 1
            self.stats["last_error"] = str(exc)[:300]
            await asyncio.sleep(1.0)  # back off; the next acquire/maintain refills again
            return
        if self._closed:
            self._destroy_later(m)
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(m)
                self.refill()
                return
        self.ready.append(m)
        self.refill()  # a start slot is free: the policy may want more under way

    async def _start_member(self, *, use_semaphore: bool, counted: bool = False) -> Member:
        if use_semaphore:
            await self._sem.acquire()
            if self._closed:  # closed while we waited our turn: create nothing
                self._sem.release()
                if counted:
                    self._starting -= 1
                raise PoolClosed()
        sid = owner.new_id("pool")
        # a fresh id, claimed only ever by this pool's owner until it is leased: no other entry to look for.
        # The journal's file writes (~0.3-1 ms each on a busy disk) run in a worker thread, off the loop that
        # serves requests; each is awaited, so the entry still exists before the engine makes anything.
        planned = self.backend.planned_handle(sid)
        t0 = time.perf_counter()
        try:
            await _off_loop(owner.claim, self.backend.name, sid, planned, self._owner, sole=True)
            ref = await self.backend.create_started(self.spec, sandbox_id=sid, owner=self._owner)
            if ref.handle != planned:
                await _off_loop(owner.claim, self.backend.name, sid, ref.handle, self._owner, sole=True)
        except BaseException:
            try:
                await self.backend.remove(SandboxRef(self.backend.name, sid, self.backend.planned_handle(sid),
                                                     self.spec))
            finally:
                owner.release(self.backend.name, sid)
                if counted:
                    self._starting -= 1
                if use_semaphore:
                    self._sem.release()
            raise
        if use_semaphore:
            self._sem.release()
        ms = (time.perf_counter() - t0) * 1e3
        if counted:
            self._starting -= 1
        self.stats["started"] += 1
        self.policy.on_started(time.monotonic(), ms / 1e3)
        self.stats["refill_ms_total"] += ms
        self.stats["refill_ms_last"] = round(ms, 1)
        return Member(ref, ms)

    async def _healthy(self, m: Member) -> bool:
        if time.monotonic() - m.created > self.cfg.max_age_s:
            return False
        try:
            return bool(await asyncio.wait_for(self.backend.healthy(m.ref), 2.0))
        except Exception:
            return False

    async def _destroy(self, m: Member) -> None:
        try:
            await self.backend.remove(m.ref)
            await _off_loop(owner.release, m.ref.backend, m.ref.id,
                                    (self._owner, m.lent_to) if m.lent_to else (self._owner,))
            self.stats["destroyed"] += 1
        except Exception as exc:  # keep the journal entry: the daemon's next sweep or the next CLI retries
            self.stats["last_error"] = f"destroy {m.ref.id}: {exc}"[:300]


async def _off_loop(fn, *args, **kw):
    """``fn(*args, **kw)`` (the ownership journal's file operations) in a worker thread, off the event loop.
    Cancelled meanwhile, it still waits for ``fn`` to finish before raising: a journal write never lands
    after the caller's cleanup (a release after a claim that was still under way)."""
    import functools

    fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kw))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _release_all(entries: list[tuple[str, str, tuple]]) -> None:
    """``owner.release`` of each (backend, id, owners): one worker-thread hop for a batch."""
    for backend, sid, owners in entries:
        owner.release(backend, sid, owners)
