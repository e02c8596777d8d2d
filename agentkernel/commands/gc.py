"""``agentkernel gc``: a full scan of every engine for agentkernel resources whose owner is provably
dead (``agentkernel.reap``)."""

from __future__ import annotations

import asyncio

from ..reap import reap


def gc(args) -> int:
    removed = asyncio.run(reap(args.dry_run))
    verb = "would remove" if args.dry_run else "removed"
    for r in removed:
        print(f"{verb} {r}")
    if not removed:
        print("nothing to remove")
    return 0
