"""The HTTP API (``agentkernel serve``): FastAPI app in ``app.py``, the shared service in ``service.py``.

Importing this package imports nothing heavy; ``create_app`` pulls in FastAPI on first use."""

from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create

    return _create(*args, **kwargs)
