"""``agentkernel daemon start|stop|status``."""

from __future__ import annotations

from ..errors import AgentKernelError


def daemon_cmd(args) -> int:
    raise AgentKernelError("the daemon is not built yet")
