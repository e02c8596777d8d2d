"""The audit log: one JSON line per event, never interleaved, rotated by size."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

from agentkernel import audit


def _writer(path: str, n: int, tag: str) -> None:
    os.environ["AGENTKERNEL_AUDIT_LOG"] = path
    for i in range(n):
        audit.log("command_executed", sandbox=tag, argv=["echo", "x" * 200], i=i)


def test_concurrent_writers_never_interleave(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    procs = [multiprocessing.Process(target=_writer, args=(path, 300, f"w{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 1200
    events = [json.loads(x) for x in lines]
    for k in range(4):
        assert [e["i"] for e in events if e["sandbox"] == f"w{k}"] == list(range(300))
    assert all(e["event"] == "command_executed" and e["ts"] > 0 and e["pid"] > 0 for e in events)


def test_rotation_keeps_a_bounded_number_of_files(tmp_path, monkeypatch):
    path = str(tmp_path / "audit.jsonl")
    monkeypatch.setenv("AGENTKERNEL_AUDIT_LOG", path)
    monkeypatch.setattr(audit, "MAX_BYTES", 4096)
    for i in range(2000):
        audit.log("sandbox_created", sandbox=f"box{i}")
    files = sorted(os.listdir(tmp_path))
    assert files[0] == "audit.jsonl" and "audit.jsonl.1" in files
    rotated = [f for f in files if f[len("audit.jsonl."):].isdigit()]
    assert rotated == [f"audit.jsonl.{i}" for i in range(1, audit.KEEP + 1)]
    assert os.path.getsize(path) <= 4096 + 200
    # the newest events are in the current file, and read() returns them in order
    assert audit.read()[-1]["sandbox"] == "box1999"
    assert [e["sandbox"] for e in audit.read(sandbox="box1999")] == ["box1999"]


def test_unserializable_values_are_kept_as_text_and_disabling_works(tmp_path, monkeypatch):
    path = str(tmp_path / "audit.jsonl")
    monkeypatch.setenv("AGENTKERNEL_AUDIT_LOG", path)
    audit.log("run", argv=("a", "b"), obj=object())
    e = json.loads(Path(path).read_text())
    assert e["argv"] == ["a", "b"] and e["obj"].startswith("<object object")
    monkeypatch.setenv("AGENTKERNEL_AUDIT", "0")
    audit.log("run", argv=["x"])
    assert len(Path(path).read_text().splitlines()) == 1


def test_deferred_events_are_written_together_as_whole_lines(tmp_path, monkeypatch):
    """A daemon defers its loop thread's events to one write per loop turn; other threads still write
    at once; values JSON cannot carry become their str()."""
    import threading

    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("AGENTKERNEL_AUDIT_LOG", str(path))
    scheduled = []
    audit.defer(lambda: scheduled.append(1))
    try:
        for i in range(3):
            audit.log("run", i=i, argv=("echo", "x"), obj=object())
        assert scheduled == [1] and not path.exists()  # one flush asked for, nothing written yet
        t = threading.Thread(target=audit.log, args=("other_thread",))
        t.start()
        t.join()
        assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["other_thread"]
        audit.flush()
        events = [json.loads(x) for x in path.read_text().splitlines()]
        assert [e.get("i") for e in events] == [None, 0, 1, 2]
        assert events[1]["argv"] == ["echo", "x"] and events[1]["obj"].startswith("<object object")
        audit.log("run", i=3)
        assert scheduled == [1, 1]
    finally:
        audit.defer(None)  # writes what is still waiting
    assert [json.loads(x).get("i") for x in path.read_text().splitlines()][-1] == 3
    audit.log("after", nan=float("nan"))  # not JSON: dropped, never raised
    audit.log("after")
    assert json.loads(path.read_text().splitlines()[-1])["event"] == "after"
