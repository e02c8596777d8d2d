"""``agentkernel mcp`` over stdio, answering at once: the MCP handshake is served here, from
``mcp_identity`` (standard library only), while the real server (the MCP SDK, pydantic, the API's
``Service``) loads on a thread; the session is then handed to it.

1. ``initialize`` is answered right away (the same result the SDK server gives: ``mcp_identity`` is the
   one source of name, version, instructions, capabilities and tools), and the loader thread starts.
   ``ping`` and ``tools/list`` are answered here too while it loads.
2. As soon as the loader is done, or the client sends anything else (``tools/call``: it waits for the
   load), the SDK server takes over: it is fed the client's ``initialize`` again (under a private id;
   its answer is dropped) and ``notifications/initialized`` if it came, then everything not yet
   answered, then the rest of the session.

The wire is this process's fd 0 and 1, taken over at the start: fd 1 then points at stderr and fd 0 at
/dev/null, so a stray print or a child process never corrupts or eats the protocol (the SDK's own stdio
transport does the same).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any

from .. import _fastjson
from . import mcp_identity

REPLAY_ID = "agentkernel-replayed-initialize"
# what the real server needs: imported on the loader thread while the handshake is answered here
HEAVY = ("mcp.server.stdio", "mcp.server", "agentkernel.api.mcp", "agentkernel.api.service",
         "agentkernel.api.policy", "agentkernel.api.auth")
POLL_S = 0.05


def _emit(wire: Any, obj: dict) -> None:
    """One JSON-RPC message on the wire (one line)."""
    wire.write(_fastjson.dumps(obj).encode() + b"\n")
    wire.flush()


class _Reader(threading.Thread):
    """Lines from the client, into a queue until ``attach`` gives it the real server's sink (None: EOF)."""

    def __init__(self, wire_in: Any) -> None:
        super().__init__(name="ak-mcp-stdin", daemon=True)
        self.wire_in = wire_in
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.sink = None

    def run(self) -> None:
        while True:
            try:
                line = self.wire_in.readline()
            except (OSError, ValueError):
                line = b""
            self._put(line or None)
            if not line:
                return

    def _put(self, line: bytes | None) -> None:
        with self.lock:
            if self.sink is not None:
                self.sink(line)
            else:
                self.q.put(line)

    def attach(self, sink) -> None:
        with self.lock:
            while True:
                try:
                    sink(self.q.get_nowait())
                except queue.Empty:
                    break
            self.sink = sink


class _Loader(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="ak-mcp-load", daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        import importlib

        try:
            for name in HEAVY:
                importlib.import_module(name)
        except BaseException as exc:  # reported by the main thread, which imports again and fails loudly
            self.error = exc


def _claim_stdio() -> tuple[Any, Any]:
    """Private duplicates of fd 0 and 1 for the protocol; fd 1 -> stderr, fd 0 -> /dev/null."""
    wire_in = os.fdopen(os.dup(0), "rb")
    wire_out = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return wire_in, wire_out


def serve(make_service) -> int:
    """Serve MCP over stdio; ``make_service()`` builds the (unstarted) ``api.service.Service`` once the
    heavy modules are loaded."""
    wire_in, wire_out = _claim_stdio()
    reader = _Reader(wire_in)
    reader.start()
    init: dict | None = None
    replay: list[bytes] = []  # for the real server: the handshake again, then what is not answered yet
    loader: _Loader | None = None
    while loader is None or loader.is_alive():
        try:
            line = reader.q.get(timeout=POLL_S if loader is not None else None)
        except queue.Empty:
            continue
        if line is None:
            return 0  # the client went away before needing the real server
        try:
            msg = _fastjson.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            replay.append(line)  # the real server answers what it makes of it
            break
        method, rid = msg.get("method"), msg.get("id")
        if method == "initialize" and rid is not None and init is None:
            init = msg
            asked = (msg.get("params") or {}).get("protocolVersion")
            _emit(wire_out, {"jsonrpc": "2.0", "id": rid, "result": mcp_identity.initialize_result(asked)})
            loader = _Loader()
            loader.start()
            replay.append(_fastjson.dumps({**msg, "id": REPLAY_ID}).encode() + b"\n")
        elif method == "notifications/initialized" and init is not None:
            replay.append(line)
        elif method == "ping" and rid is not None:
            _emit(wire_out, {"jsonrpc": "2.0", "id": rid, "result": {}})
        elif method == "tools/list" and rid is not None and init is not None and \
                not (msg.get("params") or {}).get("cursor"):
            _emit(wire_out, {"jsonrpc": "2.0", "id": rid, "result": {"tools": mcp_identity.tools()}})
        else:
            replay.append(line)
            break
    if loader is not None:
        loader.join()
    import asyncio

    return asyncio.run(_hand_over(make_service, reader, replay, wire_out, init))


class _LinesIn:
    """The client's lines for the SDK's stdio transport (``async for line in stdin``)."""

    def __init__(self, q) -> None:
        self.q = q

    def __aiter__(self) -> _LinesIn:
        return self

    async def __anext__(self) -> str:
        line = await self.q.get()
        if line is None:
            raise StopAsyncIteration
        return line.decode("utf-8", "replace")


class _WireOut:
    """The SDK transport's output: to the wire, except the answer to the replayed ``initialize`` (the client
    had its answer already; a difference from it is reported on stderr)."""

    def __init__(self, wire: Any, init: dict | None) -> None:
        self.wire, self.init = wire, init

    async def write(self, text: str) -> None:
        if REPLAY_ID in text:
            try:
                msg = _fastjson.loads(text)
            except ValueError:
                msg = None
            if isinstance(msg, dict) and msg.get("id") == REPLAY_ID:
                want = mcp_identity.initialize_result(((self.init or {}).get("params") or {}).get("protocolVersion"))
                if msg.get("result") != want:
                    print(f"agentkernel mcp: the server's initialize result {msg.get('result')!r} differs from the "
                          f"one answered at start-up {want!r}", file=sys.stderr)
                return
        self.wire.write(text.encode())

    async def flush(self) -> None:
        self.wire.flush()


async def _hand_over(make_service, reader: _Reader, replay: list[bytes], wire_out: Any, init: dict | None) -> int:
    import asyncio

    from .mcp import serve_stdio

    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    for line in replay:
        lines.put_nowait(line)
    reader.attach(lambda line: loop.call_soon_threadsafe(lines.put_nowait, line))
    await serve_stdio(make_service(), _LinesIn(lines), _WireOut(wire_out, init))
    return 0
