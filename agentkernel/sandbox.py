"""In-process Python API: sandboxes driven directly through the backends (no HTTP, no server).

    from agentkernel import Sandbox

    async with Sandbox(image="agentkernel/debian") as sb:          # created + started; removed on exit
        r = await sb.exec(["python3", "-c", "print(1)"], timeout=10)
        r.exit_code, r.stdout, r.stderr                             # exact; bytes, separate streams
        await sb.write_file("/tmp/x", b"data")
        data = await sb.read_file("/tmp/x")

    r = await Sandbox.run(["echo", "hi"])                           # one-shot: fresh sandbox, destroyed

A ``Sandbox`` is a named sandbox in the store (``agentkernel list`` shows it while it lives), owned by
the local user like the CLI's; pass ``keep=True`` to leave it running after the ``async with``, and
``Sandbox.open(name)`` to drive one that already exists. Results are ``backends.base.ExecResult``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from .backends.base import ExecRequest, ExecResult, OutputCallback


class Sandbox:
    def __init__(self, name: str | None = None, *, image: str | None = None, backend: str | None = None,
                 profile: str | None = None, network: bool | None = None, memory_mb: int | None = None,
                 vcpus: float | None = None, pids: int | None = None, disk_mb: int | None = None,
                 read_only: bool | None = None, env: dict[str, str] | None = None, workdir: str | None = None,
                 options: dict[str, str] | None = None, keep: bool = False, tenant: str = "local",
                 config: dict | None = None, allow_hosts: list[str] | None = None,
                 block_hosts: list[str] | None = None, secrets: list[str] | None = None,
                 tls_intercept: bool | None = None) -> None:
        """``network``: False/"none", True/"open" or "allowlist"; ``allow_hosts`` (HOST[:PORT], *.DOMAIN,
        CIDR[:PORT]) implies allowlist; ``secrets``: "NAME:HOST[:HEADER]" bindings (docs/network.md)."""
        self.name = name or f"sb-{os.urandom(5).hex()}"
        self._flags = {"image": image, "backend": backend, "profile": profile, "network": network,
                       "memory_mb": memory_mb, "vcpus": vcpus, "pids": pids, "disk_mb": disk_mb,
                       "read_only": read_only, "env": env, "workdir": workdir, "options": options,
                       "name": self.name, "allow_host": list(allow_hosts) if allow_hosts else None,
                       "block_host": list(block_hosts) if block_hosts else None,
                       "secret": list(secrets) if secrets else None, "tls_intercept": tls_intercept}
        self.keep = keep
        self.tenant = tenant
        self._config = config
        self._mgr = None
        self._created = False

    def _manager(self):
        if self._mgr is None:
            from .manager import SandboxManager

            self._mgr = SandboxManager()
        return self._mgr

    @staticmethod
    def _resolve(flags: dict[str, Any], config: dict | None, argv: list[str] | None = None):
        import os

        from . import config as cfgmod

        cfg = config if config is not None else cfgmod.load_config(cfgmod.find_config(None, os.getcwd()))
        from .imagesel import resolve_for_command

        return resolve_for_command({k: v for k, v in flags.items() if v is not None}, argv, config=cfg,
                                         progress=False)

    # -- lifecycle --
    async def create(self, *, start: bool = True) -> Sandbox:
        import asyncio

        spec = await asyncio.to_thread(self._resolve, self._flags, self._config)  # may pull: off the loop
        await self._manager().create(spec, start=start, tenant=self.tenant)
        self._created = True
        return self

    @classmethod
    async def open(cls, name: str, *, tenant: str = "local") -> Sandbox:
        """An existing named sandbox (not removed on exit unless ``keep`` is set to False)."""
        sb = cls(name, keep=True, tenant=tenant)
        sb._manager().get(name, tenant)
        sb._created = True
        return sb

    async def __aenter__(self) -> Sandbox:
        if not self._created:
            await self.create()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            if self._created and not self.keep:
                from .errors import NotFound

                try:
                    await self._manager().remove(self.name, self.tenant)
                except NotFound:
                    pass
                self._created = False
        finally:
            if self._mgr is not None:
                await self._mgr.aclose()
                self._mgr = None

    async def start(self) -> None:
        await self._manager().start(self.name, self.tenant)

    async def stop(self) -> None:
        await self._manager().stop(self.name, self.tenant)

    async def remove(self) -> None:
        await self._manager().remove(self.name, self.tenant)
        self._created = False

    async def status(self) -> str:
        return await self._manager().status(self.name, self.tenant)

    # -- commands and files --
    async def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   timeout: float | None = None, stdin: bytes | AsyncIterator[bytes] | None = None,
                   on_output: OutputCallback | None = None, output_limit: int | None = None) -> ExecResult:
        kw = {"output_limit": output_limit} if output_limit is not None else {}
        req = ExecRequest(argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin, on_output=on_output, **kw)
        return await self._manager().exec(self.name, req, self.tenant)

    async def write_file(self, path: str, data: bytes | str | AsyncIterator[bytes], mode: int = 0o644) -> int:
        if isinstance(data, str):
            data = data.encode()
        return await self._manager().write_file(self.name, path, data, mode, self.tenant)

    def iter_file(self, path: str) -> AsyncIterator[bytes]:
        return self._manager().read_file(self.name, path, self.tenant)

    async def read_file(self, path: str) -> bytes:
        return b"".join([c async for c in self.iter_file(path)])

    # -- one-shot --
    @classmethod
    async def run(cls, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                  timeout: float | None = None, stdin: bytes | None = None, on_output: OutputCallback | None = None,
                  config: dict | None = None, **spec_flags: Any) -> ExecResult:
        """One command in a fresh sandbox, destroyed afterwards (owned by this process meanwhile)."""
        import asyncio

        from .manager import SandboxManager

        spec = await asyncio.to_thread(cls._resolve, spec_flags, config, argv)  # may pull: off the loop
        mgr = SandboxManager()
        try:
            return await mgr.run(spec, ExecRequest(argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                                                   on_output=on_output))
        finally:
            await mgr.aclose()
