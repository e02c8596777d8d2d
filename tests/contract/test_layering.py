"""The package's structure, checked: no import cycles among agentkernel modules, the layering rule
(ruff's banned-api, configured in pyproject.toml) holds, and the CLI's hot paths import nothing heavy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(REPO, "agentkernel")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(mod: str, path: str, known: dict[str, str]) -> set[str]:
    """Modules ``mod`` imports anywhere (module level and inside functions: a lazy import is still a
    dependency), except under ``if TYPE_CHECKING``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    found.add(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base[: len(base) - node.level + 1]
                    target = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:  # `from . import x`: submodule x, or a name from the package itself
                    if f"{target}.{a.name}" in known:
                        found.add(f"{target}.{a.name}")
                    else:
                        found.add(target)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        visit([n for n in sub if isinstance(n, ast.AST)])

    visit(tree.body)
    out = set()
    for name in found:
        while name and name not in known:  # a name inside a module -> that module
            name = name.rpartition(".")[0]
        if name and name != mod:
            out.add(name)
    return out


def import_cycles() -> list[list[str]]:
    known = _modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    # Tarjan's strongly connected components: every component with more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return comps


def test_no_import_cycles():
    assert import_cycles() == []


def test_layering_rule_is_enforced_by_ruff(tmp_path):
    """A lower-layer module importing the CLI or a command fails ``ruff check`` (TID251)."""
    probe = os.path.join(PKG, "daemon", "_layering_probe.py")
    with open(probe, "w") as f:
        f.write("from ..commands.gc import gc\nfrom .. import cli\n")
    try:
        r = subprocess.run([os.path.join(REPO, ".venv", "bin", "ruff"), "check", "--no-cache", probe],
                           capture_output=True, text=True, cwd=REPO)
    finally:
        os.unlink(probe)
    assert r.returncode != 0 and r.stdout.count("TID251") == 2, r.stdout


def test_the_package_is_ruff_clean():
    r = subprocess.run([os.path.join(REPO, ".venv", "bin", "ruff"), "check", "--no-cache", "agentkernel"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:]
