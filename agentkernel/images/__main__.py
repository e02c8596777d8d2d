"""python -m agentkernel.images build-all [busybox|debian ...]"""

from __future__ import annotations

import sys

from ..errors import AgentKernelError, print_error
from .build import build_all


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build-all", "build"):
        print("usage: python -m agentkernel.images build-all [IMAGE ...]", file=sys.stderr)
        return 2
    try:
        build_all(argv[1:] or None)
    except AgentKernelError as exc:
        print_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
