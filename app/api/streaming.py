"""Pub/sub over HTTP: a WebSocket helper and a server-sent events response, for any FastAPI app.

* ``serve_websocket(websocket, broadcaster, *channels, patterns=...)``
  subscribes, accepts the socket (so an open socket is already subscribed)
  and streams every event as a JSON text frame until the client leaves; a
  socket that falls behind under the ``disconnect`` policy is closed with 1013
  (try again later), Redis being unavailable with 1011, a shutdown with 1001.
* ``EventStreamResponse(broadcaster, *channels, ...)`` is a ``text/event-stream``
  response: heartbeat comments, the stream id as the SSE ``id`` on
  history-backed channels (so ``Last-Event-ID`` resumes without loss), and
  the subscription ends as soon as the client disconnects.

Both send one JSON schema: ``{"type": "message", "channel", "data", "id"?,
"pattern"?}`` and ``{"type": "reconnected", "gap", "may_have_missed", "replayed"}``.
The demo's routes (``app.api.routes.pubsub``) are built on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from fastapi import WebSocket
from fastapi.encoders import jsonable_encoder
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.core.errors import RedisUnavailable, SubscriberOverflow
from app.http.asgi import body_chunk, wait_for_disconnect
from app.http.problems import send_problem
from app.services.pubsub import (
    Broadcaster,
    Event,
    Message,
    OverflowPolicy,
    Reconnected,
    Subscription,
)

__all__ = [
    "WS_GOING_AWAY",
    "WS_INTERNAL_ERROR",
    "WS_TRY_AGAIN_LATER",
    "EventStreamResponse",
    "event_json",
    "serve_websocket",
]

log = logging.getLogger("app.pubsub.http")

WS_GOING_AWAY = 1001
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013


# -- encoding -----------------------------------------------------------------


def event_json(event: Event) -> bytes:
    """The JSON both helpers send for *event* (see the module docstring)."""
    if isinstance(event, Message):
        body: dict[str, Any] = {"type": "message", "channel": event.channel, "data": event.data}
        if event.id is not None:
            body["id"] = event.id
        if event.pattern is not None:
            body["pattern"] = event.pattern
    else:
        body = {
            "type": "reconnected",
            "gap": round(event.gap, 6),
            "may_have_missed": event.may_have_missed,
            "replayed": event.replayed,
        }
    return orjson.dumps(body, default=jsonable_encoder)


def _last_ids(
    broadcaster: Broadcaster, channels: Sequence[str], last_id: str | None
) -> dict[str, str]:
    if not last_id:
        return {}
    return {c: last_id for c in channels if broadcaster.history_length(c) > 0}


# -- WebSocket ----------------------------------------------------------------


async def serve_websocket(
    websocket: WebSocket,
    broadcaster: Broadcaster,
    *channels: str,
    patterns: Sequence[str] = (),
    last_id: str | None = None,
    encode: Callable[[Event], bytes] = event_json,
    on_receive: Callable[[str], Awaitable[None]] | None = None,
    queue_size: int | None = None,
    overflow: OverflowPolicy | None = None,
) -> None:
    """Stream a subscription to *websocket* until either side ends it.

    Subscribes first (one shared Redis connection per process, whatever the
    number of sockets), then accepts the socket if needed, so a client that
    sees it open is already subscribed; then sends each event as a text frame
    made by *encode*. Frames from the client go to *on_receive* (or are
    discarded); reading them is also how a disconnect is noticed at once.
    *last_id* resumes history-backed channels after that stream id.

    Closes with 1013 when this socket fell more than *queue_size* events
    behind under the ``disconnect`` policy (with ``drop_oldest`` it keeps
    going and the drops are counted), 1011 when Redis cannot confirm the
    subscription, 1001 when the broadcaster shuts down. Returns quietly when
    the client goes away.
    """
    code, reason = WS_GOING_AWAY, "server shutting down"
    try:
        async with broadcaster.subscribe(
            *channels,
            patterns=patterns,
            last_ids=_last_ids(broadcaster, channels, last_id),
            queue_size=queue_size,
            overflow=overflow,
        ) as sub:
            if websocket.client_state == WebSocketState.CONNECTING:
                await websocket.accept()
            if not await _pump_websocket(websocket, sub, encode, on_receive):
                return  # the client left
    except SubscriberOverflow:
        code, reason = WS_TRY_AGAIN_LATER, "subscriber fell behind"
    except RedisUnavailable as exc:
        log.warning("WebSocket subscription failed: %s", exc)
        code, reason = WS_INTERNAL_ERROR, "pub/sub unavailable"
    except RuntimeError:  # the broadcaster is closed
        code, reason = WS_GOING_AWAY, "server shutting down"
    except (WebSocketDisconnect, OSError):  # the client left (possibly before the accept)
        return
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        if websocket.client_state == WebSocketState.CONNECTING:
            await websocket.accept()  # so the client sees the close code and reason
        await websocket.close(code=code, reason=reason)


async def _send_events(
    websocket: WebSocket, sub: Subscription[Any], encode: Callable[[Event], bytes]
) -> None:
    async for event in sub:
        await websocket.send_text(encode(event).decode())


async def _until_one_ends(*tasks: asyncio.Task[None]) -> set[asyncio.Task[None]]:
    """Wait until one of *tasks* ends, then cancel and await them all; the ones that had ended.

    The one way both transports run a sender beside a disconnect watcher: whichever
    ends first, the other is stopped before the response returns (also when this
    wait itself is cancelled).
    """
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


async def _receive_frames(
    websocket: WebSocket, on_receive: Callable[[str], Awaitable[None]] | None
) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None and message.get("bytes") is not None:
            text = message["bytes"].decode("utf-8", "replace")
        if on_receive is not None and text is not None:
            await on_receive(text)


async def _pump_websocket(
    websocket: WebSocket,
    sub: Subscription[Any],
    encode: Callable[[Event], bytes],
    on_receive: Callable[[str], Awaitable[None]] | None,
) -> bool:
    """True when the subscription ended (shutdown); False when the client left."""
    sender = asyncio.create_task(_send_events(websocket, sub, encode))
    receiver = asyncio.create_task(_receive_frames(websocket, on_receive))
    done = await _until_one_ends(sender, receiver)
    if sender in done:
        return _sender_outcome(websocket, sender)
    error = receiver.exception()
    if error is not None and not isinstance(error, WebSocketDisconnect | OSError | RuntimeError):
        raise error
    return False


def _sender_outcome(websocket: WebSocket, sender: asyncio.Task[None]) -> bool:
    """True when the sender ran out of events (shutdown); False when the client left."""
    error = sender.exception()
    if error is None:
        return True
    if isinstance(error, WebSocketDisconnect | OSError):
        return False
    if isinstance(error, RuntimeError) and websocket.client_state != WebSocketState.CONNECTED:
        return False  # sending after the client closed
    raise error


# -- server-sent events ---------------------------------------------------------


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` of a subscription (server-sent events).

    Each message is an SSE event (default type ``message``) whose ``data`` is
    the JSON of ``event_json``; on history-backed channels its ``id`` is the
    stream id, so a browser's ``EventSource`` resumes with ``Last-Event-ID``
    and misses nothing the history still holds (pass the header as
    *last_event_id*). ``Reconnected`` events have the type ``reconnected``. A
    comment (``: ping``) is sent every *heartbeat* seconds so proxies keep the
    stream open and dead clients are found. The subscription ends as soon as
    the client disconnects (``http.disconnect`` is watched, whatever the ASGI
    server's spec version). If Redis cannot confirm the subscription the
    response is a 503 problem+json instead.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        broadcaster: Broadcaster,
        *channels: str,
        patterns: Sequence[str] = (),
        last_event_id: str | None = None,
        heartbeat: float = 15.0,
        retry_ms: int | None = None,
        encode: Callable[[Event], bytes] = event_json,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.broadcaster = broadcaster
        self.channels = channels
        self.patterns = tuple(patterns)
        self.last_event_id = last_event_id
        self.heartbeat = heartbeat
        self.retry_ms = retry_ms
        self.encode = encode
        self.queue_size = queue_size
        self.overflow: OverflowPolicy | None = overflow
        base = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(_never(), headers={**base, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(scope, send))
        watch = asyncio.create_task(wait_for_disconnect(receive))
        done = await _until_one_ends(stream, watch)
        if stream in done:
            error = stream.exception()
            if error is not None and not isinstance(error, OSError):
                raise error

    async def _stream(self, scope: Scope, send: Send) -> None:
        started = False
        try:
            async with self.broadcaster.subscribe(
                *self.channels,
                patterns=self.patterns,
                last_ids=_last_ids(self.broadcaster, self.channels, self.last_event_id),
                queue_size=self.queue_size,
                overflow=self.overflow,
            ) as sub:
                started = True
                await self._send_events(send, sub)
        except (RedisUnavailable, RuntimeError) as exc:
            if started:
                raise
            problem = (
                exc
                if isinstance(exc, RedisUnavailable)
                else RedisUnavailable("the pub/sub broadcaster is shutting down")
            )
            await send_problem(send, problem, scope.get("path"))

    async def _send_events(self, send: Send, sub: Subscription[Any]) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        opening = f"retry: {self.retry_ms}\n" if self.retry_ms is not None else ""
        await send(body_chunk((opening + ": connected\n\n").encode()))
        while True:
            try:
                event = await sub.get(self.heartbeat)
            except SubscriberOverflow:
                await send(
                    body_chunk(b'event: error\ndata: {"error":"subscriber fell behind"}\n\n')
                )
                break
            if event is None:
                if sub.closed and not sub.pending:
                    break  # shutdown
                await send(body_chunk(b": ping\n\n"))
                continue
            await send(body_chunk(self._frame(event)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _frame(self, event: Event) -> bytes:
        data = self.encode(event)
        if isinstance(event, Reconnected):
            return b"event: reconnected\ndata: " + data + b"\n\n"
        if event.id is not None:
            return b"id: " + event.id.encode() + b"\ndata: " + data + b"\n\n"
        return b"data: " + data + b"\n\n"


async def _never() -> AsyncIterator[bytes]:  # the body is produced by __call__
    return
    yield b""  # pragma: no cover
