"""The CLI's hot paths import nothing from a deny-list (deterministic: the interpreter's own import log,
not a timing). The one-shot path of every container backend, the daemon's warm path (lease) and the
exec fast path are each run for real, through the installed launcher's exact start-up (python -S, two
sys.path entries), with ``-X importtime``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import pytest

from tests.conftest import ak, require_backend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = sysconfig.get_paths()["purelib"]

# Start-up work that must never come back on these paths (each costs 1-30 ms of imports).
DENY = frozenset({
    "asyncio", "json", "subprocess", "typing", "argparse", "h11", "enum", "re", "threading", "hashlib",
    "shutil", "selectors", "socket", "signal", "logging", "tomllib", "dataclasses", "inspect", "uuid",
    "pydantic", "fastapi", "starlette", "uvicorn", "anyio", "wasmtime", "sqlite3", "_sqlite3",
})
# A runtime dir of our own: another test's SIGKILLed owner in the shared journal would make the next command
# reap it (which legitimately imports asyncio), and that is not what these tests measure.
_RUNTIME = tempfile.mkdtemp(prefix="ak-hotpath-")
LAUNCHER = ("import sys; sys.path[0] = {repo!r}; sys.path.append({site!r}); from agentkernel.cli import entry; "
            "entry()")


# The daemon's warm path (a lease) is the tightest budget: not even these (~0.3 ms each; importlib pulls
# in warnings) come back there, nor, on a repeat run, the spec resolution (a cached resolution:
# agentkernel/resolvedspec.py): the config file's parser, the spec classes, the image selection.
# Nor what only an error or an unusual ending needs (the error classes, the outcome renderer's notes, the
# agent protocol beyond its framing and exec codec: agent.wire).
WARM_DENY = frozenset({"importlib", "types", "warnings", "functools", "collections", "tomllib",
                       "agentkernel.config", "agentkernel.spec", "agentkernel._model", "agentkernel.imagesel",
                       "agentkernel.images.settings", "agentkernel.refconfig", "agentkernel.images",
                       "agentkernel.images.pull", "agentkernel.backends", "agentkernel.backends.auto",
                       "agentkernel.oci", "agentkernel.oci.rootfs", "agentkernel.enginestore", "agentkernel.diskquota",
                       "agentkernel._fastjson", "agentkernel.errors", "agentkernel.outcome",
                       "agentkernel.agent.protocol"})


def imported(*args: str, env: dict | None = None, allow: frozenset[str] = frozenset(),
             extra: frozenset[str] = frozenset()) -> set[str]:
    """Run the CLI as the launcher does; return the deny-listed top-level modules it imported."""
    e = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_RUNTIME_DIR": _RUNTIME, **(env or {})}
    e.pop("PYTHONPATH", None)  # the launcher sets sys.path itself
    code = LAUNCHER.format(repo=REPO, site=SITE)
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", code, *args], capture_output=True,
                       env=e, timeout=120, stdin=subprocess.DEVNULL)
    lines = r.stderr.decode(errors="replace").splitlines()
    assert r.returncode == 0, "\n".join(line for line in lines if not line.startswith("import time"))[-2000:]
    mods = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    deny = (DENY | extra) - allow
    return {m for m in mods if m.split(".")[0] in deny or m in deny}


@pytest.mark.parametrize("backend", ["oci", "podman", "docker", "gvisor", "gvisor-docker"])
def test_one_shot_path_imports_nothing_denied(backend, tmp_path):
    """Independent of what ran before: a cache of its own (the shared one is rewritten by every test and
    engineer that touches an image store: tests/images, pulls, builds), filled by a first run, whose
    writes must leave the next run nothing to parse. A run that found the engines' image stores changed
    meanwhile (by another process: the machine is shared) had to re-resolve its image, so it is retried."""
    from agentkernel.oci.rootfs import _index_stamps

    require_backend(backend)
    env = {"AGENTKERNEL_CACHE": str(tmp_path / "cache")}
    for _ in range(3):
        stamps = _index_stamps()
        imported("run", "-B", backend, "--", "true", env=env)  # first use: fills the image/rootfs caches
        got = imported("run", "-B", backend, "--", "true", env=env)
        if not got or _index_stamps() == stamps:
            break
    assert got == set()


@pytest.fixture(scope="module")
def warm_daemon(tmp_path_factory):
    require_backend("oci")
    sock = str(tmp_path_factory.mktemp("d") / "d.sock")
    env = {"AGENTKERNEL_DAEMON_SOCKET": sock, "AGENTKERNEL_NO_DAEMON": ""}
    r = ak("daemon", "start", "--warm", "oci", "--pool-min", "1", env=env)
    assert r.returncode == 0, r
    yield env
    ak("daemon", "stop", env=env)


def _repeat_run_imports(*args: str, env: dict) -> set[str]:
    """A repeat run's denied imports. The first run resolves (and caches) the spec; a run that found the
    host changed meanwhile (the shared engines' image indexes, the auto backend's choice re-probed after
    an engine restart: the machine is shared) resolved again, so it is retried."""
    imported(*args, env=env)
    for _ in range(3):
        got = imported(*args, env=env, extra=WARM_DENY)
        if not got:
            break
    return got


def test_warm_path_imports_nothing_denied(warm_daemon):
    assert _repeat_run_imports("run", "-B", "oci", "--", "true", env=warm_daemon) == set()
    # the default backend (auto): its choice is re-checked, not re-made
    assert _repeat_run_imports("run", "--", "true", env=warm_daemon) == set()
    st = json.loads(ak("daemon", "status", "--json", env=warm_daemon).stdout)
    assert st["runs"] >= 1  # it really went through the daemon


def test_exec_fast_path_imports_nothing_denied():
    require_backend("oci")
    name = f"hot{os.getpid()}"
    r = ak("create", "-B", "oci", "--start", name)
    assert r.returncode == 0, r
    try:
        # the store is SQLite: the exec fast path reads it (allowed there, nowhere else)
        assert imported("exec", name, "--", "true", allow=frozenset({"sqlite3", "_sqlite3"})) == set()
    finally:
        ak("rm", name)


def test_qemu_one_shot_path_imports_no_asyncio():
    """The qemu one-shot restores a VM and speaks QMP and the agent over blocking sockets: it may use the
    stdlib's process, socket and JSON modules (a VM start needs them), never asyncio or the server stack."""
    require_backend("qemu")
    vm_needs = frozenset({"json", "subprocess", "hashlib", "shutil", "socket", "signal", "enum", "re",
                          "selectors", "threading"})
    imported("run", "-B", "qemu", "--", "true")  # first use: the guest image and its snapshot template
    assert imported("run", "-B", "qemu", "--", "true", allow=vm_needs) == set()
