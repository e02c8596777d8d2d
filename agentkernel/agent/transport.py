"""Byte-stream transports to an agent.

A transport gives a connected byte stream that speaks the agent protocol:

- ``await t.connect()`` -> (asyncio.StreamReader, asyncio.StreamWriter) for ``AgentClient``
- ``t.connect_sync()`` -> a connected ``socket.socket`` or a ``(rfd, wfd)`` pair for ``SyncAgentClient``
- ``t.close()`` / ``await t.aclose()`` release what the transport itself owns (e.g. a helper process).

asyncio and subprocess are imported inside the methods that need them, so importing this module stays
cheap for the CLI fast path.
"""

from __future__ import annotations

import os
import socket


class Transport:
    """Base class. Subclasses implement ``connect`` and ``connect_sync``."""

    async def connect(self):
        raise NotImplementedError

    def connect_sync(self):
        raise NotImplementedError

    def close(self) -> None:
        """Release resources owned by the transport (not the stream: clients close that)."""

    async def aclose(self) -> None:
        self.close()

    def describe(self) -> str:
        return type(self).__name__


class UnixSocketTransport(Transport):
    """The agent listens on a unix socket (``ak-agent serve --listen PATH``), usually bind-mounted from
    the host. Every connect() opens a new, independent connection."""

    def __init__(self, path: str, *, connect_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.connect_timeout = connect_timeout

    async def connect(self):
        import asyncio

        from ..safefs import socket_path  # never through a link the sandbox planted at the socket's name

        with socket_path(self.path) as path:
            return await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 20),
                                          self.connect_timeout)

    def connect_sync(self) -> socket.socket:
        from ..safefs import socket_path

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.connect_timeout)
            with socket_path(self.path) as path:
                s.connect(path)
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return s

    def describe(self) -> str:
        return f"unix:{self.path}"


class StdioProcessTransport(Transport):
    """Spawn a command whose stdin/stdout speak the protocol, e.g.
    ``["podman", "exec", "-i", CTR, "/.ak/ak-agent", "serve", "--stdio"]`` or a container started with
    ``podman run -i ... ak-agent serve --stdio``. One process = one connection; closing our end of its
    stdin makes the agent exit, which ends the process."""

    def __init__(self, argv, *, stderr=None, env=None) -> None:
        self.argv = list(argv)
        self.stderr = stderr  # None: inherit; or a file object / fd / subprocess.DEVNULL
        self.env = env
        self.proc = None  # asyncio.subprocess.Process or subprocess.Popen

    async def connect(self):
        import asyncio

        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.stderr,
            env=self.env, limit=1 << 20)
        return self.proc.stdout, self.proc.stdin

    def connect_sync(self) -> tuple[int, int]:
        import subprocess

        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=self.env, bufsize=0)
        return self.proc.stdout.fileno(), self.proc.stdin.fileno()

    def close(self, timeout: float = 2.0) -> None:
        p = self.proc
        if p is None or hasattr(p, "_transport"):  # asyncio process: use aclose()
            return
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            p.wait(timeout)
        except Exception:
            p.kill()
            p.wait()

    async def aclose(self, timeout: float = 2.0) -> None:
        import asyncio

        p = self.proc
        if p is None:
            return
        if not hasattr(p, "_transport"):
            self.close(timeout)
            return
        try:
            if p.stdin and not p.stdin.is_closing():
                p.stdin.close()
        except Exception:
            pass
        try:
            await asyncio.wait_for(p.wait(), timeout)
        except (TimeoutError, ProcessLookupError):
            try:
                p.kill()
            except ProcessLookupError:
                pass
            await p.wait()

    def describe(self) -> str:
        return "stdio:" + " ".join(self.argv)
