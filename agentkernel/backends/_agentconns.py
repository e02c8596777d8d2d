"""One persistent, multiplexed agent connection per sandbox, shared by the execs that run in it.

The agent serves any number of concurrent requests on one connection, each on its own stream
(docs/agent-protocol.md, section 2), so a running sandbox needs one connect + HELLO for its whole life
instead of one per exec. The table belongs to a backend object (the daemon's, ``serve``'s and each
in-process ``SandboxManager``'s), is keyed by sandbox id and bound to one event loop:

- ``get`` returns the live connection or opens one (one connect at a time per sandbox: concurrent
  first execs wait for it and share it);
- a connection that is lost (its agent exited: the sandbox was stopped or removed, by us or by anyone)
  leaves the table by itself, and its reader has already closed the socket;
- ``discard`` closes a sandbox's connection at once (the backend calls it on stop and remove), ``drop``
  forgets one that failed;
- used from another event loop (a process calling ``asyncio.run`` twice with one backend object), the
  table starts empty: the old loop's readers were cancelled when its ``asyncio.run`` ended, which closed
  their sockets.

A connection lost under a request that never reached the agent is the caller's to retry on a fresh
one (``AgentContainerBackend.exec``): a stale connection must never fail what a fresh one would run.
"""

from __future__ import annotations

import asyncio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..agent.client import AgentClient


# Connections kept for sandboxes nobody has used yet (the one that saw the agent come up, e.g. for each
# member of a warm pool) are capped: each costs an fd in this process. Connections in use are not.
MAX_IDLE_ADOPTED = 256


class AgentConns:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[str, AgentClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task] = set()

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        old_loop, old = self._loop, list(self._conns.values())
        self._loop, self._conns, self._locks = loop, {}, {}
        if old_loop is not None and old_loop.is_running():  # another thread's loop: close them there
            for c in old:
                old_loop.call_soon_threadsafe(lambda c=c: old_loop.create_task(c.close()))

    def __len__(self) -> int:
        return sum(1 for c in self._conns.values() if not c.closed)

    def peek(self, key: str) -> AgentClient | None:
        """The live connection for ``key``, if there is one (no connect)."""
        if self._loop is not asyncio.get_running_loop():
            return None
        c = self._conns.get(key)
        return c if c is not None and not c.closed else None

    async def get(self, key: str, connect: Callable[[], Awaitable[AgentClient]]) -> AgentClient:
        """The shared connection for ``key``: the live one, or a new one from ``connect()``."""
        self._bind()
        c = self._conns.get(key)
        if c is not None and not c.closed:
            return c
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            c = self._conns.get(key)
            if c is not None and not c.closed:
                return c
            c = await connect()
            self.adopt(key, c)
            return c

    def adopt(self, key: str, client: AgentClient, *, optional: bool = False) -> bool:
        """Make an open connection (e.g. the one that saw the agent come up) ``key``'s shared one. With
        ``optional``, not beyond MAX_IDLE_ADOPTED connections: then False, and the caller closes it."""
        self._bind()
        if optional and len(self) >= MAX_IDLE_ADOPTED:
            return False
        old = self._conns.get(key)
        self._conns[key] = client
        client.add_lost_callback(lambda c: self._forget(key, c))
        if old is not None and old is not client:
            self._close_soon(old)
        return True

    def _forget(self, key: str, client: AgentClient) -> None:
        if self._conns.get(key) is client:
            del self._conns[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]

    def drop(self, key: str, client: AgentClient) -> None:
        """``client`` failed: forget it (if it is still ``key``'s) and close it."""
        if self._loop is not asyncio.get_running_loop():
            return
        self._forget(key, client)
        self._close_soon(client)

    def _close_soon(self, client: AgentClient) -> None:
        t = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    async def discard(self, key: str) -> None:
        """Close ``key``'s connection now (its sandbox is being stopped or removed)."""
        if self._loop is not asyncio.get_running_loop():
            return
        c = self._conns.pop(key, None)
        self._locks.pop(key, None)
        if c is not None:
            await c.close()

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():
            conns, self._conns, self._locks = list(self._conns.values()), {}, {}
            await asyncio.gather(*(c.close() for c in conns), *list(self._closing), return_exceptions=True)


class _Lease:
    """One user's hold on a shared session: the client's API, and ``close`` releases the hold."""

    def __init__(self, sessions: PortSessions, key: str, entry: list) -> None:
        self._sessions, self._key, self._entry, self._released = sessions, key, entry, False

    def __getattr__(self, name: str):
        return getattr(self._entry[0], name)

    async def close(self) -> None:
        if not self._released:
            self._released = True
            await self._sessions._release(self._key, self._entry)


class PortSessions:
    """Sessions on an agent port that serves one host session at a time (QEMU's virtio-serial chardev:
    a second connection waits in the backlog until the first closes, and its HELLO resets the agent's
    session). Every user in this process shares the one open session, as concurrent streams, for as
    long as any of them needs it; the last one out closes it, so that another process can have the port.

    ``open`` returns a lease with the client's API; its ``close`` is the release. A session that was lost
    (the VM died) is not handed out again: the next ``open`` connects anew."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[str, list] = {}  # key -> [client, users]
        self._locks: dict[str, asyncio.Lock] = {}

    async def open(self, key: str, connect: Callable[[], Awaitable[AgentClient]]) -> _Lease:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another event loop: the old loop's sessions went with it
            self._loop, self._open, self._locks = loop, {}, {}
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._open.get(key)
            if entry is None or entry[0].closed:
                entry = self._open[key] = [await connect(), 0]
            entry[1] += 1
            return _Lease(self, key, entry)

    async def _release(self, key: str, entry: list) -> None:
        entry[1] -= 1
        if entry[1] > 0:
            return
        if self._open.get(key) is entry:
            del self._open[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
        await entry[0].close()

    def __len__(self) -> int:
        return len(self._open)
