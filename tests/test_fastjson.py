"""_fastjson: dumps produces what json.loads reads back, for any plain data; load/save keep a marshal sidecar
so a hot path never imports json."""

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


def _load_in_fresh_interpreter(path: str) -> tuple[object, bool]:
    import subprocess
    import sys

    code = ("import sys, marshal; from agentkernel._fastjson import load; d = load(sys.argv[1]); "
            "sys.stdout.buffer.write(marshal.dumps((d, 'json' in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, check=True)
    import marshal

    return marshal.loads(r.stdout)


def test_load_never_imports_json_and_save_leaves_a_fresh_sidecar(tmp_path):
    from agentkernel._fastjson import save

    path = str(tmp_path / "refs.json")
    data = {"agentkernel/busybox": {"stamps": ["1", 2], "rootfs": {"path": "/x", "env": ["A=b"]}}}
    with open(path, "w") as f:  # written by someone else: no sidecar
        json.dump(data, f)
    assert _load_in_fresh_interpreter(path) == (data, False)
    data["other"] = {"stamps": "registry"}
    save(path, data)
    assert (tmp_path / "refs.json.m").stat().st_mtime_ns >= (tmp_path / "refs.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "refs.json").read_text()) == data
    with open(path + ".m", "rb") as f:  # the sidecar already holds what was saved
        import marshal

        assert marshal.load(f) == data
    assert _load_in_fresh_interpreter(path) == (data, False)
