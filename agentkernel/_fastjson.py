"""``dumps`` and ``loads`` for plain data without importing ``json`` (which imports ``re`` and ``enum``:
~6-11 ms of start-up on our machines). Used on the CLI's cold paths: the ownership journal, OCI bundle
configs, the Docker Engine API's bodies. Output is standard JSON, compact; ``loads`` is CPython's own C
scanner (the one ``json`` uses), driven directly."""

from __future__ import annotations

from _json import encode_basestring_ascii as _quote
from _json import make_scanner as _make_scanner

_INF = float("inf")


def dumps(obj: object, *, sort_keys: bool = False) -> str:
    out: list[str] = []
    _encode(obj, out.append, sort_keys)
    return "".join(out)


def _encode(o: object, w, sort_keys: bool = False) -> None:
    if o is None:
        w("null")
    elif o is True:
        w("true")
    elif o is False:
        w("false")
    elif isinstance(o, str):
        w(_quote(o))
    elif isinstance(o, int):
        w(int.__repr__(o))
    elif isinstance(o, float):
        if o != o or o in (_INF, -_INF):
            raise ValueError(f"out of range float for JSON: {o!r}")
        w(float.__repr__(o))
    elif isinstance(o, dict):
        w("{")
        first = True
        for k, v in (sorted(o.items()) if sort_keys else o.items()):
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, got {type(k).__name__}")
            if not first:
                w(",")
            first = False
            w(_quote(k))
            w(":")
            _encode(v, w, sort_keys)
        w("}")
    elif isinstance(o, list | tuple):
        w("[")
        for i, v in enumerate(o):
            if i:
                w(",")
            _encode(v, w, sort_keys)
        w("]")
    else:
        raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load(path: str):
    """``json.load`` of a small, rarely changing file, through a ``marshal`` sidecar (``PATH.m``) kept
    next to it, so a hot path reads it with one unmarshal. The sidecar is used only while it is at least as
    new as the JSON file; otherwise the JSON is parsed (``loads``: still no ``json`` import) and the
    sidecar rewritten. ``save`` writes both."""
    import marshal
    import os

    side = path + ".m"
    try:
        if os.stat(side).st_mtime_ns >= os.stat(path).st_mtime_ns:
            with open(side, "rb") as f:
                return marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        pass
    with open(path, "rb") as f:
        data = loads(f.read())
    _write_sidecar(side, data)
    return data


def save(path: str, data: object) -> None:
    """Write ``data`` as JSON to ``path`` (atomically) and its ``marshal`` sidecar after it, so the next
    ``load`` of the file does not parse it again."""
    import os

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(dumps(data))
    os.replace(tmp, path)
    _write_sidecar(path + ".m", data)


def _write_sidecar(side: str, data: object) -> None:
    import marshal
    import os

    try:
        tmp = f"{side}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            marshal.dump(data, f)
        os.replace(tmp, side)
    except (OSError, ValueError):
        pass


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads (those of a default ``json.JSONDecoder``)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


_scan = _make_scanner(_ScannerContext())
_WS = " \t\n\r"


def loads(data: str | bytes | bytearray):
    """``json.loads`` for a UTF-8 document; a ``ValueError`` (``json.JSONDecodeError`` from the scanner)
    on malformed input."""
    s = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    start = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, start)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON: expecting a value at char {exc.value}") from None
    if s[end:].strip(_WS):
        raise ValueError(f"invalid JSON: extra data at char {end}")
    return obj
