"""Each service operation emits its documented span and metrics, on fakeredis and real Redis.

The span names, attributes and outcomes asserted here are the ones docs/operations.md ("Metrics and traces")
documents; the metric is ``toolkit.operations`` (a counter by operation and outcome) and
``toolkit.operation.duration`` (a histogram).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.errors import LockNotOwned, SessionConflict
from app.observability.testing import Capture
from app.services.cache import CacheService
from app.services.idempotency import IdempotencyService
from app.services.locks import RedisLock, Semaphore
from app.services.pubsub import Broadcaster
from app.services.rate_limit import RateLimiter
from app.services.sessions import SessionStore
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer
from app.testing.waiting import eventually


@pytest.fixture
def otel() -> Iterator[Capture]:
    with Capture() as capture:
        yield capture


def attrs(otel: Capture, name: str) -> dict[str, Any]:
    return dict(otel.span(name).attributes or {})


async def test_cache_get_and_set_report_miss_hit_and_namespace(
    any_redis: Any, otel: Capture
) -> None:
    cache = CacheService(any_redis, namespace="users")
    assert await cache.get("u:1") is None
    await cache.set("u:1", {"id": 1}, ttl=60)
    assert await cache.get("u:1") == {"id": 1}

    assert otel.outcomes("cache.get") == ["miss", "hit"]
    get = attrs(otel, "cache.get")
    assert get["db.system.name"] == "redis"
    assert get["toolkit.cache.namespace"] == "users"
    assert "u:1" not in str(get)  # keys never reach telemetry
    assert otel.outcomes("cache.set") == ["ok"]
    assert otel.count("cache.get", outcome="hit", **{"toolkit.cache.namespace": "users"}) == 1
    assert otel.count("cache.get", outcome="miss") == 1
    assert otel.durations("cache.get") == 2


async def test_cache_get_or_set_reports_computed_hit_and_stale(
    any_redis: Any, otel: Capture
) -> None:
    cache = CacheService(any_redis)
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await cache.get_or_set("k", load, ttl=60) == 1
    assert await cache.get_or_set("k", load, ttl=60) == 1
    assert otel.outcomes("cache.get_or_set") == ["computed", "hit"]

    await cache.set("s", 0, ttl=0.05, stale_ttl=60)

    async def served_stale() -> bool:
        await cache.get_or_set("s", load, ttl=0.05, stale_ttl=60)
        return otel.outcomes("cache.get_or_set")[-1] == "stale"

    await eventually(served_stale, "get_or_set serves the entry as stale once its ttl is over")
    assert otel.count("cache.get_or_set", outcome="stale") >= 1


async def test_cache_single_flight_waits_are_reported(any_redis: Any, otel: Capture) -> None:
    # two services on one client behave as two processes: the second waits on the lease
    first, second = CacheService(any_redis), CacheService(any_redis)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "v"

    async def never() -> str:
        raise AssertionError("the waiting caller must not compute")

    leader = asyncio.create_task(first.get_or_set("hot", slow, ttl=60, wait_timeout=30))
    await started.wait()
    waiter = asyncio.create_task(second.get_or_set("hot", never, ttl=60, wait_timeout=30))
    await eventually(lambda: second.stats()["stampede_waits"] == 1, "the second caller waits")
    release.set()
    assert await leader == "v"
    assert await waiter == "v"
    assert sorted(otel.outcomes("cache.get_or_set")) == ["computed", "waited"]

    # in one process a concurrent caller shares the computation
    gate, computing = asyncio.Event(), asyncio.Event()

    async def gated() -> str:
        computing.set()
        await gate.wait()
        return "w"

    one = asyncio.create_task(first.get_or_set("warm", gated, ttl=60))
    await computing.wait()
    two = asyncio.create_task(first.get_or_set("warm", gated, ttl=60))
    await eventually(lambda: first.stats()["coalesced"] == 1, "the second caller joins")
    gate.set()
    assert list(await asyncio.gather(one, two)) == ["w", "w"]
    assert otel.count("cache.get_or_set", outcome="coalesced") == 1


async def test_rate_limit_check_reports_policy_and_decision(any_redis: Any, otel: Capture) -> None:
    limiter = RateLimiter(any_redis, max_requests=1, window_seconds=60)
    assert await limiter.is_allowed("client-9")
    assert not await limiter.is_allowed("client-9")
    decision = await limiter.hit("client-9")
    assert not decision.allowed

    assert otel.outcomes("ratelimit.check") == ["allowed", "rejected", "rejected"]
    span = attrs(otel, "ratelimit.check")
    assert span["toolkit.ratelimit.policy"] == "1-per-minute"
    assert "client-9" not in str(span)
    policy = {"toolkit.ratelimit.policy": "1-per-minute"}
    assert otel.count("ratelimit.check", outcome="rejected", **policy) == 2
    assert otel.count("ratelimit.check", outcome="allowed", **policy) == 1


async def test_lock_acquire_release_timeout_and_not_owned(any_redis: Any, otel: Capture) -> None:
    holder = RedisLock(any_redis, "jobs:42", timeout=30)
    other = RedisLock(any_redis, "jobs:42", timeout=30)
    assert await holder.acquire()
    assert not await other.acquire(blocking=True, blocking_timeout=0.05)
    await holder.release()
    with pytest.raises(LockNotOwned):
        await holder.release()

    assert otel.outcomes("lock.acquire") == ["acquired", "timeout"]
    assert attrs(otel, "lock.acquire")["toolkit.lock.name"] == "jobs:42"
    assert otel.outcomes("lock.release") == ["released", "not_owned"]
    assert otel.count("lock.acquire", outcome="timeout") == 1
    assert otel.durations("lock.acquire") == 2  # the wait histogram
    # lock names stay on spans: never a metric attribute (unbounded cardinality)
    assert all("toolkit.lock.name" not in labels for labels, _ in otel.points("toolkit.operations"))


async def test_semaphore_permits_are_lock_acquires_of_kind_semaphore(
    any_redis: Any, otel: Capture
) -> None:
    exports = Semaphore(any_redis, "exports", limit=1, timeout=30)
    permit = await exports.acquire()
    assert permit is not None
    assert await exports.acquire(blocking=True, blocking_timeout=0.05) is None
    await permit.release()
    assert otel.outcomes("lock.acquire") == ["acquired", "timeout"]
    span = attrs(otel, "lock.acquire")
    assert span["toolkit.lock.kind"] == "semaphore" and span["toolkit.lock.name"] == "exports"
    assert otel.outcomes("lock.release") == ["released"]


async def test_lock_lost_is_reported(any_redis: Any, otel: Capture) -> None:
    lock = RedisLock(any_redis, "report", timeout=1, auto_renew=True, renew_interval=0.05)
    assert await lock.acquire()
    await any_redis.delete(lock.key)  # another party removed it: the watchdog finds it gone
    await eventually(lambda: otel.outcomes("lock.lost") == ["lost"], "lock.lost is reported")
    assert attrs(otel, "lock.lost")["toolkit.lock.name"] == "report"
    with pytest.raises(LockNotOwned):
        await lock.release()


async def test_idempotency_claim_outcomes(any_redis: Any, otel: Capture) -> None:
    svc = IdempotencyService(any_redis, ttl=60)
    claim = await svc.claim("order-1", "fp-a")
    assert claim.is_new and claim.token is not None
    assert (await svc.claim("order-1", "fp-a")).status == "in_flight"
    assert (await svc.claim("order-1", "fp-b")).status == "mismatch"
    await svc.complete("order-1", claim.token, {"ok": True})
    assert (await svc.claim("order-1", "fp-a")).status == "completed"

    assert otel.outcomes("idempotency.claim") == ["new", "conflict", "mismatch", "replay"]
    assert "order-1" not in str(attrs(otel, "idempotency.claim"))
    for outcome in ("new", "conflict", "mismatch", "replay"):
        assert otel.count("idempotency.claim", outcome=outcome) == 1


async def test_session_load_save_and_conflict(any_redis: Any, otel: Capture) -> None:
    store = SessionStore(any_redis)
    record = await store.create(data={"user": 1})
    assert (await store.load(record.id)) is not None
    assert (await store.load("missing-id")) is None
    await store.update(record.id, data={"user": 2}, expected_version=record.version)
    with pytest.raises(SessionConflict):
        await store.update(record.id, data={"user": 3}, expected_version=record.version)

    assert otel.outcomes("session.load") == ["found", "missing"]
    assert otel.outcomes("session.save") == ["saved", "saved", "conflict"]
    assert otel.count("session.save", outcome="conflict", **{"error.type": "SessionConflict"}) == 1
    assert record.id not in str([s.attributes for s in otel.spans()])


async def test_stream_produce_consume_handle_retry_and_dead_letter(
    any_redis: Any, otel: Capture
) -> None:
    producer = StreamProducer(any_redis, "jobs")
    handled: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        if message.payload.get("fail"):
            raise RuntimeError("asked to fail")
        handled.append(message.payload)

    consumer = StreamConsumer(
        any_redis, "jobs", "workers", "w1", handler, max_deliveries=2, retry_backoff=0.01
    )
    await consumer.ensure_group()
    entry_id = await producer.add({"n": 1})
    await consumer.run_once()
    assert handled == [{"n": 1}]

    produce = attrs(otel, "stream.produce")
    assert produce["messaging.destination.name"] == "jobs"
    assert otel.span("stream.produce").kind.name == "PRODUCER"
    handle = otel.span("stream.handle")
    assert handle.kind.name == "CONSUMER"
    assert (handle.attributes or {})["messaging.message.id"] == entry_id
    assert (handle.attributes or {})["messaging.consumer.group.name"] == "workers"
    assert otel.outcomes("stream.consume") == ["received"]
    assert otel.outcomes("stream.handle") == ["ok"]

    await producer.add({"fail": True})

    async def dead_lettered() -> bool:
        await consumer.run_once()
        return bool(otel.spans("stream.dead_letter"))

    await eventually(dead_lettered, "the failing entry reaches the dead-letter stream")
    assert otel.outcomes("stream.handle")[1:] == ["failed", "failed"]
    assert otel.outcomes("stream.retry") == ["ok"]
    assert otel.outcomes("stream.dead_letter") == ["moved"]
    failed = otel.spans("stream.handle")[-1]
    assert (failed.attributes or {})["error.type"] == "RuntimeError"
    assert failed.status.status_code.name == "ERROR"
    assert (
        otel.count("stream.handle", outcome="failed", **{"messaging.destination.name": "jobs"}) == 2
    )

    # gauges: a scrape-time sample of lag, pending and dead letters
    from app import observability

    await observability.refresh(consumer)  # run_once consumers are named; running ones found
    group = {"messaging.destination.name": "jobs", "messaging.consumer.group.name": "workers"}
    assert otel.gauge("toolkit.stream.dead_letters", **group) == [1]
    assert otel.gauge("toolkit.stream.pending", **group) == [0]
    assert otel.gauge("toolkit.stream.lag", **group) == [0]


async def test_pubsub_publish_is_reported_without_the_channel_as_metric(
    any_redis: Any, otel: Capture
) -> None:
    async with Broadcaster(any_redis) as hub:
        await hub.publish("user:7:feed", {"x": 1})
    assert otel.outcomes("pubsub.publish") == ["ok"]
    assert attrs(otel, "pubsub.publish")["toolkit.pubsub.channel"] == "user:7:feed"
    assert otel.count("pubsub.publish", outcome="ok") == 1
    assert "user:7:feed" not in str(list(otel.points("toolkit.operations")))


async def test_a_running_consumer_reports_its_reads_and_handling(
    any_redis: Any, otel: Capture
) -> None:
    handled: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        handled.append(message.payload)

    consumer = StreamConsumer(any_redis, "live", "workers", "w1", handler, block=0.05)
    await consumer.ensure_group()
    runner = asyncio.create_task(consumer.run())
    try:
        await StreamProducer(any_redis, "live").add({"n": 1})
        await eventually(lambda: otel.outcomes("stream.handle") == ["ok"], "the entry is handled")
    finally:
        await consumer.stop()
        await runner
    assert handled == [{"n": 1}]
    assert "received" in otel.outcomes("stream.consume")
    consume = attrs(otel, "stream.consume")
    assert consume["messaging.consumer.group.name"] == "workers"
