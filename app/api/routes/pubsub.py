"""Pub/sub over HTTP: a WebSocket helper, a server-sent events helper and the demo routes.

Helpers (usable in any FastAPI app):

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

Demo routes: ``WS /ws/{channel}``, ``GET /sse/{channel}``,
``POST /publish/{channel}`` (403 unless ``APP_ENV=development`` or
``DEMO_DESTRUCTIVE_ROUTES=true``) and ``GET /pubsub/stats``. The demo broadcaster is
started by this module's ``lifespan`` (stored on ``app.state.broadcaster``),
drained and closed on shutdown; its channels keep 1000 messages of history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, FastAPI, Header, Path, Query, WebSocket
from fastapi.encoders import jsonable_encoder
from starlette.responses import StreamingResponse
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.api.deps import BroadcasterDep
from app.api.problems import send_problem
from app.api.routes._guards import Destructive
from app.core.errors import RedisUnavailable, SubscriberOverflow
from app.core.redis import Lifespan, get_redis
from app.services.pubsub import (
    Broadcaster,
    Event,
    Message,
    OverflowPolicy,
    Reconnected,
    Subscription,
)

__all__ = [
    "DEMO_HISTORY",
    "EventStreamResponse",
    "event_json",
    "lifespan",
    "router",
    "serve_websocket",
    "setup",
]

log = logging.getLogger("app.pubsub.http")

DEMO_HISTORY = 1000
"""Messages of history each demo channel keeps (for ``Last-Event-ID`` and reconnects)."""

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


async def _pump_websocket(
    websocket: WebSocket,
    sub: Subscription[Any],
    encode: Callable[[Event], bytes],
    on_receive: Callable[[str], Awaitable[None]] | None,
) -> bool:
    """True when the subscription ended (shutdown); False when the client left."""

    async def send_events() -> None:
        async for event in sub:
            await websocket.send_text(encode(event).decode())

    async def receive_frames() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", "replace")
            if on_receive is not None and text is not None:
                await on_receive(text)

    sender = asyncio.create_task(send_events())
    receiver = asyncio.create_task(receive_frames())
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
    if sender in done:
        error = sender.exception()
        if error is None:
            return True
        if isinstance(error, WebSocketDisconnect | OSError):
            return False
        if isinstance(error, RuntimeError) and websocket.client_state != WebSocketState.CONNECTED:
            return False  # sending after the client closed
        raise error
    error = receiver.exception()
    if error is not None and not isinstance(error, WebSocketDisconnect | OSError | RuntimeError):
        raise error
    return False


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
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
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
        await send(_body((opening + ": connected\n\n").encode()))
        while True:
            try:
                event = await sub.get(self.heartbeat)
            except SubscriberOverflow:
                await send(_body(b'event: error\ndata: {"error":"subscriber fell behind"}\n\n'))
                break
            if event is None:
                if sub.closed and not sub.pending:
                    break  # shutdown
                await send(_body(b": ping\n\n"))
                continue
            await send(_body(self._frame(event)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _frame(self, event: Event) -> bytes:
        data = self.encode(event)
        if isinstance(event, Reconnected):
            return b"event: reconnected\ndata: " + data + b"\n\n"
        if event.id is not None:
            return b"id: " + event.id.encode() + b"\ndata: " + data + b"\n\n"
        return b"data: " + data + b"\n\n"


def _body(chunk: bytes) -> ASGIMessage:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


async def _never() -> AsyncIterator[bytes]:  # the body is produced by __call__
    return
    yield b""  # pragma: no cover


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- demo routes ----------------------------------------------------------------

router = APIRouter(tags=["pubsub"])

ChannelPath = Annotated[
    str, Path(min_length=1, max_length=200, description="Any channel name (escaped for Redis).")
]


@router.websocket("/ws/{channel}")
async def websocket_channel(
    websocket: WebSocket,
    channel: ChannelPath,
    broadcaster: BroadcasterDep,
    last_id: Annotated[str | None, Query(description="Resume after this stream id.")] = None,
) -> None:
    """Stream *channel* to a WebSocket (JSON frames; see ``event_json``)."""
    await serve_websocket(websocket, broadcaster, channel, last_id=last_id)


@router.get(
    "/sse/{channel}",
    summary="Stream a channel as server-sent events (Last-Event-ID resumes)",
    response_class=EventStreamResponse,
    status_code=200,  # FastAPI cannot infer it from EventStreamResponse.__init__
    responses={200: {"content": {"text/event-stream": {}}}, 503: {"description": "Redis down"}},
)
async def sse_channel(
    channel: ChannelPath,
    broadcaster: BroadcasterDep,
    last_event_id: Annotated[str | None, Header()] = None,
    heartbeat: Annotated[float, Query(gt=0, le=300)] = 15.0,
) -> EventStreamResponse:
    """``curl -N localhost:8000/sse/room1``; events carry stream ids for resuming."""
    return EventStreamResponse(
        broadcaster, channel, last_event_id=last_event_id, heartbeat=heartbeat, retry_ms=2000
    )


@router.post("/publish/{channel}", summary="Publish a JSON body to a channel on every worker")
async def publish_channel(
    _: Destructive,
    channel: ChannelPath,
    payload: Annotated[Any, Body(description="Any JSON value.")],
    broadcaster: BroadcasterDep,
) -> dict[str, Any]:
    """Publish *payload*; ``receivers`` counts subscribed worker connections, not sockets.

    Off (403) unless APP_ENV=development or DEMO_DESTRUCTIVE_ROUTES=true: anyone
    could otherwise write into any channel every subscriber trusts.
    """
    result = await broadcaster.publish(channel, payload)
    return {"channel": channel, "receivers": result.receivers, "id": result.id}


@router.get("/pubsub/stats", summary="Broadcaster counters: link state, reconnects, drops")
async def pubsub_stats(broadcaster: BroadcasterDep) -> dict[str, Any]:
    """``Broadcaster.stats()`` of this worker."""
    return broadcaster.stats()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    broadcaster = Broadcaster(get_redis(), history=DEMO_HISTORY)
    app.state.broadcaster = broadcaster
    await broadcaster.start()
    try:
        yield
    finally:
        await broadcaster.aclose()
        app.state.broadcaster = None


lifespan: Lifespan | None = _lifespan


def setup(app: FastAPI) -> None:
    """Nothing to install: the broadcaster lives in ``lifespan`` (see ``BroadcasterDep``)."""
