"""What the cluster backends (kubernetes, nomad) share as backend objects: their settings from
``[orchestrator]``, one API client per event loop (``_client``, made by the backend's ``_api``), and
background pool fills that ``aclose`` waits for."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from ..config import ORCHESTRATOR_KEYS, orchestrator_settings
from .base import Backend


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
