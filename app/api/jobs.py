"""The demo's stream work: the ``events`` stream, the ``demo`` group and their handler.

Run by the in-app consumer of the demo routes (``app.api.routes.streams``) and
by ``python -m app.worker`` when no ``--handler`` is given, so both consume the
same stream in the same group. Imports nothing of FastAPI: a worker process
loads only what the handler needs.

A payload ``{"fail": true}`` makes the handler raise (watch the retries, then the
dead-letter entry); ``{"sleep": 2}`` keeps it busy for two seconds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.core.redis import AnyRedis
from app.services.streams import StreamConsumer, StreamMessage

__all__ = ["DEMO_GROUP", "DEMO_STREAM", "demo_consumer", "demo_handler"]

log = logging.getLogger("app.streams.demo")

DEMO_STREAM = "events"
DEMO_GROUP = "demo"


async def demo_handler(message: StreamMessage[Any]) -> None:
    """The demo's work: log the event; ``sleep`` seconds (at most 30) and ``fail`` on request."""
    payload = message.payload if isinstance(message.payload, dict) else {}
    seconds = payload.get("sleep")
    if isinstance(seconds, int | float) and seconds > 0:
        await asyncio.sleep(min(float(seconds), 30.0))
    if payload.get("fail"):
        raise RuntimeError("the payload asked this delivery to fail")
    log.info("event %s handled (delivery %d): %s", message.id, message.deliveries, payload)


def demo_consumer(
    redis: AnyRedis, consumer: str | None = None, **options: Any
) -> StreamConsumer[Any]:
    """The demo consumer of ``events`` in group ``demo`` (3 deliveries, then dead letter)."""
    settings: dict[str, Any] = {"max_deliveries": 3, "retry_backoff": 0.5, "claim_idle": 15.0}
    settings.update(options)
    return StreamConsumer(redis, DEMO_STREAM, DEMO_GROUP, consumer, demo_handler, **settings)
