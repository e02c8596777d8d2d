"""Local images, built offline (no registry is reachable) and imported into the engines.

- ``agentkernel/busybox``: busybox-static plus a minimal /etc, a ``sandbox`` user (uid 1000),
  /workspace owned by it. 2 MB; builds in well under a second.
- ``agentkernel/debian``: ``debootstrap --variant=minbase bookworm`` plus python3, same user layout.
  ~40-90 s to build; the tarball is cached, so later runs only re-import when an engine lacks it.

Each image carries a label ``agentkernel.recipe=<hash of its recipe>``; an engine whose image has the
current recipe hash is left alone, so setup is idempotent and fast on the second run.

Command-based auto-detection (``image_for_command``) picks among these and a few well-known public
names, but only ones that exist locally.
"""

from __future__ import annotations

# candidate images per command name, in preference order
_PYTHON = ("agentkernel/debian", "python:3.12-slim", "python:3.12-alpine", "python:3", "python")
_NODE = ("node:22-alpine", "node:22", "node")
COMMAND_IMAGES: dict[str, tuple[str, ...]] = {
    "python": _PYTHON, "python3": _PYTHON, "pip": _PYTHON, "pip3": _PYTHON, "pytest": _PYTHON,
    "uv": _PYTHON, "node": _NODE, "npm": _NODE, "npx": _NODE,
    "apt-get": ("agentkernel/debian",), "bash": ("agentkernel/debian",),
    "perl": ("agentkernel/debian",),
}
DEFAULT_IMAGE = "agentkernel/busybox"
LOCAL_IMAGES = ("agentkernel/busybox", "agentkernel/debian")


def candidates_for_command(argv: list[str]) -> tuple[str, ...]:
    prog = argv[0].rsplit("/", 1)[-1] if argv else ""
    if prog in COMMAND_IMAGES:
        return COMMAND_IMAGES[prog]
    if prog.startswith("python3.") or prog.startswith("python2"):
        return _PYTHON
    return (DEFAULT_IMAGE,)
