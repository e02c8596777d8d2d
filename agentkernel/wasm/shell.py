"""The WASI shell ``aksh`` and the mapping from a command line to the module that runs it.

WASI has no fork/exec: a "command" in a Wasm sandbox is a built-in of a Wasm module. ``aksh`` (source:
``wasm/shell/aksh.c``, built by ``make -C wasm`` into ``build/wasm/aksh.wasm``) implements the commands an
agent uses on text (echo, cat, ls, printf, wc, head, tail, grep, ...) and a small ``sh -c`` language
(``;`` ``&&`` ``||`` ``|`` redirects, quotes, ``$VAR``, ``$(...)``). ``python3``/``python`` go to a
Python runtime (see ``python.py``); everything else goes to aksh, which answers unknown names with
``aksh: NAME: command not found`` and status 127.
"""

from __future__ import annotations

import os

from .. import paths
from ..errors import BackendUnavailable

SHELL_NAMES = frozenset({"sh", "bash", "aksh", "dash", "ash", "zsh"})
PYTHON_NAMES = frozenset({"python", "python3", "python3.12"})
MICROPYTHON_NAMES = frozenset({"micropython"})


def aksh_path() -> str:
    """Path of the built shell: $AGENTKERNEL_AKSH_WASM, <repo>/build/wasm/aksh.wasm, or the installed copy."""
    for cand in (
        os.environ.get("AGENTKERNEL_AKSH_WASM"),
        os.path.join(paths.repo_root(), "build", "wasm", "aksh.wasm"),
        paths.prebuilt("aksh.wasm"),
        "/usr/local/lib/agentkernel/aksh.wasm",
    ):
        if cand and os.path.isfile(cand):
            return cand
    raise BackendUnavailable(
        "the wasm shell (aksh.wasm) is not built, so commands cannot run on the wasm backend",
        hint="make -C wasm (needs: apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32), "
        "or bash scripts/setup.sh",
    )


def classify(argv: list[str]) -> str:
    """'python', 'micropython' or 'shell' for a command line (argv[0] may be a path like /usr/bin/python3)."""
    name = os.path.basename(argv[0])
    if name in PYTHON_NAMES:
        return "python"
    if name in MICROPYTHON_NAMES:
        return "micropython"
    return "shell"


def shell_argv(argv: list[str]) -> list[str]:
    """The argv aksh receives: unchanged except a path argv[0] of a shell becomes its name."""
    name = os.path.basename(argv[0])
    if name in SHELL_NAMES and name != argv[0]:
        return [name, *argv[1:]]
    return list(argv)
