"""A running consumer survives FLUSHALL and a Redis restart (NOGROUP, lost scripts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from app.services.streams import StreamConsumer, StreamMessage, StreamProducer
from app.testing.servers import RedisServer
from app.testing.waiting import eventually


class Recorder:
    def __init__(self) -> None:
        self.payloads: list[Any] = []

    async def __call__(self, message: StreamMessage[Any]) -> None:
        self.payloads.append(message.payload)


@pytest.fixture
async def private_server() -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone, so it can be restarted."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


async def test_flushall_under_a_running_consumer_recreates_the_group(real_redis: Redis) -> None:
    producer = StreamProducer(real_redis, "jobs")
    seen = Recorder()
    consumer = StreamConsumer(real_redis, "jobs", "g", "w", seen, block=0.2)
    task = asyncio.create_task(consumer.run())
    try:
        await producer.add("before")
        await eventually(lambda: seen.payloads == ["before"])
        await real_redis.flushall()
        await producer.add_many(["after-1", "after-2"])
        await eventually(lambda: len(seen.payloads) == 3)
    finally:
        await consumer.stop()
        await task
    assert seen.payloads == ["before", "after-1", "after-2"]
    assert consumer.counters.group_recreated >= 1
    assert (await consumer.stats()).pending == 0


async def test_a_redis_restart_under_a_running_consumer_is_survived(
    private_server: RedisServer,
) -> None:
    client = Redis.from_url(private_server.url, socket_timeout=1.0, socket_connect_timeout=0.5)
    producer = StreamProducer(client, "jobs")
    seen = Recorder()
    # A short claim_idle keeps the Lua scripts (autoclaim, lease renewal) running, so the
    # restart also makes them reload (NOSCRIPT).
    consumer = StreamConsumer(client, "jobs", "g", "w", seen, block=0.2, claim_idle=0.3)
    task = asyncio.create_task(consumer.run())
    try:
        await producer.add("before")
        await eventually(lambda: seen.payloads == ["before"])
        await asyncio.sleep(0.3)
        await asyncio.to_thread(private_server.restart)  # no persistence: data, group, scripts gone
        await producer.add_many(["after-1", "after-2"])
        await eventually(lambda: len(seen.payloads) == 3)
        await asyncio.sleep(0.3)  # an autoclaim pass on the restarted server
        stats = await consumer.stats()
    finally:
        await consumer.stop()
        await task
        await client.aclose()
    assert stats.pending == 0
    assert seen.payloads == ["before", "after-1", "after-2"]
    assert consumer.counters.group_recreated >= 1
