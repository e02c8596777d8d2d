"""The HTTP API (``agentkernel serve``) and the MCP server: the app's assembly in ``app.py``, its routes in
``routes/``, the request guard in ``guard.py``, the MCP server in ``mcp.py``, and the ``Service`` they
share (one daemon, one manager, the policy for remote callers: ``service.py``, ``policy.py``).

Importing this package imports nothing heavy; ``create_app`` pulls in FastAPI on first use."""

from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create

    return _create(*args, **kwargs)
