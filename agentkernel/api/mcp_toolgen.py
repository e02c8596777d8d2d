"""Generates ``mcp_tools.json`` (the tool list ``mcp_identity`` serves) from the argument models in
``api/mcp.py``: ``python -m agentkernel.api.mcp_toolgen --write`` after changing a model, ``--check`` to
compare. Its own module: it imports both, and neither imports it (no import cycle)."""

from __future__ import annotations

from . import mcp_identity
from .mcp import TOOLS


def generate() -> list[dict]:
    """The tool list from the argument models (imports pydantic and the API: not for the fast path)."""
    out = []
    for name, (model, desc) in TOOLS.items():
        schema = model.model_json_schema()
        schema.pop("title", None)
        schema["additionalProperties"] = False
        out.append({"name": name, "description": desc, "inputSchema": schema})
    return out


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    want = generate()
    if args == ["--write"]:
        with open(mcp_identity.TOOLS_FILE, "w", encoding="utf-8") as f:
            json.dump(want, f, indent=1, sort_keys=True)
            f.write("\n")
        return 0
    if args == ["--check"]:
        if mcp_identity.tools() != want:
            print(f"{mcp_identity.TOOLS_FILE} is out of date: python -m agentkernel.api.mcp_toolgen --write",
                  file=sys.stderr)
            return 1
        return 0
    print("usage: python -m agentkernel.api.mcp_toolgen --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
