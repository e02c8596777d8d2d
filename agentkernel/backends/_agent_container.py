"""Shared machinery for container backends whose sandboxes run the agent as PID 1.

Podman, Docker and the gVisor variants all create the same container shape (``_container.plan``):
the static agent bind-mounted at /.ak/ak-agent, serving the agent protocol on a unix socket in a
bind-mounted per-sandbox host directory. Exec and file transfer then never go through the engine:
the host connects straight to that socket (about 1 ms a round trip instead of 50-200 ms per
``podman exec``/``docker exec``), and keeps one connection per running sandbox that its execs share
(``_agentconns``). A subclass supplies only the engine operations (``_engine_*``).
"""

from __future__ import annotations

import os
import time

from .. import paths
from ..errors import BackendUnavailable, InvalidState, NotFound, SandboxError
from ..safefs import UnsafeFile
from ..spec import SandboxSpec
from . import _container
from ._agentexec import parse_environ
from ._container import container_name
from .base import AgentAccess, Backend, ExecRequest, ExecResult, SandboxRef

TYPE_CHECKING = False  # typing costs ~2-7 ms at start-up; annotations are never evaluated here
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import Any


AGENT_READY_TIMEOUT = 30.0
ENGINE_STATE_EVERY_S = 0.5  # while waiting for the agent: how often the engine is asked if the container died
# stdin up to this size rides the shared connection: the agent queues up to 1 MiB of a command's stdin
# before it stops reading the connection (agent-protocol.md section 5), which would stall its neighbours
SHARED_STDIN_MAX = 512 * 1024


def shares_connection(req: ExecRequest) -> bool:
    """Whether ``req`` can run on its sandbox's shared agent connection. Not when it could hold up the
    other streams on it: stdin streamed from an iterator or larger than SHARED_STDIN_MAX (a command that
    does not read it stops the agent reading the connection), or output going to an async callback (the
    connection's reader waits for it: a slow consumer would stall every command's output)."""
    if req.stdin is not None and not (isinstance(req.stdin, (bytes, bytearray, memoryview))
                                      and len(req.stdin) <= SHARED_STDIN_MAX):
        return False
    out = req.on_output
    if out is None:
        return True
    import inspect

    return not (inspect.iscoroutinefunction(out) or inspect.iscoroutinefunction(type(out).__call__))


class AgentContainerBackend(Backend, AgentAccess):
    """Backend base for agent-in-container engines. Subclasses implement the ``_engine_*`` methods."""

    # networked sandboxes get a namespace behind the egress gateway (egress/), which the engine joins
    uses_egress = False
    # the engine cannot join a namespace path: the sandbox's init waits until the host moved the network
    # into the namespace the engine made (egress.attach.complete after start)
    egress_deferred = False
    # the engine would keep the workdir outside the capped root (podman's anonymous volume): bind a capped
    # directory of ours there instead (_container.prepare_disk_dir)
    capped_workdir = False
    # the runtime keeps /tmp in unsized memory of its own (gVisor): a capped root gets a sized /tmp tmpfs
    sized_tmp = False

    @property
    def _conns(self):
        """This backend object's shared agent connections, one per running sandbox (_agentconns)."""
        conns = self.__dict__.get("_agent_conns")
        if conns is None:
            from ._agentconns import AgentConns

            conns = self.__dict__["_agent_conns"] = AgentConns()
        return conns

    # -- engine operations (subclass) --
    async def _engine_create(self, plan: _container.ContainerPlan) -> str:
        """Create (not start) the container; return the engine's id for it."""
        raise NotImplementedError

    async def _engine_start(self, name: str) -> None:
        raise NotImplementedError

    async def _engine_stop(self, name: str) -> None:
        raise NotImplementedError

    async def _engine_remove(self, name: str) -> None:
        """Force-remove; a missing container is not an error."""
        raise NotImplementedError

    async def _engine_state(self, name: str) -> tuple[str, dict[str, Any]]:
        """(status, details) where status is running/stopped/created/missing and details may carry
        ``oom_killed`` and ``exit_code``."""
        raise NotImplementedError

    # -- Backend interface --
    def planned_handle(self, sandbox_id: str) -> dict[str, Any]:
        return {"container": container_name(sandbox_id), "run_dir": _container.sandbox_run_dir(sandbox_id)}

    async def create_started(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any]) -> SandboxRef:
        return await self.create(spec, sandbox_id=sandbox_id, owner=owner, start=True)

    async def create(self, spec: SandboxSpec, *, sandbox_id: str, owner: dict[str, Any],
                     start: bool = False) -> SandboxRef:
        """Create the container; with ``start`` also start it (one engine call where the engine has one,
        e.g. ``podman run -d``: the pool's refills use it) and wait for its agent."""
        agent = paths.agent_binary()
        if agent is None:
            raise BackendUnavailable(
                "the in-sandbox agent binary is missing", hint="build it: make -C agent (scripts/setup.sh does)"
            )
        run_dir = _container.prepare_run_dir(sandbox_id, _container.resolve_user(spec))
        name = container_name(sandbox_id)
        try:
            net = None
            if self.uses_egress and spec.policy.network:
                import asyncio

                net = await asyncio.to_thread(_container.attach_network, spec, sandbox_id, self.egress_deferred)
            ddir = _container.prepare_disk_dir(spec, sandbox_id) if self.capped_workdir else None
            p = _container.plan(spec, sandbox_id=sandbox_id, owner=owner, container_name=name,
                                agent_bin=agent, run_dir=run_dir, pids_runtime=self.pids_runtime, net=net,
                                disk_dir=ddir, sized_tmp=self.sized_tmp)
            cid = await (self._engine_run_detached(p) if start else self._engine_create(p))
        except BaseException:
            _container.remove_run_dir(sandbox_id)
            if self.uses_egress:
                _container.release_network(sandbox_id)
            raise
        ref = SandboxRef(self.name, sandbox_id, {"container": name, "container_id": cid, "run_dir": run_dir}, spec)
        if start:
            await self._wait_agent(ref, self._socket(ref))
        return ref

    async def _engine_run_detached(self, plan: _container.ContainerPlan) -> str:
        """Create and start in one go; engines with a single call for it override this."""
        cid = await self._engine_create(plan)
        await self._engine_start(plan.name)
        return cid

    def _socket(self, ref: SandboxRef) -> str:
        return os.path.join(ref.handle["run_dir"], "agent.sock")

    async def start(self, ref: SandboxRef) -> None:
        # The run dir lives on a tmpfs: recreate it after a host reboot before the bind mount needs it.
        _container.prepare_run_dir(ref.id, _container.resolve_user(ref.spec))
        sock = self._socket(ref)
        await self._conns.discard(ref.id)
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        await self._engine_start(ref.handle["container"])
        await self._wait_agent(ref, sock)

    async def _wait_agent(self, ref: SandboxRef, sock: str) -> None:
        """Wait for the agent to answer, then record the environment the engine gave PID 1 (image env +
        spec env): commands exec'd through the agent get exactly that, like an engine exec would. The
        connection stays open as the sandbox's shared one."""
        import asyncio

        from ..agent.client import AgentClient

        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        delay = 0.002
        last: Exception | None = None
        # the engine is asked whether the container died at most every ENGINE_STATE_EVERY_S: each ask is an
        # engine call (a podman process, queued for an engine slot when the engine is busy)
        next_state = time.monotonic() + ENGINE_STATE_EVERY_S
        while time.monotonic() < deadline:
            if os.path.exists(sock):
                try:
                    client = await AgentClient.connect(sock)
                    try:
                        ref.handle["env"] = parse_environ(await client.read_file("/proc/1/environ"))
                    except BaseException:
                        await client.close()
                        raise
                    if not self._conns.adopt(ref.id, client, optional=True):
                        await client.close()
                    return
                except OSError as exc:
                    last = exc
            if (t := time.monotonic()) >= next_state:
                state, _ = await self._engine_state(ref.handle["container"])
                if state not in ("running", "created"):
                    raise SandboxError(f"sandbox {ref.id} exited while starting (state: {state})")
                next_state = time.monotonic() + ENGINE_STATE_EVERY_S
                deadline += next_state - ENGINE_STATE_EVERY_S - t  # a busy engine's answer is not the agent's time
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        raise SandboxError(f"the agent in sandbox {ref.id} did not answer within {AGENT_READY_TIMEOUT:.0f} s"
                           + (f" ({last})" if last else ""))

    async def healthy(self, ref: SandboxRef) -> bool:
        """Pool hand-out check: the agent answers a ping on the sandbox's shared connection (the one
        the exec that follows uses); a stale one gets a second chance on a fresh connection."""
        from ..agent.client import AgentClient

        for _ in range(2):
            had = self._conns.peek(ref.id)
            try:
                client = await self._conns.get(ref.id, lambda: AgentClient.connect(self._socket(ref), timeout=2.0))
            except OSError:
                return False
            try:
                await client.ping()
                return True
            except OSError:
                self._conns.drop(ref.id, client)
                if had is not client:
                    return False
        return False

    async def agent_endpoint(self, ref: SandboxRef) -> dict[str, Any]:
        """What a client needs to run one command through this sandbox's agent itself."""
        from ._agentexec import exec_env

        return {"socket": self._socket(ref), "env": exec_env(ref.handle.get("env"), ref.spec.env, {}),
                "cwd": ref.spec.workdir}

    async def open_agent(self, ref: SandboxRef):
        """A connection of its own to the sandbox's agent (for attach and other direct use); the caller
        closes it."""
        return await self._client(ref)

    async def _client(self, ref: SandboxRef):
        from ..agent.client import AgentClient

        sock = self._socket(ref)
        try:
            return await AgentClient.connect(sock)
        except UnsafeFile as exc:
            raise SandboxError(f"sandbox {ref.spec.name or ref.id}: refusing to connect to its agent: {exc} "
                               "(something inside the sandbox replaced it)",
                               hint=f"agentkernel rm {ref.spec.name or ref.id}") from None
        except OSError:
            state, _ = await self._engine_state(ref.handle["container"])
            if state == "missing":
                raise NotFound(f"sandbox {ref.spec.name or ref.id} no longer exists in {self.name}") from None
            raise InvalidState(f"sandbox {ref.spec.name or ref.id} is not running (state: {state})",
                               hint=f"agentkernel start {ref.spec.name or ref.id}") from None

    async def exec(self, ref: SandboxRef, req: ExecRequest) -> ExecResult:
        """Run on the sandbox's shared connection when ``shares_connection(req)``, else on one of its own.
        A shared connection lost before the command started (it was stale: the agent restarted or went
        away since its last use) is dropped and the exec retried once on a fresh one, which either runs
        it or says clearly that the sandbox is gone or stopped."""
        from ..agent.client import AgentConnectionLost
        from ._agentexec import exec_via_agent

        shared = shares_connection(req)
        for attempt in (0, 1):
            client = await (self._conns.get(ref.id, lambda: self._client(ref)) if shared else self._client(ref))
            started = False

            def on_start(pid: int) -> None:
                nonlocal started
                started = True
                if req.on_start is not None:
                    req.on_start(pid)

            try:
                return await exec_via_agent(client, ref.spec, req, ref.handle.get("env"), on_start=on_start)
            except AgentConnectionLost as lost:
                if shared:
                    self._conns.drop(ref.id, client)
                    if attempt == 0 and not started:
                        continue
                state, details = await self._engine_state(ref.handle["container"])
                why = [f"state: {state}"]
                if details.get("oom_killed"):
                    why.append("killed by the OOM killer")
                if state == "stopped" and details.get("exit_code") is not None:
                    why.append(f"its init exited with {details['exit_code']}")
                if details.get("reason"):
                    why.append(details["reason"])
                if details.get("log"):
                    why.append(f"its last output: {details['log']}")
                why.append(str(lost))
                raise SandboxError(
                    f"sandbox {ref.spec.name or ref.id} died while the command ran ({'; '.join(why)})"
                ) from None
            finally:
                if not shared:
                    await client.close()
        raise AssertionError("unreachable")

    # File transfers keep a connection each: a download streams at its reader's pace, and the agent
    # stops sending on a connection whose reader lags, which would stall the execs sharing it.
    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        return await agent_write_file(lambda: self._client(ref), ref, path, data, mode)

    def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        return agent_read_file(lambda: self._client(ref), ref, path)

    async def stop(self, ref: SandboxRef) -> None:
        await self._conns.discard(ref.id)
        await self._engine_stop(ref.handle["container"])

    async def remove(self, ref: SandboxRef) -> None:
        await self._conns.discard(ref.id)
        await self._engine_remove(ref.handle.get("container") or container_name(ref.id))
        self._forget_removed(ref)

    def _forget_removed(self, ref: SandboxRef) -> None:
        """What is left of a sandbox once its container is gone: its run dir and its network."""
        _container.remove_run_dir(ref.id)
        if self.uses_egress:
            _container.release_network(ref.id)

    async def status(self, ref: SandboxRef) -> str:
        state, _ = await self._engine_state(ref.handle["container"])
        return state

    async def aclose(self) -> None:
        """Close the shared agent connections (the sandboxes keep running)."""
        conns = self.__dict__.get("_agent_conns")
        if conns is not None:
            await conns.aclose()


async def agent_write_file(connect: Callable[[], Awaitable[Any]], ref: SandboxRef, path: str,
                           data: bytes | AsyncIterator[bytes], mode: int = 0o644, **put_options: Any) -> int:
    """Write a file through the sandbox's agent (``connect()`` gives a connected client, closed here);
    ``put_options`` go to ``put_file`` (e.g. ``owner``). Errors name the file and the sandbox."""
    from ..spec import check_sandbox_path

    check_sandbox_path(path)
    client = await connect()
    try:
        return await client.put_file(path, data, mode=mode, make_parents=True, **put_options)
    except OSError as exc:
        raise _file_error(ref, path, exc) from None
    finally:
        await client.close()


async def agent_read_file(connect: Callable[[], Awaitable[Any]], ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
    """Stream a file from the sandbox's agent (see ``agent_write_file``)."""
    from ..spec import check_sandbox_path

    check_sandbox_path(path)
    client = await connect()
    try:
        async for chunk in client.get_file(path):
            yield chunk
    except OSError as exc:
        raise _file_error(ref, path, exc) from None
    finally:
        await client.close()


def _file_error(ref: SandboxRef, path: str, exc: OSError) -> Exception:
    from ..agent.protocol import AgentConnectionLost
    from ..errors import ValidationError

    where = f"{path} in sandbox {ref.spec.name or ref.id}"
    if isinstance(exc, AgentConnectionLost):
        return SandboxError(f"lost the sandbox's agent while transferring {where}")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"no such file: {where}")
    if isinstance(exc, IsADirectoryError):
        return ValidationError(f"{where} is a directory (cp copies single files)")
    if isinstance(exc, PermissionError):
        return ValidationError(f"permission denied: {where} (commands run as uid {ref.spec.policy.user})")
    return SandboxError(f"{where}: {exc.strerror or exc}")
