"""The demo's pub/sub routes, on the helpers of ``app.api.streaming``.

``WS /ws/{channel}``, ``GET /sse/{channel}``, ``POST /publish/{channel}``
(403 unless ``APP_ENV=development`` or ``DEMO_DESTRUCTIVE_ROUTES=true``) and
``GET /pubsub/stats``. The demo broadcaster is started by this module's
``lifespan`` (stored on ``app.state.broadcaster``), drained and closed on
shutdown; its channels keep 1000 messages of history.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Header, Path, Query, WebSocket

from app.api.deps import BroadcasterDep
from app.api.routes._guards import Destructive
from app.api.streaming import EventStreamResponse, serve_websocket
from app.core.redis import Lifespan, get_redis
from app.services.pubsub import Broadcaster

__all__ = ["DEMO_HISTORY", "lifespan", "router", "setup"]

DEMO_HISTORY = 1000
"""Messages of history each demo channel keeps (for ``Last-Event-ID`` and reconnects)."""

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
    """Stream *channel* to a WebSocket (JSON frames; see ``app.api.streaming.event_json``)."""
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
