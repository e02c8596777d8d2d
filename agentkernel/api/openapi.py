"""Generate the committed OpenAPI document from the code:

    python -m agentkernel.api.openapi            # write docs/openapi.json
    python -m agentkernel.api.openapi --check    # exit 1 if docs/openapi.json is stale

tests/api/test_api_openapi.py runs the check, so a route or model change without a regenerated
document fails the suite.
"""

from __future__ import annotations

import json
import os
import sys

from .. import paths

DOC = os.path.join(paths.repo_root(), "docs", "openapi.json")


def document() -> dict:
    from .app import Settings, create_app

    app = create_app(Settings(mcp=False, with_daemon=False))
    return app.openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        try:
            with open(DOC, encoding="utf-8") as f:
                current = f.read()
        except OSError:
            current = ""
        if current != text:
            sys.stderr.write(f"{DOC} is stale: run python -m agentkernel.api.openapi\n")
            return 1
        return 0
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
