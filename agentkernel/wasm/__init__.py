"""The Wasm sandbox runtime behind the ``wasm`` backend (wasmtime through its Python bindings).

- ``runtime``: engines, compiled modules, prepared (pre-instantiated) instances and one run of one
  instance: argv/env/stdin, output capture, epoch/fuel time limits, memory cap, exact exit codes.
- ``cache``: compiled modules cached on disk, keyed by the module's sha256 and the wasmtime version.
- ``pool``: ``InstancePool``, pre-instantiated use-once instances with a pop for ``acquire()``.
- ``shell``: the WASI shell ``aksh`` (source in ``wasm/shell/aksh.c``) and argv dispatch.
- ``python``: the ``python3`` runtimes (CPython for WASI, MicroPython).
- ``hyperlight``: the hardware-virtualization probe and the ``mode=hyperlight`` runner.
- ``fs``: host-side file access confined to a sandbox directory.

Nothing here imports ``wasmtime`` at import time: importing a module of this package stays cheap, and a
missing ``wasmtime`` surfaces as ``MissingExtra`` when something is actually run.
"""
