"""The sans-IO HTTP/1.1 framing the Docker Engine API client uses (agentkernel.backends._http1), and the
import-free JSON reader next to it. Pure byte-level tests: every response is also fed one byte at a
time, so no framing decision depends on how the bytes happen to arrive."""

from __future__ import annotations

import json

import pytest

from agentkernel import _fastjson
from agentkernel.backends._http1 import MAX_HEAD, HTTPProtocolError, ResponseParser, request_bytes


def parse(raw: bytes, method: str = "GET", *, bytewise: bool = False, eof: bool = False):
    heads: list[tuple[int, dict[str, str]]] = []
    body = bytearray()
    p = ResponseParser(method, lambda st, h: heads.append((st, h)), body.extend)
    if bytewise:
        for i in range(len(raw)):
            p.feed(raw[i:i + 1])
    else:
        p.feed(raw)
    if eof:
        p.feed(b"")
    return p, heads, bytes(body)


@pytest.mark.parametrize("bytewise", [False, True])
def test_content_length_body_and_keep_alive(bytewise):
    p, heads, body = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello", bytewise=bytewise)
    assert p.done and p.reusable and body == b"hello"
    assert heads == [(200, {"content-length": "5", "x-a": "1, 2"})]


@pytest.mark.parametrize("bytewise", [False, True])
def test_chunked_body_with_extensions_and_trailers(bytewise):
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + \
          b"\r\n0\r\nTrailer: v\r\n\r\n"
    p, _, body = parse(raw, bytewise=bytewise)
    assert p.done and p.reusable and body == b"hello" + b"x" * 26


def test_bodyless_responses():
    for raw, method in ((b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE"), (b"HTTP/1.1 304 Not Modified\r\n\r\n", "POST"),
                        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD"),
                        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET")):
        p, heads, body = parse(raw, method)
        assert p.done and p.reusable and body == b"" and heads


def test_read_until_close_is_not_reusable():
    p, _, _ = parse(b"HTTP/1.1 200 OK\r\n\r\nstream", eof=False)
    assert not p.done
    p.feed(b"ing")
    p.feed(b"")
    assert p.done and not p.reusable
    p2, _, body2 = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert p2.done and not p2.reusable and body2 == b"ok"
    p3, _, _ = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert p3.done and not p3.reusable


@pytest.mark.parametrize("bytewise", [False, True])
def test_upgrade_hands_back_the_raw_stream(bytewise):
    raw = b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n\x01\x00\x00\x00\x00\x00\x00\x02hi"
    p, heads, _ = parse(raw, "POST", bytewise=bytewise)
    assert p.done and p.upgraded and not p.reusable and heads[0][0] == 101
    if not bytewise:  # fed whole, the frame after the head is handed back; bytewise, it never reaches us
        assert p.trailing == b"\x01\x00\x00\x00\x00\x00\x00\x02hi"


def test_100_continue_is_skipped():
    p, heads, body = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
    assert p.done and heads == [(201, {"content-length": "2"})] and body == b"{}"


def test_extra_bytes_after_the_response_make_the_connection_unusable():
    p, _, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxJUNK")
    assert p.done and not p.reusable


@pytest.mark.parametrize("raw", [
    b"HTTX/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX",
])
def test_malformed_responses_raise(raw):
    with pytest.raises(HTTPProtocolError):
        parse(raw)


def test_oversized_head_and_early_close_raise():
    with pytest.raises(HTTPProtocolError, match="larger than"):
        parse(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10))
    with pytest.raises(HTTPProtocolError, match="closed"):
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", eof=True)
    with pytest.raises(HTTPProtocolError, match="closed"):
        parse(b"", eof=True)


def test_request_bytes_frames_and_refuses_injection():
    assert request_bytes("GET", "/v1/_ping", [("Host", "docker")]) == b"GET /v1/_ping HTTP/1.1\r\nHost: docker\r\n\r\n"
    assert request_bytes("POST", "/x", [], b"{}") == b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    assert b"Content-Length: 0" in request_bytes("DELETE", "/x", [])
    for bad in (("GET", "/a b", []), ("GET", "/a\r\nX: y", []), ("G ET", "/", []),
                ("GET", "/", [("X", "a\r\nInjected: 1")]), ("GET", "/", [("Bad Name", "v")])):
        with pytest.raises(ValueError):
            request_bytes(*bad)


@pytest.mark.parametrize("doc", ['{"Id":"abc","Warnings":[]}', ' [1, 2.5, -3e2, null, true, false] ', '"\\u00e9\\n"',
                                 '{"a":{"b":[{}]}}', '0', '{"big": 123456789012345678901234567890}'])
def test_fastjson_loads_matches_json(doc):
    assert _fastjson.loads(doc) == json.loads(doc)
    assert _fastjson.loads(doc.encode()) == json.loads(doc)
    assert json.loads(_fastjson.dumps(json.loads(doc))) == json.loads(doc)


@pytest.mark.parametrize("doc", ["", "   ", "{", "[1] 2", '{"a":}', "nul", "[1,]"])
def test_fastjson_loads_rejects_malformed(doc):
    with pytest.raises(ValueError):
        _fastjson.loads(doc)
