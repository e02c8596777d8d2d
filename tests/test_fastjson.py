"""_fastjson.dumps produces what json.loads reads back, for any plain data."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentkernel._fastjson import dumps

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(plain)
def test_round_trips_through_json(obj):
    assert json.loads(dumps(obj)) == obj


def test_compact_and_equal_to_json_for_ascii():
    obj = {"a": [1, 2.5, True, None, "x\"y\n\u00e9\U0001f600"], "b": {"c": -3}}
    assert dumps(obj) == json.dumps(obj, separators=(",", ":"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, {"a": object()}, b"bytes"])
def test_rejects_what_json_cannot_carry(bad):
    with pytest.raises((TypeError, ValueError)):
        dumps(bad)
