"""Demo routes for streams: a producer endpoint, an in-app consumer and its stats.

``POST /streams/events`` appends events to the ``events`` stream. The demo consumer
(group ``demo``) runs inside the app, started by the first request to a ``/streams`` route,
so other routes and tests never pay for it; ``python -m app.worker`` runs the same consumer
in its own process (set ``STREAMS_DEMO_WORKER=off`` to leave consuming to such workers, or
``eager`` to start it with the app). ``GET /streams/stats`` shows ``stats()``;
``GET /streams/dead-letters`` lists entries that failed ``max_deliveries`` times.

The stream, the group and the handler live in ``app.api.jobs``: a payload
``{"fail": true}`` makes the demo handler raise (watch the retries, then the dead-letter
entry); ``{"sleep": 2}`` keeps it busy for two seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field

from app.api.deps import stream_producer
from app.api.jobs import DEMO_GROUP, DEMO_STREAM, demo_consumer
from app.core.config import get_settings
from app.core.redis import Lifespan, get_redis
from app.services.streams import StreamConsumer, StreamProducer

__all__ = ["DEMO_GROUP", "DEMO_STREAM", "lifespan", "router", "setup"]

router = APIRouter(prefix="/streams", tags=["streams"])

EventsProducer = Annotated[StreamProducer, Depends(stream_producer(DEMO_STREAM, maxlen=10_000))]


def _worker_mode() -> Literal["lazy", "eager", "off"]:
    """``STREAMS_DEMO_WORKER``: ``lazy`` (default), ``eager`` or ``off``."""
    return get_settings().streams_demo_worker


class _DemoWorker:
    """The in-app consumer: built with the app, run from the first use, stopped fast."""

    def __init__(self, consumer: StreamConsumer[Any], mode: Literal["lazy", "eager", "off"]):
        self.consumer = consumer
        self.mode = mode
        self.task: asyncio.Task[None] | None = None

    def ensure_started(self) -> None:
        if self.mode != "off" and self.task is None:
            self.task = asyncio.create_task(self.consumer.run(), name="streams-demo-consumer")

    async def stop(self) -> None:
        if self.task is None:
            return
        await self.consumer.stop(timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


async def _worker(request: Request) -> _DemoWorker:
    worker: _DemoWorker | None = getattr(request.app.state, "streams_demo_worker", None)
    if worker is None:  # app built without this module's lifespan: consume in-request only
        worker = _DemoWorker(demo_consumer(get_redis(), "demo-stats"), "off")
        request.app.state.streams_demo_worker = worker
    worker.ensure_started()
    return worker


DemoWorker = Annotated[_DemoWorker, Depends(_worker)]


class EventIn(BaseModel):
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description='Any JSON object. {"fail": true} makes the demo handler raise; '
        '{"sleep": 2} keeps it busy for 2 s.',
        examples=[{"order": 42}],
    )
    count: int = Field(default=1, ge=1, le=1000, description="Append this many copies.")


class EventsOut(BaseModel):
    stream: str
    ids: list[str] = Field(description="Stream entry ids, in order.")


@router.post("/events", status_code=201, summary="Append events to the demo stream")
async def produce(body: EventIn, producer: EventsProducer, worker: DemoWorker) -> EventsOut:
    """One ``XADD`` (or one pipeline of them for ``count`` > 1); 503 when Redis is down."""
    if body.count == 1:
        ids = [await producer.add(body.payload)]
    else:
        ids = await producer.add_many([body.payload] * body.count)
    return EventsOut(stream=producer.stream, ids=ids)


@router.get("/stats", summary="Length, lag, pending, oldest pending idle, dead letters")
async def stats(worker: DemoWorker) -> dict[str, Any]:
    """``StreamConsumer.stats()`` of the demo group, plus the in-app consumer's state."""
    snapshot = (await worker.consumer.stats()).as_dict()
    snapshot["worker"] = {
        "mode": worker.mode,
        "running": worker.consumer.running,
        "in_flight": worker.consumer.in_flight,
    }
    return snapshot


@router.get("/dead-letters", summary="Entries that failed max_deliveries times")
async def dead_letters(
    worker: DemoWorker,
    count: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> list[dict[str, Any]]:
    """Oldest first: original id, payload, error, delivery count, consumer, time."""
    return [
        {
            "id": d.id,
            "original_id": d.original_id,
            "payload": d.payload,
            "error": d.error,
            "deliveries": d.deliveries,
            "consumer": d.consumer,
            "failed_at_ms": d.failed_at_ms,
        }
        for d in await worker.consumer.dead_letters(count)
    ]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker = _DemoWorker(demo_consumer(get_redis(), shutdown_timeout=1.0), _worker_mode())
    app.state.streams_demo_worker = worker
    if worker.mode == "eager":
        worker.ensure_started()
    try:
        yield
    finally:
        await worker.stop()


lifespan: Lifespan | None = _lifespan


def setup(app: FastAPI) -> None:
    """Nothing to install: the demo consumer lives in the lifespan."""
