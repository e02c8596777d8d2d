"""Reuse of a one-shot run's resolution for identical requests, for a few seconds.

Turning a ``/run`` request into a ``SandboxSpec`` (the caller's policy, the backend ``auto`` stands for,
the config, the image chosen for the command, the policy's confinement) and making sure its image is
present costs several milliseconds of the event loop per request (file reads, stats, the image store):
a large share of what ``serve`` spends outside the engine at tens of runs per second. Agents repeat the
same requests, so both are kept for ``TTL_S`` seconds, keyed by everything the resolution reads from the
request (tenant, argv, image, profile, backend, network fields).

What the resolution reads outside the request is part of the key or invalidates the cache when it
changes: the caller's policy (its value, so a policy changed in place or replaced counts), the service's
config (its value), the config file the server finds (path, size, mtime, inode: what
``images.settings.load_user_config`` reads for the pull policy) and the ``AGENTKERNEL_*`` environment
variables (image, backend, profile, pull policy, registry, config path...). Everything else (images added
or removed, the host's backends) is bounded by the TTL. Errors are never cached: a refused request is
resolved again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from typing import Any

from ..config import CONFIG_FILENAME

TTL_S = 2.0
MAX_ENTRIES = 256


def config_stamp() -> tuple:
    """What identifies the config file the server finds now, and the environment that overrides it."""
    environ = os.environ  # keys first, values only of ours: ~3x cheaper than items() (twice per /run)
    env = tuple(sorted((k, environ[k]) for k in environ if k.startswith("AGENTKERNEL_")))
    path = os.environ.get("AGENTKERNEL_CONFIG") or CONFIG_FILENAME  # relative: the server's directory
    try:
        st = os.stat(path)
    except OSError:
        return env, None
    return env, (path, st.st_size, st.st_mtime_ns, st.st_ino)


class SpecCache:
    """A small TTL cache of values made from a request, emptied when ``stamp()`` or the values a caller
    passes as ``depends`` change."""

    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 stamp: Callable[[], Hashable] = config_stamp, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._stamp, self._clock = stamp, clock
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._seen: tuple | None = None
        self.hits = self.misses = 0

    def _check(self, depends: Hashable) -> None:
        seen = (depends, self._stamp())
        if seen != self._seen:
            self._entries.clear()
            self._seen = seen

    def get(self, key: Hashable, make: Callable[[], Any], depends: Hashable = ()) -> Any:
        """The value for ``key``: the one made within the last ``ttl_s`` seconds under the same stamp and
        ``depends``, else ``make()`` (whose exceptions propagate, nothing cached)."""
        self._check(depends)
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            self.hits += 1
            return hit[1]
        self.misses += 1
        value = make()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[key] = (now + self.ttl_s, value)
        return value


def freeze(value: Any) -> Hashable:
    """A hashable form of request values (lists and dicts of plain data)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value
