"""``agentkernel bench --speed-rows``: the speed suite's row filter (SPEED_ROWS)."""

from __future__ import annotations

import pytest

from agentkernel.bench.suites.sustained import SPEED_ROWS, speed_rows
from tests.conftest import ak


def test_default_is_every_row(monkeypatch):
    monkeypatch.delenv("SPEED_ROWS", raising=False)
    assert speed_rows() == list(SPEED_ROWS)


def test_selects_the_named_rows(monkeypatch):
    monkeypatch.setenv("SPEED_ROWS", "oci_cold, back_to_back")
    assert speed_rows() == ["oci_cold", "back_to_back"]


def test_unknown_row_is_named(monkeypatch):
    monkeypatch.setenv("SPEED_ROWS", "back_to_back,warp")
    with pytest.raises(ValueError, match=r"unknown speed row.*warp.*known: back_to_back"):
        speed_rows()


def test_cli_rejects_an_unknown_row_before_running_anything():
    r = ak("bench", "--suite", "speed", "--speed-rows", "warp", "--no-progress")
    assert r.returncode == 2
    assert b"--speed-rows: unknown speed row(s) warp" in r.stderr
