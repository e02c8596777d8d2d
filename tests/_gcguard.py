"""pytest plugin (loaded by tests/conftest.py): a failing test's report is built with the garbage
collector paused.

A failure's report parses the test's source with ``ast.parse``. On CPython 3.11 (Debian 12's), a garbage
collection during that parse whose finalizers parse too (asyncio logging a "Future exception was never
retrieved" traceback: its caret anchors use ``ast.parse``) corrupts the ast module's shared recursion
counter: ``SystemError: AST constructor recursion depth mismatch``, an INTERNALERROR that ends the whole
session and hides the failure. So: collect first, then build the report with the collector off.
tests/test_gcguard.py shows the crash without this plugin and the plain failure with it."""

from __future__ import annotations

import gc

import pytest


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    paused = call.excinfo is not None and gc.isenabled()
    if paused:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()
