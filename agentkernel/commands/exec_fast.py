"""``agentkernel exec`` fast path: straight to the sandbox agent's socket, no asyncio."""

from __future__ import annotations


def try_exec_fast(args, command: list[str]) -> int | None:
    """None when the fast path does not apply (the caller takes the general path)."""
    return None
