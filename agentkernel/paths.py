"""Where agentkernel keeps things. Every location can be overridden by an environment variable.

- data dir (durable: SQLite store, audit log, caches): $AGENTKERNEL_HOME, else $XDG_DATA_HOME/agentkernel,
  else ~/.local/share/agentkernel
- runtime dir (volatile: daemon socket, ownership journal, per-sandbox sockets): $AGENTKERNEL_RUNTIME_DIR,
  else /run/agentkernel for root, else $XDG_RUNTIME_DIR/agentkernel, else <data dir>/run
"""

from __future__ import annotations

import os

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_made: set[str] = set()  # data dirs this process already created (the audit log asks on every event)


def data_dir() -> str:
    d = os.environ.get("AGENTKERNEL_HOME")
    if not d:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        d = os.path.join(base, "agentkernel")
    if d not in _made:
        os.makedirs(d, mode=0o700, exist_ok=True)
        _made.add(d)
    return d


def runtime_dir() -> str:
    d = os.environ.get("AGENTKERNEL_RUNTIME_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/run/agentkernel"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "agentkernel")
        else:
            d = os.path.join(data_dir(), "run")
    if d not in _made:  # every journal entry, socket and bundle path asks: one makedirs per process
        os.makedirs(d, mode=0o700, exist_ok=True)
        _made.add(d)
    return d


def journal_path() -> str:
    """The ownership journal's directory (``owner.py``), absolute: resources' labels name it."""
    return os.path.abspath(os.path.join(runtime_dir(), "owned"))


def store_path() -> str:
    return os.environ.get("AGENTKERNEL_STORE") or os.path.join(data_dir(), "state.db")


def audit_path() -> str:
    return os.environ.get("AGENTKERNEL_AUDIT_LOG") or os.path.join(data_dir(), "audit.jsonl")


_configured_daemon_socket: str | None = None


def configure_daemon_socket(path: str | None) -> None:
    """The config file's ``[daemon] socket`` (``config.load_config`` calls this): every command of this
    process that talks to or serves the daemon then uses it, unless AGENTKERNEL_DAEMON_SOCKET is set."""
    global _configured_daemon_socket
    _configured_daemon_socket = path


def daemon_socket() -> str:
    return (os.environ.get("AGENTKERNEL_DAEMON_SOCKET") or _configured_daemon_socket
            or os.path.join(runtime_dir(), "daemon.sock"))


def cache_dir() -> str:
    d = os.environ.get("AGENTKERNEL_CACHE") or (
        "/var/cache/agentkernel" if os.geteuid() == 0 else os.path.join(data_dir(), "cache")
    )
    os.makedirs(d, exist_ok=True)
    return d


def repo_root() -> str:
    """The source checkout (for development installs: agent binary, seccomp profiles, wasm sources)."""
    return _REPO_ROOT


def prebuilt(name: str) -> str:
    """A binary shipped inside the wheel (hatch_build.py): agentkernel/_prebuilt/NAME."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_prebuilt", name)


_AGENT_FILE: list = [None, b""]  # [(path, inode, size, mtime) of the agent read last, its content]


def agent_with(marker: bytes) -> str | None:
    """``agent_binary()`` when that build has a feature (its usage text ``marker`` is in the file: the
    host-side subcommands ``spawn-runtime`` and ``watch-owner``), else None (no agent, disabled with
    AGENTKERNEL_AGENT_BIN=none, or an older build). The file (~100 KB) is read once per binary version
    (path, inode, size, mtime) in a process."""
    agent = agent_binary()
    if agent is None:
        return None
    try:
        st = os.stat(agent)
    except OSError:
        return None
    key = (agent, st.st_ino, st.st_size, st.st_mtime_ns)
    if _AGENT_FILE[0] != key:
        try:
            with open(agent, "rb") as f:
                _AGENT_FILE[1] = f.read()
        except OSError:
            return None
        _AGENT_FILE[0] = key
    return agent if marker in _AGENT_FILE[1] else None


def agent_binary() -> str | None:
    """The static in-sandbox agent: $AGENTKERNEL_AGENT_BIN, else <repo>/build/ak-agent.
    AGENTKERNEL_AGENT_BIN=none runs without it (engine exec, no exact status file)."""
    if os.environ.get("AGENTKERNEL_AGENT_BIN") == "none":
        return None
    for cand in (
        os.environ.get("AGENTKERNEL_AGENT_BIN"),
        os.path.join(_REPO_ROOT, "build", "ak-agent"),
        prebuilt("ak-agent"),  # a wheel's packaged copy (hatch_build.py)
        os.path.join(_REPO_ROOT, "agentkernel", "agent", "bin", "ak-agent"),
        "/usr/local/lib/agentkernel/ak-agent",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None
