"""The daemon: one long-lived process that owns warm pools and serves runs over a unix socket.

- listens on ``paths.daemon_socket()`` (its directory 0700, the socket 0600: only this user);
- at start, reaps everything whose owner is provably dead (journal and a full engine label scan),
  then pre-warms the configured pools;
- ``run`` requests get a warm, health-checked member for exactly one use (lease mode: the client
  talks to the member's agent directly), or are executed here and streamed (proxy mode) for
  backends without an agent socket (e.g. wasm);
- SIGTERM/SIGINT or ``stop``: stop accepting, let running leases finish (bounded), destroy every
  pooled member, remove the socket and pid file, exit 0. Named sandboxes are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import os
import signal
import time
from random import getrandbits as _getrandbits
from typing import Any

from .. import audit, owner, paths
from ..backends import canonical, get_backend
from ..backends.base import AgentAccess, Backend, ExecRequest, ExecResult, InstancePool
from ..errors import AgentKernelError, ValidationError
from ..limits import raise_open_files_limit
from ..pool import PoolConfig, WarmPool
from ..spec import SandboxSpec
from . import leases
from . import protocol as P

log = logging.getLogger("agentkernel.daemon")

DRAIN_S = 10.0
STOP_BASE_S = 40.0  # stop_timeout_s: this, plus STOP_PER_MEMBER_S per pooled member
STOP_PER_MEMBER_S = 0.5
MAINTAIN_EVERY_S = 5.0
IDLE_POOL_S = 900.0
# Worker threads of the daemon's loop (``asyncio.to_thread``, ``run_in_executor(None, ...)``). A member's start
# and its teardown each hold a worker for their whole wall time (the runtime's spawn and exit, the killed
# processes' exit, ~20-60 ms), mostly blocked, not computing: with asyncio's default (cpus + 4: 6 workers on
# 2 cores) ~100 one-shot runs/s needed more workers than there were, and starts, teardowns and journal writes
# queued behind each other (issue 18). Idle workers cost nothing; they are made on demand.
WORKER_THREADS = 64
# Audit events wait this long and go out in one write. Written once per loop turn instead (one open, write,
# fstat and close each), auditing took ~11% of the event loop under pipelined wasm runs (py-spy). A crash
# loses at most this much of the log; `audit.defer(None)` on a clean stop writes what is waiting.
AUDIT_FLUSH_S = 0.005


def use_worker_threads(loop: asyncio.AbstractEventLoop) -> None:
    """Give ``loop`` a default executor of ``WORKER_THREADS`` workers (shut down with the loop by
    ``asyncio.run``, as the default one is)."""
    from concurrent.futures import ThreadPoolExecutor

    loop.set_default_executor(ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="agentkernel-worker"))


def pid_path() -> str:
    return paths.daemon_socket() + ".pid"


class Daemon:
    def __init__(self, *, pool_defaults: PoolConfig, warm: list[tuple[SandboxSpec, PoolConfig]]) -> None:
        self.pool_defaults = pool_defaults
        self.warm = warm
        self.pools: dict[str, WarmPool] = {}
        self.start_sem = asyncio.Semaphore(pool_defaults.max_concurrent_starts)
        self.owner = owner.current_owner()
        self.started_at = time.time()
        self.active = 0
        self.runs = 0
        self._stopping = asyncio.Event()
        self._backends: dict[tuple, Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inproc_pools: set[tuple[str, str]] = set()
        self._inproc_known: dict[tuple[int, str], tuple[SandboxSpec]] = {}  # specs already checked and warmed
        self._pool_keys: dict[int, tuple[SandboxSpec, str]] = {}  # id(spec) -> (spec, its pool key): pool_for
        self._request_specs: dict[bytes, SandboxSpec] = {}  # a run request's spec (marshalled) -> its spec: _run
        self._bg_tasks: set[asyncio.Task] = set()

    # -- pools --
    def backend(self, spec: SandboxSpec):
        key = (spec.backend, tuple(sorted(spec.options.items())))
        b = self._backends.get(key)
        if b is None:
            b = self._backends[key] = get_backend(spec.backend, spec.options)
            b.background = True
        return b

    def pool_for(self, spec: SandboxSpec, cfg: PoolConfig | None = None) -> WarmPool:
        # the pool key of a spec object seen before (``serve`` reuses one spec object for identical requests:
        # api/speccache.py): ~17 us of replace + pool_key saved per run. The entry holds the spec, so its id
        # cannot be reused by another object while it is kept.
        known = self._pool_keys.get(id(spec))
        if known is not None and known[0] is spec:
            key = known[1]
        else:
            key = spec.replace(name=None).pool_key()
            if len(self._pool_keys) >= 1024:
                self._pool_keys.clear()
            self._pool_keys[id(spec)] = (spec, key)
        pool = self.pools.get(key)
        if pool is None:
            spec = spec.replace(name=None)
            backend = self.backend(spec)
            backend.check(spec)
            pool = self.pools[key] = WarmPool(spec, backend, cfg or self.pool_defaults, self.start_sem, self.owner)
            pool.refill()
        return pool

    def poolable(self, spec: SandboxSpec) -> bool:
        backend = self.backend(spec)
        return "pool" in backend.capabilities.features and isinstance(backend, AgentAccess)

    # -- lifecycle --
    async def listen(self) -> str:
        """Serve the local protocol on the daemon socket (refuses if a live daemon already answers)."""
        sock = paths.daemon_socket()
        os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
        _remove_stale_socket(sock)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=sock)
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        with open(pid_path(), "w") as f:
            f.write(f"{os.getpid()}\n")
        return sock

    def stop_listening(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for path in (paths.daemon_socket(), pid_path()):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        use_worker_threads(loop)
        sock = await self.listen()
        audit.defer(lambda: loop.call_later(AUDIT_FLUSH_S, audit.flush))  # AUDIT_FLUSH_S of events in one write
        try:
            await self._serve(sock, loop)
        finally:
            audit.defer(None)  # what is still waiting is written now
        audit.log("daemon_stopped")
        log.info("stopped")

    async def _serve(self, sock: str, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        audit.log("daemon_started", socket=sock)
        log.info("listening on %s (pid %d)", sock, os.getpid())
        self._warm_pools()
        reaper = asyncio.create_task(self._reap_orphans())  # never touches our own (live) members
        maint = asyncio.create_task(self._maintain())
        await self._stopping.wait()
        log.info("stopping")
        self.stop_listening()
        maint.cancel()
        reaper.cancel()
        deadline = time.monotonic() + DRAIN_S
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        for b in self._backends.values():
            await b.aclose()

    def _warm_pools(self) -> None:
        for spec, cfg in self.warm:
            try:
                if self.poolable(spec):
                    self.pool_for(spec, cfg)
                elif isinstance(self.backend(spec), InstancePool):  # wasm: its in-process instance pool
                    size = max(cfg.min_size, 8)
                    task = asyncio.get_running_loop().create_task(self._inproc_backend(spec, "sh", size))
                    self._bg_tasks.add(task)
                    task.add_done_callback(self._warm_done)
            except AgentKernelError as exc:
                log.error("cannot warm a pool for %s/%s: %s", spec.backend, spec.image, exc)

    def _warm_done(self, task: asyncio.Task) -> None:
        self._bg_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot warm an in-process pool: %s", task.exception())

    async def _inproc_backend(self, spec: SandboxSpec, command: str, size: int | None = None) -> Backend:
        """The backend for a spec that runs in this process (no pool of started sandboxes), with its own
        instance pool for ``spec`` and ``command``'s module started on first use."""
        backend = self.backend(spec)
        known = self._inproc_known.get((id(spec), command))
        if known is not None and known[0] is spec:  # the same spec object again (a mux connection's)
            return backend
        backend.check(spec)
        if isinstance(backend, InstancePool):
            key = (spec.pool_key(), command)
            if key not in self._inproc_pools:
                self._inproc_pools.add(key)
                await backend.start_pool(spec, size or max(self.pool_defaults.min_size, 8), command=command)
        if len(self._inproc_known) > 4096:
            self._inproc_known.clear()
        self._inproc_known[(id(spec), command)] = (spec, backend)
        return backend

    def run_now(self, spec: SandboxSpec, req: ExecRequest, *, via: str = "daemon") -> ExecResult | None:
        """``run`` done right here on the loop, without a task or a thread hop, when it can be: ``spec`` is
        an object ``run`` already served for this command (checked, its in-process pool started) and the
        backend runs it now (``run_now``: wasm when the command's recent runs fit the loop's budget).
        None: use ``run``. ``spec`` must be canonical (backend canonical, no name)."""
        known = self._inproc_known.get((id(spec), req.argv[0]))
        if known is None or known[0] is not spec:
            return None
        run_now = getattr(known[1], "run_now", None)
        if run_now is None:
            return None
        result = run_now(spec, req)
        if result is None:
            return None
        self.runs += 1
        # the id only names the run in the audit log (nothing of it outlives this call): owner.new_id's
        # form without its getrandom(2) call per run
        audit.log("run", id=f"run-{_getrandbits(40):010x}", backend=spec.backend, image=spec.image, argv=req.argv,
                  exit_code=result.exit_code, timed_out=result.timed_out, oom_killed=result.oom_killed, via=via)
        return result

    async def _run_unpooled(self, backend: Backend, spec: SandboxSpec, req: ExecRequest,
                            via: str = "daemon") -> ExecResult:
        """A fresh one-shot sandbox through the one-shot runner (claimed in the ownership journal while it
        runs, unless the backend runs in this process: nothing of it could outlive a crash)."""
        from ..oneshot import run_async

        return await run_async(backend, spec, req, self.owner, journal=not backend.in_process, via=via)

    async def _reap_orphans(self) -> None:
        from ..reap import reap

        try:
            removed = await reap()
            if removed:
                log.info("reaped %d orphaned sandboxes: %s", len(removed), ", ".join(removed))
        except Exception as exc:
            log.warning("orphan scan failed: %s", exc)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_EVERY_S)
            now = time.monotonic()
            for key, pool in list(self.pools.items()):
                configured = any(s.replace(name=None).pool_key() == key for s, _ in self.warm)
                if not configured and now - pool.last_used > IDLE_POOL_S and not pool._in_use:
                    del self.pools[key]
                    await pool.close()
                    continue
                await pool.maintain()

    def stop_timeout_s(self) -> float:
        """How long a client should wait for this daemon to stop: leases drain (``DRAIN_S``), then every
        pooled member is destroyed (batched, but each still costs the engine some work)."""
        members = sum(p.alive() for p in self.pools.values())
        return STOP_BASE_S + STOP_PER_MEMBER_S * members

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "socket": paths.daemon_socket(),
                "uptime_s": round(time.time() - self.started_at, 1),
                "active_runs": self.active, "runs": self.runs,
                "pools": [p.status() for p in self.pools.values()]
                + [p.status() for b in self._backends.values() if isinstance(b, InstancePool) for p in b.pools()]}

    # -- in-process use (the HTTP API and MCP server run inside the daemon's process: one owner) --
    async def run(self, spec: SandboxSpec, req: ExecRequest, *, via: str = "api") -> ExecResult:
        """One command in a fresh sandbox from the warm pool for ``spec`` (or the backend's own one-shot
        path for backends without pools), destroyed afterwards. Cancelling it kills the command and
        destroys the sandbox."""
        if spec.name is not None or spec.backend != canonical(spec.backend):
            spec = spec.replace(backend=canonical(spec.backend), name=None)
        self.active += 1
        self.runs += 1
        t0 = time.perf_counter()
        try:
            if not self.poolable(spec):
                backend = await self._inproc_backend(spec, req.argv[0])
                return await self._run_unpooled(backend, spec, req, via=via)
            pool = self.pool_for(spec)
            member, hit = await pool.acquire()
            acquired = time.perf_counter()
            try:
                result = await pool.backend.exec(member.ref, req)
            finally:
                pool.release(member)
            result.timings.update({"acquire_ms": round((acquired - t0) * 1e3, 3), "pooled": 1.0 if hit else 0.0,
                                   "total_ms": round((time.perf_counter() - t0) * 1e3, 3)})
            audit.log("run", id=member.ref.id, backend=spec.backend, image=spec.image, argv=req.argv, pooled=hit,
                      exit_code=result.exit_code, via=via)
            return result
        finally:
            self.active -= 1

    async def start_background(self) -> None:
        """Start pools and maintenance without serving the unix socket (for an embedding server)."""
        use_worker_threads(asyncio.get_running_loop())
        self._warm_pools()
        await self._reap_orphans()
        self._maint_task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        """Destroy every pooled member and release backends (named sandboxes are not touched)."""
        self.stop_listening()
        task = getattr(self, "_maint_task", None)
        if task:
            task.cancel()
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        for b in self._backends.values():
            await b.aclose()

    # -- connections --
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fr = P.FrameReader()
        try:
            req, early = await _read_request(reader, fr)
            if req.get("v") != P.PROTOCOL_VERSION:
                raise AgentKernelError(f"daemon protocol version {req.get('v')!r} is not {P.PROTOCOL_VERSION}",
                                       hint="restart the daemon after upgrading: agentkernel daemon stop")
            op = req.get("op")
            if op == "ping":
                writer.write(P.oframe(P.REPLY, {"ok": True, "pid": os.getpid()}))
            elif op == "status":
                writer.write(P.oframe(P.REPLY, self.status()))
            elif op == "stop":
                writer.write(P.oframe(P.REPLY, {"ok": True, "pid": os.getpid(),
                                                "stop_timeout_s": self.stop_timeout_s()}))
                self._stopping.set()
            elif op == "run":
                await self._run(req, reader, writer, fr)
            elif op == "mux":
                writer.write(P.oframe(P.REPLY, {"ok": True, "pid": os.getpid()}))
                await self._mux(reader, writer, fr, early)
            else:
                writer.write(P.oframe(P.ERROR, {"message": f"unknown op {op!r}", "kind": "ValidationError"}))
            await writer.drain()
        except AgentKernelError as exc:
            _send_error(writer, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # never let one bad request take the daemon down
            log.exception("request failed")
            _send_error(writer, AgentKernelError(f"daemon error: {exc}"))
        finally:
            try:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _mux(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fr: P.FrameReader,
                   early: list[tuple[int, bytes]]) -> None:
        """Multiplexed mode: many pipelined runs on this connection, answered by id in completion order."""
        from .mux import MuxSession

        await MuxSession(self, reader, writer, fr).serve(early)

    def request_spec(self, d: dict) -> SandboxSpec:
        """The spec of a run request's ``spec`` dict, nameless and with its canonical backend. A CLI sends
        the same dict for every run of one resolution (``resolvedspec``): the spec object made for the first
        is reused (~35 us of validation and copying, and ``pool_for`` then knows its pool key: ~20 us more).
        Specs are immutable; an invalid dict raises and is not kept."""
        raw = marshal.dumps(d, 0)  # version 0 has no references: equal data, equal bytes (v3 depends on refcounts)
        spec = self._request_specs.get(raw)
        if spec is None:
            spec = SandboxSpec.from_dict(d)
            spec = spec.replace(backend=canonical(spec.backend), name=None)
            if len(self._request_specs) >= 256:
                self._request_specs.clear()
            self._request_specs[raw] = spec
        return spec

    async def _run(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   fr: P.FrameReader) -> None:
        spec = self.request_spec(req["spec"])
        if spec.policy.mount_cwd and not spec.policy.mount_source:
            # never the daemon's own directory: the client names the directory it means (its cwd)
            raise ValidationError("mount_cwd through the daemon needs policy.mount_source (the caller's directory)",
                                  hint="upgrade the client, or run with --no-daemon")
        argv = req["argv"]
        self.active += 1
        self.runs += 1
        t0 = time.perf_counter()
        try:
            if self.poolable(spec):
                await self._run_lease(spec, argv, reader, writer, fr, t0)
            else:
                await self._run_proxy(spec, argv, req, reader, writer, fr)
        finally:
            self.active -= 1

    async def _run_lease(self, spec, argv, reader, writer, fr, t0) -> None:
        pool = self.pool_for(spec)
        member, hit = await pool.acquire()
        try:
            # the client owns it while it runs in it: a dead daemon's reaper must spare it
            member.lent_to = leases.hand_to_client(spec.backend, member.ref, writer)
            info = await pool.backend.agent_endpoint(member.ref)
            info.update({"mode": "lease", "sandbox": member.ref.id, "hit": hit,
                         "acquire_ms": round((time.perf_counter() - t0) * 1e3, 3)})
            names = leases.hand_back_names(spec.backend, member.ref, member.lent_to, self.owner)
            if names is not None:
                info["journal"] = names
            writer.write(P.oframe(P.REPLY, info))
            await writer.drain()
            summary: dict = {}
            while True:  # the lease lasts until the client closes its connection
                data = await reader.read(65536)
                if not data:
                    break
                for t, payload in fr.feed(data):
                    if t == P.DONE:
                        summary = P.decode(payload)
            audit.log("run", id=member.ref.id, backend=spec.backend, image=spec.image, argv=argv, pooled=hit,
                      exit_code=summary.get("exit_code"), via="daemon")
        finally:
            pool.release(member)

    async def _run_proxy(self, spec, argv, req, reader, writer, fr) -> None:
        backend = await self._inproc_backend(spec, argv[0])
        writer.write(P.oframe(P.REPLY, {"mode": "proxy"}))
        stdin_q: asyncio.Queue[bytes] = asyncio.Queue()

        async def stdin_iter():
            while True:
                chunk = await stdin_q.get()
                if not chunk:
                    return
                yield chunk

        def on_output(fd: int, data: bytes) -> None:
            writer.write(P.frame(P.STDOUT if fd == 1 else P.STDERR, data))

        timeout = req.get("timeout")
        exec_req = ExecRequest(argv, stdin=stdin_iter() if req.get("stdin") else None,
                               timeout=float(timeout) if timeout else None, on_output=on_output)
        run_task = asyncio.create_task(self._run_unpooled(backend, spec, exec_req))

        async def pump_client() -> None:
            while True:
                data = await reader.read(65536)
                if not data:
                    run_task.cancel()  # client went away: kill the command and its sandbox
                    return
                for t, payload in fr.feed(data):
                    if t == P.STDIN:
                        stdin_q.put_nowait(payload)
                    elif t == P.STDIN_EOF:
                        stdin_q.put_nowait(b"")

        pump = asyncio.create_task(pump_client())
        try:
            result = await run_task
            writer.write(P.oframe(P.EXIT, {k: v for k, v in result.to_dict().items() if k not in ("stdout", "stderr")}))
            await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            pump.cancel()


async def _read_request(reader: asyncio.StreamReader, fr: P.FrameReader) -> tuple[dict, list[tuple[int, bytes]]]:
    """The connection's first frame (a request), and any frames that arrived with it (pipelined)."""
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("client closed before sending a request")
        frames = fr.feed(data)
        if frames:
            t, payload = frames[0]
            if t != P.REQUEST:
                raise AgentKernelError("protocol error: the first frame must be a request")
            return P.decode(payload), frames[1:]


def _send_error(writer: asyncio.StreamWriter, exc: AgentKernelError) -> None:
    try:
        writer.write(P.oframe(P.ERROR, {"message": exc.message, "hint": exc.hint, "kind": type(exc).__name__,
                                        "exit_code": exc.exit_code}))
    except (ConnectionError, OSError, RuntimeError):
        pass


def _remove_stale_socket(sock: str) -> None:
    """Refuse to start twice; remove a socket no daemon answers on."""
    import socket as _socket

    if not os.path.exists(sock):
        return
    s = _socket.socket(_socket.AF_UNIX)
    try:
        s.settimeout(1.0)
        s.connect(sock)
    except OSError:
        os.unlink(sock)
        return
    finally:
        s.close()
    raise AgentKernelError(f"a daemon is already running on {sock}", hint="agentkernel daemon status")


def load_daemon_config(args_pool: dict[str, Any] | None = None, warm_flags: list[str] | None = None,
                       cfg: dict[str, Any] | None = None):
    """[pool] defaults + [[pool.warm]] entries from ``cfg`` (the caller's loaded config file; None: the
    working directory's agentkernel.toml), overridden by flags."""
    from .. import config

    if cfg is None:
        cfg = config.load_config(config.find_config(None, os.getcwd()))
    pool = dict(cfg.get("pool", {}))
    warm_entries = pool.pop("warm", [])
    pool.update({k: v for k, v in (args_pool or {}).items() if v is not None})
    if "min" in pool and "max" not in pool:
        pool["max"] = max(int(pool["min"]), 32)  # asking for more warm members raises the cap with them
    defaults = PoolConfig.from_dict(pool)
    warm: list[tuple[SandboxSpec, PoolConfig]] = []
    for entry in warm_entries:
        e = dict(entry)
        sizes = {k: e.pop(k) for k in ("min", "max", "max_age_s", "wait_s") if k in e}
        spec = config.resolve_spec(e, config={k: v for k, v in cfg.items() if k != "pool"})
        warm.append((spec, PoolConfig.from_dict({**defaults.to_dict(), **sizes})))
    for w in warm_flags or []:
        parts = w.split(":")
        flags = {"backend": parts[0] or None}
        if len(parts) > 1 and parts[1]:
            flags["image"] = parts[1]
        if len(parts) > 2 and parts[2]:
            flags["profile"] = parts[2]
        spec = config.resolve_spec(flags, config={k: v for k, v in cfg.items() if k != "pool"})
        warm.append((spec, defaults))
    if not warm:
        warm.append((config.resolve_spec({}, config={k: v for k, v in cfg.items() if k != "pool"}), defaults))
    return defaults, warm


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="agentkernel-daemon")
    p.add_argument("--pool-min", type=int)
    p.add_argument("--pool-max", type=int)
    p.add_argument("--max-age", type=float)
    p.add_argument("--max-concurrent-starts", type=int)
    p.add_argument("--warm", action="append", default=[], metavar="BACKEND[:IMAGE[:PROFILE]]")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        defaults, warm = load_daemon_config(
            {"min": a.pool_min, "max": a.pool_max, "max_age_s": a.max_age,
             "max_concurrent_starts": a.max_concurrent_starts}, a.warm)
        os.environ["AGENTKERNEL_NO_DAEMON"] = "1"
        raise_open_files_limit()
        asyncio.run(Daemon(pool_defaults=defaults, warm=warm).serve())
    except AgentKernelError as exc:
        log.error("%s%s", exc.message, f" (hint: {exc.hint})" if exc.hint else "")
        return 1
    return 0
