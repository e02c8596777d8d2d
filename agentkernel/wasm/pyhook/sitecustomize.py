# Preopened read-only as the WASI CPython's site-packages by agentkernel's wasm backend. wasi-libc starts
# every guest in "/"; this makes python3 start in the sandbox's working directory ($PWD), like the other
# backends (relative paths, `python3 script.py` and `import` of local modules work from the workdir).
import os as _os

_d = _os.environ.get("PWD")
if _d and _d != "/":
    try:
        _os.chdir(_d)
    except OSError:
        pass
del _os, _d
