"""Reading ahead on real Redis: the ``prefetch`` bound, fairness between consumers of one group,
coalesced acks, and a stop with a full local queue."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from redis.asyncio import Redis

from app.services.streams import StreamConsumer, StreamMessage, StreamProducer, stream_keys
from app.testing.clients import twin
from app.testing.servers import RedisServer
from app.testing.waiting import eventually

KEY = stream_keys("jobs").stream


async def pending_per_consumer(redis: Any) -> dict[str, int]:
    """The group's PEL by consumer: entries delivered and not yet acked."""
    summary = await redis.xpending(KEY, "g")
    return {_text(c["name"]): int(c["pending"]) for c in summary["consumers"]}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Gate:
    """A handler that records what it got and waits until the test opens the gate."""

    def __init__(self, redis: Any | None = None) -> None:
        self.open = asyncio.Event()
        self.seen: list[str] = []
        self.redis = redis
        self.pending_seen: list[int] = []  # this consumer's PEL size, read in each call

    async def __call__(self, message: StreamMessage[Any]) -> None:
        self.seen.append(message.id)
        if self.redis is not None:
            self.pending_seen.append((await pending_per_consumer(self.redis))[message.consumer])
        await self.open.wait()


async def test_a_consumer_never_holds_more_than_concurrency_plus_prefetch(
    real_redis: Redis,
) -> None:
    ids = await StreamProducer(real_redis, "jobs").add_many(range(60))
    handler = Gate(real_redis)
    consumer = StreamConsumer(
        real_redis, "jobs", "g", "w", handler, batch_size=10, concurrency=2, prefetch=3
    )
    samples: list[int] = []
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(8):
            # Handlers stuck: the consumer fills up to its bound (2 running + 3 queued) and
            # then reads nothing more, however much the stream holds.
            await eventually(lambda: consumer.in_flight == 2, "both slots busy")

            async def filled() -> bool:
                samples.append((await pending_per_consumer(real_redis)).get("w", 0))
                return samples[-1] == 5

            await eventually(filled, "concurrency + prefetch entries held")
            handler.open.set()  # a burst of progress, then stuck again
            await asyncio.sleep(0)
            handler.open.clear()
        handler.open.set()
        await eventually(lambda: consumer.counters.acked == 60, "every entry acked")
    finally:
        handler.open.set()
        await consumer.stop()
        await task
    assert max(samples + handler.pending_seen) == 5  # reached, never exceeded
    assert sorted(handler.seen) == sorted(ids) and len(handler.seen) == 60


async def test_an_idle_consumer_gets_the_work_a_busy_one_cannot_take(real_redis: Redis) -> None:
    ids = await StreamProducer(real_redis, "jobs").add_many(range(40))
    slow = Gate()
    fast_seen: Counter[str] = Counter()

    async def fast(message: StreamMessage[Any]) -> None:
        fast_seen[message.id] += 1

    options: dict[str, Any] = {"batch_size": 10, "concurrency": 2, "prefetch": 3}
    busy = StreamConsumer(real_redis, "jobs", "g", "busy", slow, **options)
    other = twin(real_redis)
    idle = StreamConsumer(other, "jobs", "g", "idle", fast, **options)
    tasks = [asyncio.create_task(busy.run())]
    try:
        await eventually(lambda: busy.in_flight == 2, "the busy consumer's slots taken")

        async def busy_full() -> bool:
            return (await pending_per_consumer(real_redis)).get("busy") == 5

        await eventually(busy_full, "the busy consumer holds its bound")
        tasks.append(asyncio.create_task(idle.run()))
        # Everything the busy consumer does not hold goes to the idle one, long before any
        # claim_idle: it was never handed to the busy consumer.
        await eventually(lambda: sum(fast_seen.values()) == 35, "the rest handled elsewhere")
        assert (await pending_per_consumer(real_redis)).get("busy") == 5  # no hoarding
        assert len(slow.seen) == 2  # two running, three queued, none started meanwhile
        slow.open.set()
        await eventually(lambda: busy.counters.acked == 5, "the busy consumer's five acked")
    finally:
        slow.open.set()
        await asyncio.gather(busy.stop(), idle.stop())
        await asyncio.gather(*tasks)
        await other.aclose()
    assert set(fast_seen.values()) == {1}
    assert sorted([*fast_seen, *slow.seen]) == sorted(ids)  # each entry handled once
    assert busy.counters.claimed == idle.counters.claimed == 0
    assert await pending_per_consumer(real_redis) == {}


def _calls(info: dict[str, Any], command: str) -> int:
    stats = info.get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


async def test_acks_are_coalesced_one_xack_per_batch_at_most(
    private_server: RedisServer,
) -> None:
    client = Redis.from_url(private_server.url)
    producer = StreamProducer(client, "jobs")
    await producer.add_many(range(160))
    handled = 0

    async def handler(message: StreamMessage[Any]) -> None:
        nonlocal handled
        handled += 1

    consumer = StreamConsumer(client, "jobs", "g", "w", handler)  # the defaults
    await consumer.ensure_group()
    await client.config_resetstat()
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: consumer.counters.acked == 160, "every entry acked")
    finally:
        await consumer.stop()
        await task
    info = await client.info("commandstats")
    await client.aclose()
    xacks, reads = _calls(info, "xack"), _calls(info, "xreadgroup")
    assert handled == 160
    assert 1 <= xacks <= reads  # every batch's acks in one XACK, or fewer still
    assert xacks <= 160 // 4  # far from one per entry (about 12 entries per XACK here)


async def test_stop_with_a_full_local_queue_loses_nothing(real_redis: Redis) -> None:
    ids = await StreamProducer(real_redis, "jobs").add_many(range(10))
    handler = Gate()
    consumer = StreamConsumer(
        real_redis, "jobs", "g", "w", handler, batch_size=10, concurrency=1, prefetch=5
    )
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: consumer.in_flight == 1, "the one slot busy")

        async def held() -> bool:
            return (await pending_per_consumer(real_redis)).get("w") == 6

        await eventually(held, "one running, five queued")
        stopping = asyncio.create_task(consumer.stop())
        await eventually(lambda: consumer._runner.stopping, "stop() under way")
        handler.open.set()  # the running handler finishes within the stop timeout
        await stopping
    finally:
        handler.open.set()
        await consumer.stop()
        await task
    assert handler.seen == ids[:1]  # queued entries were not started after stop()
    assert consumer.counters.released == 5
    assert consumer.counters.acked == 1
    rows = await real_redis.xpending_range(KEY, "g", "-", "+", 100, "w")
    assert [_text(r["message_id"]) for r in rows] == ids[1:6]  # still pending for "w"
    assert [r["times_delivered"] for r in rows] == [1] * 5

    # The same consumer restarted: the released entries come back, then the rest is read.
    again: Counter[str] = Counter()
    deliveries: dict[str, int] = {}

    async def record(message: StreamMessage[Any]) -> None:
        again[message.id] += 1
        deliveries[message.id] = message.deliveries

    restarted = StreamConsumer(real_redis, "jobs", "g", "w", record, batch_size=10)
    task = asyncio.create_task(restarted.run())
    try:
        await eventually(lambda: sum(again.values()) == 9, "the other nine handled")
    finally:
        await restarted.stop()
        await task
    assert sorted(again) == sorted(ids[1:]) and set(again.values()) == {1}
    assert [deliveries[i] for i in ids[1:6]] == [2] * 5  # re-delivered: one more delivery
    assert restarted.counters.recovered == 5
    assert await pending_per_consumer(real_redis) == {}
