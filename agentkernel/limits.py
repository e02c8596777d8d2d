"""Process limits for the long-lived owners of many sandboxes (the daemon, ``serve``).

Each running sandbox holds descriptors in its owner (a persistent agent connection, an engine socket, a
pidfd): with a soft ``RLIMIT_NOFILE`` of 1024, the default on many hosts, a daemon with a few hundred
live sandboxes would hit EMFILE. An unprivileged process may raise its soft limit up to the hard one."""

from __future__ import annotations

import resource


def raise_open_files_limit() -> int:
    """Set the soft open-files limit to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):  # e.g. a hard limit above fs.nr_open
            pass
    return soft
