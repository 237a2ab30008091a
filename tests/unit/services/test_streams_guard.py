"""Streams through the guard (fakeredis with Lua): refused commands, the breaker, recovery
after an outage, NOGROUP read from the refusal's cause, and duration validation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ResponseError

from app.core.breaker import breaker_for
from app.core.errors import ConfigurationError, RedisUnavailable, StreamError
from app.services.streams import (
    StreamConsumer,
    StreamMessage,
    StreamProducer,
    stream_keys,
    trim_stream,
)
from app.testing.slots import slot_checking_fake_redis
from app.testing.waiting import eventually

Call = Callable[[StreamProducer, StreamConsumer[Any]], Awaitable[Any]]

# Every public verb that talks to Redis (the ones marked * skipped the breaker before).
CALLS: dict[str, Call] = {
    "add": lambda p, c: p.add({"n": 1}),
    "add_many": lambda p, c: p.add_many([1, 2]),
    "length*": lambda p, c: p.length(),
    "trim*": lambda p, c: p.trim(maxlen=1),
    "trim_stream*": lambda p, c: trim_stream(p.redis, "events", maxlen=1),
    "ensure_group*": lambda p, c: c.ensure_group(),
    "run_once*": lambda p, c: c.run_once(),
    "stats*": lambda p, c: c.stats(),
    "remove_idle_consumers*": lambda p, c: c.remove_idle_consumers(60),
    "dead_letters*": lambda p, c: c.dead_letters(),
}
REFUSABLE = {k: v for k, v in CALLS.items() if k != "stats*"}  # stats reads errors as zeros


async def _ignore(message: StreamMessage[Any]) -> None:
    return None


@pytest.fixture
async def make_client(
    settings_override: Callable[..., None],
) -> AsyncIterator[Callable[..., tuple[Any, fakeredis.FakeServer]]]:
    """``make_client(threshold, reset, **options)``: a fake client (and its server) whose
    breaker has these settings."""
    made: list[tuple[Any, fakeredis.FakeServer]] = []

    def make(
        threshold: int = 1, reset: float = 60.0, **options: Any
    ) -> tuple[Any, fakeredis.FakeServer]:
        settings_override(breaker_failure_threshold=threshold, breaker_reset_timeout=reset)
        server = fakeredis.FakeServer()
        made.append((slot_checking_fake_redis(server=server, **options), server))
        return made[-1]

    yield make
    for client, server in made:
        server.connected = True
        await client.aclose()


@pytest.mark.parametrize("call", REFUSABLE.values(), ids=REFUSABLE.keys())
async def test_a_refused_command_is_a_stream_error_without_the_redis_text(
    call: Call, make_client: Callable[..., tuple[Any, fakeredis.FakeServer]]
) -> None:
    client, _ = make_client()
    keys = stream_keys("events")
    await client.set(keys.stream, "not a stream")
    await client.set(keys.dead_letter, "not a stream either")
    producer = StreamProducer(client, "events")
    consumer = StreamConsumer(client, "events", "g", "w", _ignore)
    with pytest.raises(StreamError) as caught:
        await call(producer, consumer)
    assert str(caught.value).startswith("stream 'events'")
    assert "WRONGTYPE" not in str(caught.value)  # Redis's text stays in the cause, for logs
    assert isinstance(caught.value.__cause__, ResponseError)
    assert breaker_for(client).state == "closed"  # Redis answered: not an outage


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_every_call_goes_through_the_breaker(
    call: Call, make_client: Callable[..., tuple[Any, fakeredis.FakeServer]]
) -> None:
    client, server = make_client(threshold=1, reset=60.0)
    producer = StreamProducer(client, "events")
    consumer = StreamConsumer(client, "events", "g", "w", _ignore)
    server.connected = False
    with pytest.raises(RedisUnavailable, match="Redis is unreachable"):
        await producer.length()  # one failure opens this breaker
    server.connected = True  # Redis answers again, but the breaker is open for a minute
    with pytest.raises(RedisUnavailable, match="circuit breaker") as caught:
        await call(producer, consumer)
    assert caught.value.retry_after == 60.0
    assert breaker_for(client).rejected == 1


async def test_a_running_consumer_recovers_after_an_outage(
    make_client: Callable[..., tuple[Any, fakeredis.FakeServer]],
) -> None:
    client, server = make_client(threshold=1, reset=0.05)
    seen: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append(message.payload)

    producer = StreamProducer(client, "events")
    consumer = StreamConsumer(client, "events", "g", "w", handler, block=0.05)
    task = asyncio.create_task(consumer.run())
    try:
        await producer.add("before")
        await eventually(lambda: seen == ["before"], "the first entry handled")
        server.connected = False
        await eventually(lambda: consumer.counters.redis_errors >= 3, "failed turns")
        assert consumer.running
        server.connected = True

        async def added() -> bool:
            try:
                await producer.add("after")
            except RedisUnavailable:
                return False  # the breaker is still open; it lets a trial through soon
            return True

        await eventually(added, "the producer served again")
        await eventually(lambda: seen == ["before", "after"], "the consumer served again")
    finally:
        await consumer.stop()
        await task
    assert (await consumer.stats()).pending == 0


# (prefetch, entries): the loop stops calling Redis once it holds concurrency + prefetch
# entries: with prefetch=0 when every handler slot is busy; with the default prefetch
# (31 here: two batches of 16 with concurrency=1) once 1 + 31 entries are running or queued.
HELD_IN_FULL = {"prefetch=0": (0, 1), "default prefetch": (None, 32)}


@pytest.mark.parametrize(("prefetch", "entries"), HELD_IN_FULL.values(), ids=HELD_IN_FULL.keys())
async def test_the_consumers_blocking_read_never_holds_the_half_open_trial(
    prefetch: int | None,
    entries: int,
    make_client: Callable[..., tuple[Any, fakeredis.FakeServer]],
) -> None:
    client, server = make_client(threshold=1, reset=0.1, socket_timeout=None)  # reads uncapped
    breaker = breaker_for(client)
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(message: StreamMessage[Any]) -> None:
        started.set()
        await release.wait()
        raise RuntimeError("fails; retried much later")

    producer = StreamProducer(client, "events")
    # Nothing else is due for minutes: once the handler fails, the loop's next Redis call
    # is a read that may block for two minutes.
    consumer = StreamConsumer(
        client,
        "events",
        "g",
        "w",
        handler,
        concurrency=1,
        prefetch=prefetch,
        block=120,
        claim_idle=600,
        retry_backoff=300,
        retry_backoff_max=300,
        consumer_idle_timeout=None,
    )
    task = asyncio.create_task(consumer.run())
    try:
        await producer.add_many(["slow"] * entries)
        await started.wait()
        # Every slot busy and the local queue full: the loop waits without Redis calls.
        await eventually(lambda: consumer._room() == 0, "concurrency + prefetch entries held")
        server.connected = False
        with pytest.raises(RedisUnavailable):
            await producer.length()  # opens the breaker
        server.connected = True
        await eventually(lambda: breaker.state == "half_open", "the breaker half-open")
        release.set()  # the slot frees: the loop reads, and its read is the trial call
        await eventually(lambda: breaker.state == "closed", "the trial over", timeout=10)
        assert await producer.length() == entries  # nobody is kept refused
    finally:
        await consumer.stop()
        await task
        await producer.add("ends the read that stop() abandoned")  # fakeredis still waits


async def test_nogroup_is_recognised_through_the_guard(
    make_client: Callable[..., tuple[Any, fakeredis.FakeServer]],
) -> None:
    client, _ = make_client()
    seen: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append(message.payload)

    producer = StreamProducer(client, "events")
    consumer = StreamConsumer(client, "events", "g", "w", handler, block=0.05)
    task = asyncio.create_task(consumer.run())
    try:
        await producer.add("before")
        await eventually(lambda: seen == ["before"], "the first entry handled")
        await client.flushall()  # the group is gone: the loop's next read says NOGROUP
        await producer.add("after")
        assert await consumer.remove_idle_consumers(60) == []  # the janitor: NOGROUP is empty
        await eventually(lambda: seen == ["before", "after"], "the entry after the flush")
    finally:
        await consumer.stop()
        await task
    assert consumer.counters.group_recreated >= 1


@pytest.mark.parametrize(
    "options",
    [
        {"block": float("nan")},
        {"block": 0},
        {"claim_idle": "30"},
        {"claim_idle": True},
        {"retry_backoff": -1},
        {"shutdown_timeout": float("inf")},
        {"consumer_idle_timeout": timedelta(seconds=-1)},
    ],
    ids=str,
)
def test_bad_durations_are_configuration_errors(options: dict[str, Any]) -> None:
    client = slot_checking_fake_redis()
    with pytest.raises(ConfigurationError):
        StreamConsumer(client, "events", "g", "w", _ignore, **options)


async def test_durations_accept_timedelta() -> None:
    client = slot_checking_fake_redis()
    consumer = StreamConsumer(
        client,
        "events",
        "g",
        "w",
        _ignore,
        block=timedelta(milliseconds=250),
        claim_idle=timedelta(seconds=1.0004),
    )
    assert consumer.block == 0.25
    assert consumer._claim_idle_ms == 1001  # rounded up: a lease is never shorter than asked
    with pytest.raises(ConfigurationError):
        await consumer.run_once(block=-1)
    with pytest.raises(ConfigurationError):
        await consumer.remove_idle_consumers(float("nan"))
    await client.aclose()
