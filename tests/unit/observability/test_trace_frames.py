"""Pub/sub trace frames on fakeredis: bytes or decoded replies, live and replayed."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from app.observability.testing import Capture
from app.services.pubsub import Broadcaster, Message


async def next_message(sub: Any) -> Message[Any]:
    event = await sub.get(10)
    assert isinstance(event, Message), event
    return event


@pytest.mark.parametrize("decode_responses", [False, True])
async def test_traced_messages_decode_on_either_kind_of_client(decode_responses: bool) -> None:
    redis = fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer(), decode_responses=decode_responses
    )
    with Capture() as otel:
        tracer = otel.tracer_provider.get_tracer("test")
        async with Broadcaster(redis, history=10) as hub, hub.subscribe("c") as sub:
            with tracer.start_as_current_span("request") as span:
                await hub.publish("c", {"text": "é\x00\x03"})  # frame bytes inside the value
            live = await next_message(sub)
            async with hub.subscribe("c", last_ids={"c": "0-0"}) as late:
                replayed = await next_message(late)
    trace_id = format(span.get_span_context().trace_id, "032x")
    for message in (live, replayed):
        assert message.data == {"text": "é\x00\x03"}
        assert message.traceparent is not None and trace_id in message.traceparent
    await redis.aclose()
