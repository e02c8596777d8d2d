"""What the cluster backends (kubernetes, nomad) share as backend objects: their settings from
``[orchestrator]``, one API client per event loop (``_client``, made by the backend's ``_api``),
background pool fills that ``aclose`` waits for, the one-user exec rule, and files as tar streams through
their exec."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

from ..config import ORCHESTRATOR_KEYS, orchestrator_settings
from ..errors import ValidationError
from . import _tarstream
from .base import Backend, ExecRequest, SandboxRef


class OrchestratorBackend(Backend):
    options_allowed: ClassVar[tuple[str, ...]] = tuple(ORCHESTRATOR_KEYS)

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.settings = orchestrator_settings(self.options, backend=self.name)
        self._client = None
        self._client_loop = None
        self._bg: set[asyncio.Task] = set()

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def aclose(self) -> None:
        if self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)
        if self._client is not None:
            if self._client_loop is asyncio.get_running_loop():
                await self._client.aclose()
            self._client = None

    def _check_exec_user(self, ref: SandboxRef, req: ExecRequest, runs_as: str) -> None:
        """Every command runs as the sandbox's user (``runs_as`` says whose: "the pod's", "the task's")."""
        if req.user and req.user != ref.spec.policy.user:
            raise ValidationError(f"the {self.name} backend runs every command as {runs_as} user "
                                  f"{ref.spec.policy.user}; cannot exec as {req.user}")

    async def write_file(self, ref: SandboxRef, path: str, data: bytes | AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        return await _tarstream.write_file(lambda r: self.exec(ref, r), path, data, mode)

    def read_file(self, ref: SandboxRef, path: str) -> AsyncIterator[bytes]:
        return _tarstream.read_file(lambda r: self.exec(ref, r), path)
