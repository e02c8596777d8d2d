"""Server-sent events that really stream, and kill the command when the client goes away.

``EventStream`` is a raw ASGI response: it runs a producer task that puts ``(event, data)`` pairs on a
bounded queue (so a slow client pushes back on the command's output), sends each as it comes, sends a
keep-alive comment every ``KEEPALIVE_S``, and watches the connection: on ``http.disconnect`` (or a send
that fails) it cancels the producer, which kills the command (and, for a one-shot run, destroys the
sandbox).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

log = logging.getLogger("agentkernel.api")

KEEPALIVE_S = 15.0
QUEUE_ITEMS = 256


Producer = Callable[[asyncio.Queue], Awaitable[None]]


def encode_event(event: str, data: Any) -> bytes:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {body}\n\n".encode()


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, producer: Producer, on_disconnect: Callable[[], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self.on_disconnect = on_disconnect
        self.on_close = on_close  # called once the response is over, however it ended
        self.status_code = 200
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _serve(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        q: asyncio.Queue = asyncio.Queue(QUEUE_ITEMS)

        async def produce() -> None:
            try:
                await self.producer(q)
            finally:
                await q.put(None)

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        task = asyncio.create_task(produce())
        watcher = asyncio.create_task(watch())
        getter: asyncio.Task | None = None
        disconnected = False
        try:
            while True:
                if getter is None:
                    getter = asyncio.create_task(q.get())
                done, _ = await asyncio.wait({getter, watcher}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    item = getter.result()
                    getter = None
                    if item is None:
                        break
                    await send({"type": "http.response.body", "body": encode_event(*item), "more_body": True})
                elif watcher in done:
                    disconnected = True
                    break
                else:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        except OSError:
            disconnected = True
        except asyncio.CancelledError:
            disconnected = True
            raise
        finally:
            for t in (getter, watcher):
                if t is not None:
                    t.cancel()
            if not task.done():
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("stream producer failed")
            if disconnected and self.on_disconnect:
                self.on_disconnect()
        if not disconnected:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass
        if self.background is not None:
            await self.background()


class TextDecoders:
    """Per-stream incremental UTF-8 decoding (a chunk may end inside a multi-byte character)."""

    def __init__(self) -> None:
        self._d = {1: codecs.getincrementaldecoder("utf-8")("replace"),
                   2: codecs.getincrementaldecoder("utf-8")("replace")}

    def decode(self, fd: int, data: bytes) -> str:
        return self._d[fd].decode(data)

    def flush(self, fd: int) -> str:
        return self._d[fd].decode(b"", final=True)
