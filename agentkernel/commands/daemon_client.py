"""The CLI side of the daemon protocol (fast path: no asyncio)."""

from __future__ import annotations

import os

from .. import paths


def try_run(spec, command: list[str], timeout: float | None) -> int | None:
    """Run through the daemon's warm pool; None when no daemon answers (the caller goes cold)."""
    if not os.path.exists(paths.daemon_socket()):
        return None
    return None
