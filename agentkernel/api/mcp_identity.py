"""What the MCP server says about itself, for every transport: its name, version and instructions, the
protocol versions it negotiates through ``initialize``, its capabilities and its tools (name, description,
input schema). Standard library only: the stdio fast path (``mcp_stdio``) answers the handshake and
``tools/list`` from here before the MCP SDK and pydantic are imported, and ``mcp.build_server`` (stdio and
streamable HTTP) advertises the same.

The tool list is ``mcp_tools.json`` beside this file, generated from the argument models in ``api/mcp.py``
(the ones that validate calls): ``python -m agentkernel.api.mcp_toolgen --write`` after changing a model;
``--check`` (and the tests) fail while the file and the models disagree.
"""

from __future__ import annotations

import os

NAME = "agentkernel"
INSTRUCTIONS = "Run untrusted commands in isolated sandboxes."
# the revisions reachable through the initialize handshake (the SDK's HANDSHAKE_PROTOCOL_VERSIONS; a test
# keeps them equal): a client asking for another one gets the newest
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
CAPABILITIES = {"tools": {"listChanged": False}}
TOOLS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mcp_tools.json")

_tools: list[dict] | None = None


def version() -> str:
    from .. import __version__

    return __version__


def negotiate(requested: object) -> str:
    return requested if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]


def initialize_result(requested: object) -> dict:
    """The ``initialize`` result for a client asking for protocol revision ``requested``."""
    return {"capabilities": CAPABILITIES, "instructions": INSTRUCTIONS, "protocolVersion": negotiate(requested),
            "serverInfo": {"name": NAME, "version": version()}}


def tools() -> list[dict]:
    """The advertised tools: ``[{"name", "description", "inputSchema"}]`` (the wire form of ``tools/list``)."""
    global _tools
    if _tools is None:
        from .._fastjson import loads  # not json: it imports re (~25 ms here)

        with open(TOOLS_FILE, "rb") as f:
            _tools = loads(f.read())
    return _tools
