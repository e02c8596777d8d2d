"""The in-sandbox agent: protocol (docs/agent-protocol.md), host-side clients and transports.

Light on purpose: importing ``agentkernel.agent`` imports nothing (the names below come from the
protocol module on first use: the CLI's warm path imports only ``agent.wire``). The asyncio client
(``agentkernel.agent.client``), the blocking client (``agentkernel.agent.sync_client``) and the
transports (``agentkernel.agent.transport``) are imported by whoever needs them. The host's agent binary
is found by ``agentkernel.paths.agent_binary`` (one place, one environment variable).
"""

from __future__ import annotations

__all__ = [
    "AgentConnectionLost",
    "AgentError",
    "AgentExecResult",
    "AgentInfo",
    "AgentProtocolError",
    "ExitStatus",
    "StatResult",
    "exit_code_for",
]


def __getattr__(name: str):
    if name in __all__:
        from . import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
