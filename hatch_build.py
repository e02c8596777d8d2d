"""Wheel build hook: ship the prebuilt static in-sandbox agent and the WASI shell inside the wheel, so
installing it (pip, pipx, uv tool) needs no compiler. Build them first: make -C agent && make -C wasm.

Editable installs (pip install -e) use the checkout's build/ directory directly and need nothing here.
"""

from __future__ import annotations

import os
import platform

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PREBUILT = {
    "build/ak-agent": "agentkernel/_prebuilt/ak-agent",
    "build/wasm/aksh.wasm": "agentkernel/_prebuilt/aksh.wasm",
}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        missing = [src for src in PREBUILT if not os.path.isfile(os.path.join(self.root, src))]
        if missing:
            raise RuntimeError(f"cannot build the wheel: {', '.join(missing)} missing "
                               "(build them first: make -C agent && make -C wasm)")
        for src, dst in PREBUILT.items():
            build_data["force_include"][os.path.join(self.root, src)] = dst
        # the agent is a static Linux executable: the wheel is for this architecture, any glibc/musl
        machine = platform.machine()
        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-manylinux2014_{machine}.musllinux_1_1_{machine}"
