"""tests/_gcguard.py: a failing test whose report would crash pytest on CPython 3.11 (a garbage collection
during the report's ast.parse whose finalizer parses too) is reported as a plain failure with the plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A finalizer that parses (as asyncio's "exception was never retrieved" log does, through the traceback's
# caret anchors), run by a collection during the report's own parse: a gc callback stands in for the
# finalizer so that the inner test does not depend on when the collector happens to run.
FAILING = textwrap.dedent('''
    import ast
    import gc
    import sys


    def parse_inside_the_reports_parse(phase, info):
        f = sys._getframe()
        while f is not None and f.f_code.co_name != "getstatementrange_ast":
            f = f.f_back
        if phase == "start" and f is not None:
            def deep(n):
                return deep(n - 1) if n else ast.parse("a[1] + b")
            deep(40)


    def test_fails():
        gc.callbacks.append(parse_inside_the_reports_parse)
        gc.set_threshold(20)
        assert 1 + 1 == 3
''')


def _pytest(tmp_path, *plugin: str) -> subprocess.CompletedProcess:
    path = tmp_path / "test_inner.py"
    path.write_text(FAILING)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_failure_report_survives_a_parsing_finalizer(tmp_path):
    r = _pytest(tmp_path, "-p", "tests._gcguard")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "INTERNALERROR" not in r.stdout and "assert 1 + 1 == 3" in r.stdout


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the ast recursion counter is fixed after 3.11")
def test_without_the_plugin_the_report_crashes(tmp_path):
    """The reason for the plugin: if this starts passing on our Python, the plugin can go."""
    r = _pytest(tmp_path)
    assert r.returncode == 3 and "AST constructor recursion depth mismatch" in r.stdout, r.stdout[-3000:]
