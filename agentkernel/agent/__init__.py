"""The in-sandbox agent: protocol (docs/agent-protocol.md), host-side clients and transports.

Light on purpose: importing ``agentkernel.agent`` pulls in only the protocol module. The asyncio client
(``agentkernel.agent.client``), the blocking client (``agentkernel.agent.sync_client``) and the
transports (``agentkernel.agent.transport``) are imported by whoever needs them. The host's agent binary
is found by ``agentkernel.paths.agent_binary`` (one place, one environment variable).
"""

from __future__ import annotations

from .protocol import (
    AgentConnectionLost,
    AgentError,
    AgentExecResult,
    AgentInfo,
    AgentProtocolError,
    ExitStatus,
    StatResult,
    exit_code_for,
)

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
