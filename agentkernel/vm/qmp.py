"""A minimal asyncio client for QEMU's machine protocol (QMP) on a unix socket."""

from __future__ import annotations

import asyncio
import json

from ..errors import SandboxError


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> QMP:
        """Connect, retrying while the socket is not listening yet: QEMU binds the socket's path before it
        listens on it, so a connect that sees the path can still be refused (seen on a loaded host)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 22),
                                                        max(0.1, deadline - loop.time()))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.005)
        self = cls(reader, writer)
        greeting = await asyncio.wait_for(self._read(), timeout)
        if "QMP" not in greeting:
            writer.close()
            raise SandboxError(f"not a QMP greeting: {greeting}")
        await self.cmd("qmp_capabilities")
        return self

    @classmethod
    async def run(cls, path: str, *commands: str, timeout: float = 10.0) -> None:
        """Connect and run ``commands`` (no arguments) in one round trip: they are written together with
        ``qmp_capabilities`` at once, before QEMU's greeting is read (QMP reads them after greeting)."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=1 << 22), timeout)
        self = cls(reader, writer)
        try:
            writer.write(b"".join(json.dumps({"execute": c}).encode() + b"\n"
                                  for c in ("qmp_capabilities", *commands)))
            greeting = await asyncio.wait_for(self._read(), timeout)
            if "QMP" not in greeting:
                raise SandboxError(f"not a QMP greeting: {greeting}")
            for name in ("qmp_capabilities", *commands):
                while True:
                    reply = await asyncio.wait_for(self._read(), timeout)
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise SandboxError(f"QEMU {name}: {reply['error'].get('desc', reply['error'])}")
        finally:
            await self.close()

    async def _read(self) -> dict:
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("QEMU closed the QMP connection")
        return json.loads(line)

    async def cmd(self, name: str, **arguments) -> object:
        msg: dict = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        while True:
            reply = await self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise SandboxError(f"QEMU {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
