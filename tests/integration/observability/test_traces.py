"""Trace context through Redis: a request that enqueues a job and the worker that handles it
are one trace, on a real redis-server; pub/sub reconnects are reported."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from redis.asyncio import Redis

from app.api.jobs import DEMO_STREAM, demo_consumer
from app.main import create_app
from app.observability.testing import Capture
from app.services.pubsub import Broadcaster, Message, Reconnected
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer, stream_keys
from app.testing.plugin import AppClientFactory, RedisServerInfo


@pytest.fixture
def otel() -> Iterator[Capture]:
    with Capture() as capture:
        yield capture


async def test_a_job_enqueued_by_a_request_is_handled_in_the_requests_trace(
    real_redis: Redis,
    redis_server: RedisServerInfo,
    make_app_client: AppClientFactory,
    settings_override: Callable[..., None],
    otel: Capture,
) -> None:
    settings_override(streams_demo_worker="off")  # the worker below is "another process"
    app = create_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)
    try:
        client = await make_app_client(app, real_redis)
        reply = await client.post("/streams/events", json={"payload": {"order": 42}})
        assert reply.status_code == 201, reply.text
        [entry_id] = reply.json()["ids"]
    finally:
        FastAPIInstrumentor.uninstrument_app(app)

    worker_redis = Redis.from_url(redis_server.url)  # the worker's own connection
    try:
        consumer = demo_consumer(worker_redis, "worker-1")
        assert await consumer.run_once() == 1
    finally:
        await worker_redis.aclose()

    server = next(s for s in otel.spans() if s.name.startswith("POST /streams/events"))
    produce = otel.span("stream.produce")
    handle = otel.span("stream.handle")
    assert server.context is not None and handle.context is not None
    assert produce.context is not None and handle.parent is not None
    assert handle.context.trace_id == server.context.trace_id
    assert handle.parent.span_id == produce.context.span_id
    assert (handle.attributes or {})["messaging.message.id"] == entry_id
    assert (handle.attributes or {})["messaging.destination.name"] == DEMO_STREAM


async def test_the_handlers_own_spans_join_the_producers_trace(
    real_redis: Redis, otel: Capture
) -> None:
    tracer = otel.tracer_provider.get_tracer("user-code")
    seen: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        with tracer.start_as_current_span("charge card") as span:
            seen.append(span.get_span_context())

    producer = StreamProducer(real_redis, "orders")
    consumer = StreamConsumer(real_redis, "orders", "billing", "w", handler)
    await consumer.ensure_group()
    with tracer.start_as_current_span("checkout") as request_span:
        await producer.add_many([{"n": 1}, {"n": 2}])
    assert await consumer.run_once() == 2
    trace_id = request_span.get_span_context().trace_id
    assert [ctx.trace_id for ctx in seen] == [trace_id, trace_id]


async def fields_of(redis: Redis, stream: str, entry_id: str) -> dict[bytes, bytes]:
    rows: Any = await redis.xrange(stream_keys(stream).stream, entry_id, entry_id)
    [(_, fields)] = rows
    return dict(fields)


async def test_entries_carry_no_trace_context_while_telemetry_is_off(real_redis: Redis) -> None:
    producer = StreamProducer(real_redis, "quiet")
    entry_id = await producer.add({"n": 1})
    assert set(await fields_of(real_redis, "quiet", entry_id)) == {b"payload"}

    with Capture():
        traced_id = await producer.add({"n": 2})
    fields = await fields_of(real_redis, "quiet", traced_id)
    assert set(fields) == {b"payload", b"traceparent"}
    assert fields[b"traceparent"].startswith(b"00-")


async def test_pubsub_reconnect_is_reported(real_redis: Redis, otel: Capture) -> None:
    async with Broadcaster(real_redis) as hub, hub.subscribe("news") as sub:
        assert await real_redis.client_kill_filter(_type="pubsub") == 1
        event = await sub.get(10)
        assert isinstance(event, Reconnected), event
    assert "lost" in otel.outcomes("pubsub.reconnect")
    assert otel.count("pubsub.reconnect", outcome="lost") >= 1


async def next_message(sub: Any) -> Message[Any]:
    event = await sub.get(10)
    assert isinstance(event, Message), event
    return event


@pytest.mark.parametrize("history", [0, 100], ids=["plain", "history"])
async def test_a_pubsub_message_carries_the_publishers_trace(
    real_redis: Redis, otel: Capture, history: int
) -> None:
    from app import observability

    tracer = otel.tracer_provider.get_tracer("user-code")
    async with Broadcaster(real_redis, history=history) as hub, hub.subscribe("news") as sub:
        with tracer.start_as_current_span("publish request") as request_span:
            await hub.publish("news", {"headline": "traced"})
        message = await next_message(sub)
        assert message.data == {"headline": "traced"}
        assert message.traceparent is not None
        with observability.continue_trace(message) as span:
            assert span is not None
            received = span.get_span_context()
        if history:  # a late subscriber replays it from the history, trace context included
            async with hub.subscribe("news", last_ids={"news": "0-0"}) as late:
                replayed = await next_message(late)
            assert replayed.data == {"headline": "traced"}
            assert replayed.traceparent == message.traceparent
    assert received.trace_id == request_span.get_span_context().trace_id
    publish = otel.span("pubsub.publish")
    assert publish.context is not None
    assert otel.span("pubsub.receive").parent.span_id == publish.context.span_id  # type: ignore[union-attr]


async def test_pubsub_messages_carry_no_trace_context_while_telemetry_is_off(
    real_redis: Redis,
) -> None:
    from app import observability

    async with Broadcaster(real_redis) as hub, hub.subscribe("quiet") as sub:
        await hub.publish("quiet", "plain")
        message = await next_message(sub)
    assert message.data == "plain" and message.traceparent is None
    with observability.continue_trace(message) as span:
        assert span is None
