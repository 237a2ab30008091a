"""Streams on real Redis (standalone, Cluster, Sentinel): volume, retries, leases, stop, housekeeping."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.services.streams import StreamConsumer, StreamMessage, StreamProducer, stream_keys
from app.testing.clients import twin
from app.testing.waiting import eventually


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def pending_of(redis: Any, stream: str, group: str) -> int:
    return int((await redis.xpending(stream_keys(stream).stream, group))["pending"])


@pytest.fixture
def client(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


async def test_ten_thousand_entries_three_consumers_each_handled_once(
    topology_redis: Any,
) -> None:
    producer = StreamProducer(topology_redis, "load")
    ids: list[str] = []
    for chunk in range(10):
        ids += await producer.add_many({"n": chunk * 1000 + i} for i in range(1000))
    handled: Counter[str] = Counter()
    per_consumer: Counter[str] = Counter()

    async def handler(message: StreamMessage[Any]) -> None:
        await asyncio.sleep(0)
        handled[message.id] += 1
        per_consumer[message.consumer] += 1

    clients = [twin(topology_redis) for _ in range(3)]  # three "processes"
    consumers = [
        StreamConsumer(c, "load", "g", f"w{i}", handler, batch_size=100, concurrency=50)
        for i, c in enumerate(clients)
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        await eventually(lambda: sum(handled.values()) >= 10_000, timeout=60)
    finally:
        await asyncio.gather(*(c.stop() for c in consumers))
        await asyncio.gather(*tasks)
        stats = await consumers[0].stats()
        for c in clients:
            await c.aclose()
    assert len(ids) == 10_000
    assert set(handled) == set(ids)
    assert set(handled.values()) == {1}  # each entry processed exactly once
    assert len(per_consumer) == 3 and min(per_consumer.values()) > 0
    assert sum(c.counters.acked for c in consumers) == 10_000
    assert await topology_redis.xpending_range(stream_keys("load").stream, "g", "-", "+", 10) == []
    assert (stats.length, stats.pending, stats.lag) == (10_000, 0, 0)


async def test_an_always_failing_handler_lands_in_the_dead_letter_stream(client: Any) -> None:
    [entry_id] = await StreamProducer(client, "jobs").add_many([{"job": "doomed"}])
    deliveries: list[int] = []

    async def handler(message: StreamMessage[Any]) -> None:
        deliveries.append(message.deliveries)
        raise ValueError("downstream refused the job")

    c = StreamConsumer(
        client, "jobs", "g", "w", handler, max_deliveries=4, retry_backoff=0.05, block=0.1
    )
    task = asyncio.create_task(c.run())
    await eventually(lambda: c.counters.dead_lettered == 1)
    await c.stop()
    await task
    assert deliveries == [1, 2, 3, 4]
    [dead] = await c.dead_letters()
    assert dead.original_id == entry_id
    assert dead.payload == {"job": "doomed"}
    assert dead.deliveries == 4
    assert dead.error == "ValueError: downstream refused the job"
    assert await pending_of(client, "jobs", "g") == 0
    assert (await c.stats()).dead_letters == 1


async def test_a_handler_running_three_claim_idles_is_not_processed_twice(
    topology_redis: Any,
) -> None:
    claim_idle = 0.3
    calls: Counter[str] = Counter()

    async def long_job(message: StreamMessage[Any]) -> None:
        calls[message.id] += 1
        await asyncio.sleep(3 * claim_idle)

    clients = [twin(topology_redis) for _ in range(2)]
    consumers = [
        StreamConsumer(c, "jobs", "g", f"w{i}", long_job, claim_idle=claim_idle, block=0.05)
        for i, c in enumerate(clients)
    ]
    await consumers[0].ensure_group()
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    [entry_id] = await StreamProducer(topology_redis, "jobs").add_many(["long"])
    try:
        await eventually(lambda: sum(c.counters.acked for c in consumers) == 1)
        await asyncio.sleep(2 * claim_idle)  # room for a wrongful claim to show up
    finally:
        await asyncio.gather(*(c.stop() for c in consumers))
        await asyncio.gather(*tasks)
        for c in clients:
            await c.aclose()
    assert calls == {entry_id: 1}
    assert sum(c.counters.claimed for c in consumers) == 0
    assert sum(c.counters.lost_claims for c in consumers) == 0
    assert await pending_of(topology_redis, "jobs", "g") == 0


async def test_graceful_stop_acks_finished_handlers_and_leaves_the_rest_pending(
    client: Any,
) -> None:
    release, quick_done = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def handler(message: StreamMessage[Any]) -> None:
        if message.payload == "stuck":
            await release.wait()  # never set: still running at the deadline
        else:
            await quick_done.wait()  # set as the stop begins: they end well within its deadline
        finished.append(message.id)

    producer = StreamProducer(client, "jobs")
    c = StreamConsumer(client, "jobs", "g", "w", handler, concurrency=8, block=0.1)
    await c.ensure_group()
    quick = await producer.add_many(["quick"] * 3)
    stuck = await producer.add_many(["stuck"] * 2)
    task = asyncio.create_task(c.run())
    await eventually(lambda: c.in_flight == 5)
    quick_done.set()
    await c.stop(timeout=1.0)
    await task
    assert sorted(finished) == sorted(quick)
    rows = await client.xpending_range(stream_keys("jobs").stream, "g", "-", "+", 10)
    assert [_text(r["message_id"]) for r in rows] == stuck
    assert {_text(r["consumer"]) for r in rows} == {"w"}
    assert (c.counters.acked, c.counters.abandoned) == (3, 2)

    # A restart under the same name picks the unfinished entries up first.
    release.set()
    again = StreamConsumer(client, "jobs", "g", "w", handler)
    assert await again.run_once() == 2
    assert await pending_of(client, "jobs", "g") == 0


async def test_idle_entries_are_reclaimed_and_deleted_ones_skipped(client: Any) -> None:
    key = stream_keys("jobs").stream
    ids = await StreamProducer(client, "jobs").add_many(["a", "b", "c", "d"])
    seen: list[tuple[str, int]] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append((message.id, message.deliveries))

    c = StreamConsumer(client, "jobs", "g", "alive", handler, claim_idle=0.1)
    await c.ensure_group()
    await client.xreadgroup("g", "dead", {key: ">"}, count=4)
    await client.xdel(key, ids[2])
    await asyncio.sleep(0.15)
    assert await c.run_once() == 3
    assert seen == [(ids[0], 2), (ids[1], 2), (ids[3], 2)]
    assert (c.counters.claimed, c.counters.deleted) == (3, 1)
    assert await pending_of(client, "jobs", "g") == 0


async def test_own_pending_entries_are_recovered_before_new_ones(client: Any) -> None:
    key = stream_keys("jobs").stream
    producer = StreamProducer(client, "jobs")
    old = await producer.add("old")
    order: list[tuple[Any, int]] = []

    async def handler(message: StreamMessage[Any]) -> None:
        order.append((message.payload, message.deliveries))

    c = StreamConsumer(client, "jobs", "g", "w", handler)
    await c.ensure_group()
    await client.xreadgroup("g", "w", {key: ">"})  # an earlier life read it and crashed
    await producer.add("new")
    assert await c.run_once() == 2
    assert order == [("old", 2), ("new", 1)]
    assert old


async def test_stats_trim_and_janitor(client: Any) -> None:
    key = stream_keys("jobs").stream
    producer = StreamProducer(client, "jobs")
    ids = await producer.add_many(range(10))
    c = StreamConsumer(client, "jobs", "g", "janitor", _noop)
    await c.ensure_group()
    await client.xreadgroup("g", "gone", {key: ">"}, count=2)
    await client.xack(key, "g", *ids[:2])
    await client.xreadgroup("g", "slow", {key: ">"}, count=3)
    await asyncio.sleep(0.1)
    stats = await c.stats()
    assert (stats.length, stats.lag, stats.pending, stats.consumers) == (10, 5, 3, 2)
    assert stats.oldest_pending_id == ids[2]
    assert stats.oldest_pending_idle is not None and stats.oldest_pending_idle >= 0.05

    assert await producer.trim(maxlen=1) == 2  # only the acknowledged entries go
    assert await producer.length() == 8
    assert await c.remove_idle_consumers(idle=0.05) == ["gone"]
    assert (await c.stats()).consumers == 1


async def _noop(message: StreamMessage[Any]) -> None:
    return None


async def test_blocking_reads_never_hit_the_socket_timeout(topology_redis: Any) -> None:
    """XREADGROUP BLOCK on a quiet stream, through a Cluster client too."""
    client = twin(topology_redis, socket_timeout=1.0)
    seen: list[str] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append(message.id)

    c = StreamConsumer(client, "quiet", "g", "w", handler, block=5.0)
    assert c.block == 0.75
    task = asyncio.create_task(c.run())
    try:
        await asyncio.sleep(2.0)  # several blocking reads on an empty stream
        entry_id = await StreamProducer(client, "quiet").add("late")
        await eventually(lambda: seen == [entry_id])
    finally:
        await c.stop()
        await task
        await client.aclose()
    assert c.counters.redis_errors == 0


async def test_demo_routes_on_every_topology(
    topology_redis: Any, make_app_client: Callable[..., Awaitable[Any]]
) -> None:
    # topology_redis first: the app (and its demo consumer) stops before the client is closed.
    real_app_client = await make_app_client(None, topology_redis)
    created = await real_app_client.post("/streams/events", json={"payload": {"n": 1}})
    assert created.status_code == 201
    stats: dict[str, Any] = {}

    async def acked() -> bool:
        nonlocal stats
        stats = (await real_app_client.get("/streams/stats")).json()
        return bool(stats["counters"]["acked"] == 1)

    await eventually(acked, "the demo consumer to ack the entry")
    assert (stats["length"], stats["pending"], stats["lag"]) == (1, 0, 0)


async def test_add_many_is_one_command_per_thousand_entries_and_keeps_maxlen(
    real_redis: Any,
) -> None:
    async def calls() -> Counter[str]:
        stats = await real_redis.info("commandstats")
        return Counter({k: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_")})

    producer = StreamProducer(real_redis, "bulk", maxlen=2_000, approximate=False)
    await producer.add("warm")  # the script's first call may load it: not counted below
    await producer.add_many(["warm"])
    before = await calls()
    ids = await producer.add_many({"n": i} for i in range(2_500))
    sent = await calls() - before
    # Three script calls (1,000 + 1,000 + 500), each appending its entries inside Redis.
    assert sent["cmdstat_evalsha"] == 3 and sent["cmdstat_xadd"] == 2_500
    assert len(ids) == 2_500 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert await producer.length() == 2_000  # the exact trim ran on every append
    rows = await real_redis.xrange(stream_keys("bulk").stream, count=1)
    assert rows[0][0].decode() == ids[500]  # the oldest 500 (and the warm-ups) were trimmed
