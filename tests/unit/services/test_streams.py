"""Streams on fakeredis: producer, consumer loop, retries, dead letters, housekeeping, demo."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from pydantic import BaseModel

from app.core.errors import ConfigurationError, StreamError
from app.services.streams import (
    StreamConsumer,
    StreamMessage,
    StreamProducer,
    default_consumer_name,
    stream_keys,
    trim_stream,
)
from app.testing.slots import slot_checking_fake_redis
from app.testing.waiting import DEFAULT_DEADLINE, eventually
from app.worker import load_handler, serve

Seen = list[tuple[str, Any, int]]


@pytest.fixture
def redis(fake_client: Any) -> Any:
    """fakeredis with decode_responses False and True (every test runs on both)."""
    return fake_client


def recorder(seen: Seen, fail: Callable[[StreamMessage[Any]], bool] = lambda m: False) -> Any:
    async def handler(message: StreamMessage[Any]) -> None:
        seen.append((message.id, message.payload, message.deliveries))
        if fail(message):
            raise RuntimeError(f"cannot handle {message.payload}")

    return handler


def consumer(
    redis: Any, handler: Any, name: str = "worker-1", **options: Any
) -> StreamConsumer[Any]:
    options.setdefault("retry_backoff", 0)
    return StreamConsumer(redis, "events", "group", name, handler, **options)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def pending(redis: Any, group: str = "group") -> int:
    return int((await redis.xpending(stream_keys("events").stream, group))["pending"])


class Order(BaseModel):
    id: int
    sku: str


# -- producer -----------------------------------------------------------------


async def test_add_returns_the_entry_id_and_the_payload_round_trips(redis: Any) -> None:
    producer = StreamProducer(redis, "events", maxlen=10_000)
    entry_id = await producer.add({"n": 1, "tags": {"a", "b"}})
    assert isinstance(entry_id, str) and "-" in entry_id
    seen: Seen = []
    c = consumer(redis, recorder(seen))
    await c.ensure_group()
    assert await c.run_once() == 1
    assert seen == [(entry_id, {"n": 1, "tags": {"a", "b"}}, 1)]


async def test_add_many_appends_in_order_in_one_call(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    ids = await producer.add_many({"n": i} for i in range(50))
    assert len(ids) == 50 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert await producer.length() == 50
    assert await producer.add_many([]) == []


async def test_maxlen_bounds_the_stream(redis: Any) -> None:
    exact = StreamProducer(redis, "events", maxlen=5, approximate=False)
    await exact.add_many(range(20))
    assert await exact.length() == 5
    approx = StreamProducer(redis, "other", maxlen=5)
    for i in range(300):
        await approx.add(i)
    assert 5 <= await approx.length() < 300


async def test_keys_share_one_hash_tag() -> None:
    keys = stream_keys("orders:eu")
    assert keys.stream == "app:stream:{orders%3Aeu}"
    assert keys.dead_letter == "app:stream:{orders%3Aeu}:dlq"


# -- consuming ------------------------------------------------------------------


async def test_ensure_group_creates_the_stream_and_tolerates_busygroup(redis: Any) -> None:
    c = consumer(redis, recorder([]))
    assert await c.ensure_group() is True
    assert await c.ensure_group() is False
    assert await redis.exists(stream_keys("events").stream) == 1


async def test_run_once_handles_acks_and_returns_the_count(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    ids = await producer.add_many({"n": i} for i in range(5))
    seen: Seen = []
    c = consumer(redis, recorder(seen), batch_size=3, concurrency=2)
    await c.ensure_group()
    assert await c.run_once() == 3
    assert await c.run_once() == 2
    assert await c.run_once() == 0
    assert [s[0] for s in seen] == ids
    assert await pending(redis) == 0
    assert c.counters.acked == 5


async def test_at_most_concurrency_handlers_run_at_once_however_much_is_read(
    redis: Any,
) -> None:
    await StreamProducer(redis, "events").add_many(range(12))
    running, most = 0, 0
    handled: list[int] = []

    async def handler(message: StreamMessage[Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        for _ in range(3):  # waits: the other queued entries get their own workers
            await asyncio.sleep(0)
        running -= 1
        handled.append(message.payload)

    c = consumer(redis, handler, batch_size=12, concurrency=3, prefetch=9)
    assert await c.run_once() == 12
    assert most == 3  # every slot used, never more
    assert sorted(handled) == list(range(12))
    assert await pending(redis) == 0


async def test_a_queued_entry_another_consumer_claimed_is_not_started(redis: Any) -> None:
    ids = await StreamProducer(redis, "events").add_many(range(3))
    release = asyncio.Event()
    seen: list[str] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append(message.id)
        await release.wait()

    c = consumer(
        redis, handler, concurrency=1, prefetch=2, claim_idle=5, renew_interval=0.05, block=0.05
    )
    task = asyncio.create_task(c.run())
    try:
        await eventually(lambda: seen == ids[:1] and c._room() == 0, "one running, two queued")
        # Another consumer takes the second entry while it waits in this one's queue.
        await redis.xclaim(stream_keys("events").stream, "group", "other", 0, [ids[1]])
        await eventually(lambda: c.counters.lost_claims == 1, "the lease renewal notices")
        release.set()
        await eventually(lambda: c.counters.acked == 2, "the other two handled")
    finally:
        release.set()
        await c.stop()
        await task
    assert seen == [ids[0], ids[2]]  # never started: it is the other consumer's now


async def test_run_once_creates_a_missing_group(redis: Any) -> None:
    await StreamProducer(redis, "events").add({"n": 1})
    seen: Seen = []
    assert await consumer(redis, recorder(seen)).run_once() == 1
    assert len(seen) == 1


async def test_start_id_dollar_skips_older_entries(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    await producer.add("old")
    seen: Seen = []
    c = consumer(redis, recorder(seen), start_id="$")
    await c.ensure_group()
    await producer.add("new")
    await c.run_once()
    assert [s[1] for s in seen] == ["new"]


async def test_typed_payloads_decode_into_the_model(redis: Any) -> None:
    await StreamProducer(redis, "events").add(Order(id=7, sku="X-1"))
    got: list[Order] = []

    async def handler(message: StreamMessage[Order]) -> None:
        got.append(message.payload)

    c: StreamConsumer[Order] = StreamConsumer(
        redis, "events", "group", "w", handler, payload_type=Order
    )
    assert await c.run_once() == 1
    assert got == [Order(id=7, sku="X-1")]


async def test_entries_from_other_producers_expose_their_fields(redis: Any) -> None:
    await redis.xadd(stream_keys("events").stream, {"kind": "signup", "user": "42"})
    seen: Seen = []
    assert await consumer(redis, recorder(seen)).run_once() == 1
    assert seen[0][1] == {"kind": "signup", "user": "42"}


async def test_a_failing_handler_is_retried_then_dead_lettered(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    bad = await producer.add({"n": "bad"})
    good = await producer.add({"n": "good"})
    seen: Seen = []
    c = consumer(redis, recorder(seen, fail=lambda m: m.payload["n"] == "bad"), max_deliveries=3)
    rounds = [await c.run_once() for _ in range(4)]
    assert rounds == [2, 1, 1, 0]
    assert [(i, n) for i, _, n in seen if i == bad] == [(bad, 1), (bad, 2), (bad, 3)]
    assert [(i, n) for i, _, n in seen if i == good] == [(good, 1)]
    assert await pending(redis) == 0
    [dead] = await c.dead_letters()
    assert (dead.original_id, dead.payload, dead.deliveries) == (bad, {"n": "bad"}, 3)
    assert dead.error == "RuntimeError: cannot handle {'n': 'bad'}"
    assert (dead.consumer, dead.group, dead.stream) == ("worker-1", "group", "events")
    stats = await c.stats()
    assert (stats.dead_letters, stats.pending, c.counters.dead_lettered) == (1, 0, 1)


async def test_a_retry_waits_for_its_backoff(redis: Any) -> None:
    await StreamProducer(redis, "events").add({"n": 1})
    seen: Seen = []
    c = consumer(redis, recorder(seen, fail=lambda m: True), retry_backoff=30)
    assert await c.run_once() == 1
    assert await c.run_once() == 0  # not due yet: still pending, held by this consumer
    stats = await c.stats()
    assert (stats.pending, stats.waiting_retry, c.counters.retried) == (1, 1, 1)


async def test_an_undecodable_payload_is_dead_lettered_without_calling_the_handler(
    redis: Any,
) -> None:
    await redis.xadd(stream_keys("events").stream, {"payload": "\x01j-{not json"})
    seen: Seen = []
    c = consumer(redis, recorder(seen))
    assert await c.run_once() == 1
    assert seen == []
    [dead] = await c.dead_letters()
    assert dead.error.startswith("undecodable payload")
    assert dead.deliveries == 1
    assert await pending(redis) == 0


async def test_own_pending_entries_are_processed_first_with_their_delivery_count(
    redis: Any,
) -> None:
    key = stream_keys("events").stream
    producer = StreamProducer(redis, "events")
    old = await producer.add_many(["a", "b"])
    c = consumer(redis, recorder([]))
    await c.ensure_group()
    # An earlier life of "worker-1" read two entries and died before acking them.
    await redis.xreadgroup("group", "worker-1", {key: ">"}, count=2)
    new = await producer.add("c")
    seen: Seen = []
    restarted = consumer(redis, recorder(seen))
    assert await restarted.run_once() == 3
    assert seen == [(old[0], "a", 2), (old[1], "b", 2), (new, "c", 1)]
    assert restarted.counters.recovered == 2
    assert await pending(redis) == 0


async def test_idle_entries_of_a_dead_consumer_are_claimed(redis: Any) -> None:
    key = stream_keys("events").stream
    ids = await StreamProducer(redis, "events").add_many(["a", "b", "c"])
    seen: Seen = []
    patient = consumer(redis, recorder(seen), name="patient", claim_idle=60)
    alive = consumer(redis, recorder(seen), name="alive", claim_idle=0.05)
    await alive.ensure_group()
    await redis.xreadgroup("group", "dead", {key: ">"}, count=3)
    # not idle long enough yet (a minute, so a loaded machine cannot make it idle)
    assert await patient.run_once() == 0
    await asyncio.sleep(0.1)  # a lower bound on idle time, not a synchronisation
    assert await alive.run_once() == 3
    assert seen == [(i, p, 2) for i, p in zip(ids, "abc", strict=True)]
    assert alive.counters.claimed == 3
    assert await pending(redis) == 0


async def test_claimed_entries_that_were_deleted_are_skipped(redis: Any) -> None:
    key = stream_keys("events").stream
    ids = await StreamProducer(redis, "events").add_many(["a", "b", "c"])
    alive_seen: Seen = []
    alive = consumer(redis, recorder(alive_seen), name="alive", claim_idle=0.05)
    await alive.ensure_group()
    await redis.xreadgroup("group", "dead", {key: ">"}, count=3)
    await redis.xdel(key, ids[1])
    await asyncio.sleep(0.1)
    assert await alive.run_once() == 2
    assert [s[0] for s in alive_seen] == [ids[0], ids[2]]
    assert alive.counters.deleted == 1
    assert await pending(redis) == 0


async def test_entries_redelivered_past_max_deliveries_are_dead_lettered_unhandled(
    redis: Any,
) -> None:
    """A message that kills its worker every time must not loop forever."""
    key = stream_keys("events").stream
    [poison] = await StreamProducer(redis, "events").add_many(["poison"])
    seen: Seen = []
    c = consumer(redis, recorder(seen), name="alive", claim_idle=0.05, max_deliveries=3)
    await c.ensure_group()
    await redis.xreadgroup("group", "crashed", {key: ">"})
    await redis.xclaim(key, "group", "crashed", 0, [poison], retrycount=3)
    await asyncio.sleep(0.1)
    assert await c.run_once() == 1
    assert seen == []
    [dead] = await c.dead_letters()
    assert (dead.original_id, dead.deliveries) == (poison, 4)
    assert "max_deliveries=3" in dead.error


async def test_a_long_handler_keeps_its_lease(redis: Any) -> None:
    key = stream_keys("events").stream
    await StreamProducer(redis, "events").add("long")
    idle_ms: list[int] = []

    async def long_job(message: StreamMessage[Any]) -> None:
        await asyncio.sleep(1.5)  # three claim_idle periods
        [row] = await redis.xpending_range(key, "group", "-", "+", 1)
        idle_ms.append(row["time_since_delivered"])

    # renewals every 50 ms against a 500 ms claim period: a loaded machine may delay a
    # renewal by a few hundred ms without the entry becoming claimable
    c = consumer(redis, long_job, claim_idle=0.5, renew_interval=0.05)
    assert await c.run_once() == 1
    assert idle_ms[0] < 500  # renewed: never idle long enough to be claimed
    assert c.counters.lost_claims == 0


async def test_renewal_never_takes_back_an_entry_another_consumer_claimed(redis: Any) -> None:
    key = stream_keys("events").stream
    await StreamProducer(redis, "events").add("long")
    owners: list[str] = []

    async def handler(message: StreamMessage[Any]) -> None:
        await redis.xclaim(key, "group", "thief", 0, [message.id])
        await eventually(lambda: c.counters.lost_claims >= 1, "a renewal to find the entry gone")
        [row] = await redis.xpending_range(key, "group", "-", "+", 1)
        owners.append(_text(row["consumer"]))

    c = consumer(redis, handler, claim_idle=0.1, renew_interval=0.03)
    assert await c.run_once() == 1
    assert owners == ["thief"]
    assert c.counters.lost_claims >= 1


async def test_a_vanished_group_is_recreated(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    seen: Seen = []
    c = consumer(redis, recorder(seen))
    await c.ensure_group()
    await producer.add("before")
    assert await c.run_once() == 1
    await redis.flushall()  # what a restart without persistence looks like
    await producer.add("after")
    assert await c.run_once() == 1
    assert [s[1] for s in seen] == ["before", "after"]
    assert c.counters.group_recreated == 1


async def test_stats_report_length_lag_pending_and_dead_letters(redis: Any) -> None:
    key = stream_keys("events").stream
    producer = StreamProducer(redis, "events")
    ids = await producer.add_many(range(6))
    c = consumer(redis, recorder([]))
    await c.ensure_group()
    await redis.xreadgroup("group", "other", {key: ">"}, count=2)
    await asyncio.sleep(0.02)
    stats = await c.stats()
    assert (stats.length, stats.lag, stats.pending, stats.consumers) == (6, 4, 2, 1)
    assert stats.oldest_pending_id == ids[0]
    assert stats.oldest_pending_idle is not None and stats.oldest_pending_idle >= 0.01
    assert stats.last_delivered_id == ids[1]
    assert stats.dead_letters == 0
    assert stats.as_dict()["counters"]["handled"] == 0


async def test_stats_of_a_missing_stream_are_zeros(redis: Any) -> None:
    stats = await consumer(redis, recorder([])).stats()
    assert (stats.length, stats.pending, stats.consumers, stats.dead_letters) == (0, 0, 0, 0)
    assert stats.oldest_pending_id is None and stats.lag is None


# -- housekeeping -----------------------------------------------------------------


async def test_trim_keeps_unacknowledged_and_undelivered_entries(redis: Any) -> None:
    key = stream_keys("events").stream
    producer = StreamProducer(redis, "events")
    ids = await producer.add_many(range(10))
    c = consumer(redis, recorder([]))
    await c.ensure_group()
    await redis.xreadgroup("group", "slow", {key: ">"}, count=6)
    await redis.xack(key, "group", *ids[:4])  # 0-3 acked, 4-5 pending, 6-9 never delivered
    assert await producer.trim(maxlen=2) == 4
    assert [_text(i) for i, _ in await redis.xrange(key)] == ids[4:]
    assert await producer.trim(minid=ids[9]) == 0  # clamped at the oldest pending entry
    assert await producer.length() == 6
    await redis.xack(key, "group", *ids[4:6])
    await redis.xreadgroup("group", "slow", {key: ">"})
    await redis.xack(key, "group", *ids[6:])
    assert await producer.trim(maxlen=2) == 4
    assert await producer.length() == 2


async def test_trim_without_keep_is_a_plain_xtrim(redis: Any) -> None:
    key = stream_keys("events").stream
    ids = await StreamProducer(redis, "events").add_many(range(10))
    await consumer(redis, recorder([])).ensure_group()
    await redis.xreadgroup("group", "slow", {key: ">"}, count=6)
    assert await trim_stream(redis, "events", maxlen=3, keep_unacknowledged=False) == 7
    assert await trim_stream(redis, "events", minid=ids[8], keep_unacknowledged=False) == 1
    assert await trim_stream(redis, "missing", maxlen=1) == 0
    with pytest.raises(ConfigurationError):
        await trim_stream(redis, "events")


async def test_trim_with_no_group_uses_maxlen(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    await producer.add_many(range(10))
    assert await producer.trim(maxlen=4) == 6


async def test_janitor_removes_only_idle_consumers_with_nothing_pending(redis: Any) -> None:
    key = stream_keys("events").stream
    ids = await StreamProducer(redis, "events").add_many(["a", "b"])
    c = consumer(redis, recorder([]), name="janitor")
    await c.ensure_group()
    await redis.xreadgroup("group", "idle-empty", {key: ">"}, count=1)
    await redis.xack(key, "group", ids[0])
    await redis.xreadgroup("group", "idle-busy", {key: ">"}, count=1)
    await redis.xgroup_createconsumer(key, "group", "janitor")
    await asyncio.sleep(0.1)
    assert await c.remove_idle_consumers(idle=0.05) == ["idle-empty"]
    names = {_text(r["name"]) for r in await redis.xinfo_consumers(key, "group")}
    assert names == {"idle-busy", "janitor"}
    assert await c.remove_idle_consumers(idle=3600) == []


# -- run() and stop() ---------------------------------------------------------------


async def test_run_consumes_until_stop(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    seen: Seen = []
    c = consumer(redis, recorder(seen), block=0.2)
    task = asyncio.create_task(c.run())
    await producer.add_many(range(20))
    await eventually(lambda: len(seen) == 20, "20 entries handled")
    assert c.running
    await c.stop()
    await task
    assert not c.running
    assert await pending(redis) == 0


async def test_run_retries_failures_and_dead_letters(redis: Any) -> None:
    await StreamProducer(redis, "events").add("always fails")
    seen: Seen = []
    c = consumer(redis, recorder(seen, fail=lambda m: True), max_deliveries=3, block=0.1)
    task = asyncio.create_task(c.run())
    await eventually(lambda: c.counters.dead_lettered == 1, "an entry dead-lettered")
    await c.stop()
    await task
    assert [n for _, _, n in seen] == [1, 2, 3]
    assert (await c.stats()).dead_letters == 1


async def test_run_cannot_start_twice(redis: Any) -> None:
    c = consumer(redis, recorder([]), block=0.1)
    task = asyncio.create_task(c.run())
    await eventually(lambda: c.running, "the consumer running")
    with pytest.raises(StreamError):
        await c.run()
    with pytest.raises(StreamError):
        await c.run_once()
    await c.stop()
    await task


async def test_stop_before_the_run_task_started_makes_it_return(redis: Any) -> None:
    c = consumer(redis, recorder([]))
    task = asyncio.create_task(c.run())
    await c.stop()
    async with asyncio.timeout(1):
        await task
    assert not c.running


async def test_blocking_reads_stay_below_the_socket_timeout() -> None:
    client = slot_checking_fake_redis(server=fakeredis.FakeServer(), socket_timeout=0.5)
    try:
        c = consumer(client, recorder([]), block=30)
        assert c.block == pytest.approx(0.35)
    finally:
        await client.aclose()


def test_options_are_validated() -> None:
    client = slot_checking_fake_redis()
    with pytest.raises(ConfigurationError, match="renew_interval"):
        consumer(client, recorder([]), claim_idle=1, renew_interval=1)
    for option in ("batch_size", "concurrency", "max_deliveries", "dead_letter_maxlen"):
        for bad in (0, -1, 1.5, True):  # True is an int to Python, never a count here
            with pytest.raises(ConfigurationError, match=option):
                options: dict[str, Any] = {option: bad}
                consumer(client, recorder([]), **options)
    for bad in (0, True):
        with pytest.raises(ConfigurationError, match="maxlen"):
            StreamProducer(client, "events", maxlen=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigurationError, match="prefetch"):
            consumer(client, recorder([]), prefetch=bad)
    # By default concurrency + prefetch holds two batches, and prefetch is at least one.
    assert consumer(client, recorder([])).prefetch == 24  # batch_size 16, concurrency 8
    assert consumer(client, recorder([]), batch_size=7).prefetch == 7
    assert consumer(client, recorder([]), batch_size=100, concurrency=100).prefetch == 100
    assert consumer(client, recorder([]), prefetch=0).prefetch == 0
    with pytest.raises(ConfigurationError):
        consumer(client, recorder([]), block=0)
    with pytest.raises(ConfigurationError):
        StreamConsumer(client, "events", "", "w", recorder([]))


def test_default_consumer_names_are_stable_and_distinct() -> None:
    base = default_consumer_name()
    first = default_consumer_name("names-test", "g")
    second = default_consumer_name("names-test", "g")
    assert first == base and second == f"{base}-2"
    assert default_consumer_name("names-test", "other") == base


# -- worker entry point and demo routes ---------------------------------------------


async def test_serve_stops_consumers_gracefully_on_a_signal(redis: Any) -> None:
    finished: list[str] = []
    started = asyncio.Event()

    async def slow(message: StreamMessage[Any]) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(message.id)

    [entry_id] = await StreamProducer(redis, "events").add_many(["job"])
    c = consumer(redis, slow, block=0.1)
    served = asyncio.create_task(serve([c], signals=(signal.SIGUSR1,)))
    await asyncio.wait_for(started.wait(), DEFAULT_DEADLINE)
    signal.raise_signal(signal.SIGUSR1)
    await asyncio.wait_for(served, DEFAULT_DEADLINE)
    assert finished == [entry_id]
    assert await pending(redis) == 0


async def test_a_second_signal_cancels_in_flight_handlers(redis: Any) -> None:
    started = asyncio.Event()

    async def stuck(message: StreamMessage[Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    await StreamProducer(redis, "events").add("job")
    c = consumer(redis, stuck, block=0.1, shutdown_timeout=30)
    served = asyncio.create_task(serve([c], signals=(signal.SIGUSR1,)))
    await asyncio.wait_for(started.wait(), DEFAULT_DEADLINE)
    signal.raise_signal(signal.SIGUSR1)  # graceful: would wait up to 30 s
    await asyncio.sleep(0.05)
    assert not served.done()
    signal.raise_signal(signal.SIGUSR1)  # impatient: cancel now
    await asyncio.wait_for(served, DEFAULT_DEADLINE)
    assert (c.counters.abandoned, c.in_flight, c.running) == (1, 0, False)
    assert await pending(redis) == 1  # left for another consumer


async def test_cancelling_run_cancels_handlers_and_leaves_entries_pending(redis: Any) -> None:
    started = asyncio.Event()

    async def stuck(message: StreamMessage[Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    await StreamProducer(redis, "events").add("job")
    c = consumer(redis, stuck, block=0.1)
    task = asyncio.create_task(c.run())
    await asyncio.wait_for(started.wait(), DEFAULT_DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (c.counters.abandoned, c.in_flight, c.running) == (1, 0, False)
    assert await pending(redis) == 1


def test_load_handler_imports_module_function() -> None:
    from app.api.jobs import demo_handler

    assert load_handler("app.api.jobs:demo_handler") is demo_handler
    with pytest.raises(ConfigurationError):
        load_handler("no-colon")
    with pytest.raises(ConfigurationError):
        load_handler("app.api.jobs:missing")


async def test_demo_routes_produce_consume_and_report(app_client: Any) -> None:
    created = await app_client.post("/streams/events", json={"payload": {"n": 1}, "count": 3})
    assert created.status_code == 201
    body = created.json()
    assert body["stream"] == "events" and len(body["ids"]) == 3
    stats: dict[str, Any] = {}

    async def all_acked() -> bool:
        nonlocal stats
        stats = (await app_client.get("/streams/stats")).json()
        return bool(stats["counters"]["acked"] == 3)

    await eventually(all_acked, "the demo consumer to ack the 3 entries")
    assert stats["length"] == 3 and stats["pending"] == 0 and stats["lag"] == 0
    assert stats["worker"]["running"] is True
    assert (await app_client.get("/streams/dead-letters")).json() == []


async def test_the_demo_consumer_starts_only_when_streams_routes_are_used(
    fake_redis: Any, make_app_client: Any
) -> None:
    client = await make_app_client(None, fake_redis)
    assert (await client.get("/healthz")).status_code == 200
    assert await fake_redis.exists(stream_keys("events").stream) == 0  # nothing started

    async def running() -> bool:  # the route starts it; it runs from its task's first turn
        return bool((await client.get("/streams/stats")).json()["worker"]["running"])

    await eventually(running, "the first streams route to start the demo consumer")


async def test_the_demo_consumer_can_be_left_to_separate_workers(
    fake_redis: Any, make_app_client: Any, settings_override: Callable[..., None]
) -> None:
    settings_override(streams_demo_worker="off")
    client = await make_app_client(None, fake_redis)
    assert (await client.post("/streams/events", json={"payload": {"n": 1}})).status_code == 201
    await asyncio.sleep(0.05)
    stats = (await client.get("/streams/stats")).json()
    assert stats["worker"] == {"mode": "off", "running": False, "in_flight": 0}
    assert (stats["length"], stats["pending"]) == (1, 0)


async def test_add_many_refuses_a_key_of_another_type_and_appends_nothing(redis: Any) -> None:
    producer = StreamProducer(redis, "events")
    await redis.set(producer.keys.stream, "not a stream")
    with pytest.raises(StreamError):
        await producer.add_many(range(3))
    assert await redis.get(producer.keys.stream) in (b"not a stream", "not a stream")
