"""The in-sandbox agent: protocol (docs/agent-protocol.md), host-side clients and transports.

Light on purpose: importing ``agentkernel.agent`` pulls in only the protocol module. The asyncio client
(``agentkernel.agent.client``), the blocking client (``agentkernel.agent.sync_client``) and the
transports (``agentkernel.agent.transport``) are imported by whoever needs them.
"""

from __future__ import annotations

import os

from .protocol import (
    AgentConnectionLost,
    AgentError,
    AgentInfo,
    ExecResult,
    ExitStatus,
    ProtocolError,
    StatResult,
    exit_code_for,
)

AGENT_GUEST_PATH = "/.ak/ak-agent"  # where backends mount the agent binary inside a sandbox

__all__ = [
    "AGENT_GUEST_PATH",
    "AgentConnectionLost",
    "AgentError",
    "AgentInfo",
    "ExecResult",
    "ExitStatus",
    "ProtocolError",
    "StatResult",
    "agent_binary",
    "exit_code_for",
]


def agent_binary() -> str:
    """Path of the static agent binary on the host: $AGENTKERNEL_AGENT_BINARY, else <repo>/build/ak-agent,
    else a copy shipped inside the package (agentkernel/agent/bin/ak-agent)."""
    env = os.environ.get("AGENTKERNEL_AGENT_BINARY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(os.path.dirname(here)), "build", "ak-agent"),
                 os.path.join(here, "bin", "ak-agent")):
        if os.path.exists(cand):
            return cand
    raise FileNotFoundError("ak-agent binary not found: run `make -C agent` in the source checkout "
                            "or set AGENTKERNEL_AGENT_BINARY")

