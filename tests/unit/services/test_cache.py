"""CacheService behaviour on fakeredis, with decode_responses False and True.

Every test here takes the ``cache_client`` fixture; the integration module
``tests/integration/services/test_cache.py`` re-runs the same tests with a
``cache_client`` on a real redis-server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from pydantic import BaseModel

from app.core.errors import ConfigurationError, InvalidKey, PatternTooComplex, RedisUnavailable
from app.core.redis import breaker_for, build_client
from app.services.cache import MISSING, NO_EXPIRY, CacheService, LocalCache
from app.testing.slots import slot_checking_fake_redis
from app.testing.waiting import ManualClock, eventually


class Item(BaseModel):
    id: int
    name: str


@pytest.fixture
def cache_client(fake_client: Any) -> Any:
    """A fresh fakeredis client (decode_responses False, then True) that refuses CROSSSLOT."""
    return fake_client


async def _keys(client: Any, pattern: str = "*") -> list[str]:
    found = [k.decode() if isinstance(k, bytes) else k async for k in client.scan_iter(pattern)]
    return sorted(found)


async def _expired(cache: CacheService, *keys: str) -> None:
    """Wait until none of *keys* is served fresh any more (their TTL ran out on Redis' clock)."""

    async def gone() -> bool:
        return all([await cache.get(key, MISSING) is MISSING for key in keys])

    await eventually(gone, f"{len(keys)} cache entries to expire")


async def _waiting(cache: CacheService) -> None:
    """Wait until *cache* has a call waiting for another instance's computation."""
    await eventually(lambda: cache.stats()["stampede_waits"] == 1, "a caller to wait for the lease")


async def _tag_members(client: Any, tag: str) -> int:
    total = 0
    for key in await _keys(client, f"*|tag|{tag}"):
        total += int(await client.scard(key))
    return total


# -- the DESIGN.md contract -----------------------------------------------------


VALUES: list[Any] = [
    {"id": 1, "nested": {"list": [1, 2.5, "x", None, True]}},
    [1, "two", 3.0],
    "plain text",
    "ünïcødé ✓",
    42,
    0,
    1.5,
    False,
    b"\x00\xffraw bytes",
    dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
    (1, 2),
    {"a", "b"},
]


async def test_contract_set_get_delete(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    for i, value in enumerate(VALUES):
        assert await cache.set(f"v:{i}", value, ttl=60) is True
        assert await cache.get(f"v:{i}") == value
    assert await cache.get("user:1") is None
    await cache.set("user:1", {"id": 1}, ttl=60)
    assert await cache.get("user:1") == {"id": 1}
    assert await cache.delete("user:1") == 1
    assert await cache.get("user:1") is None
    assert await cache.delete("user:1") == 0


async def test_missing_tells_a_miss_from_a_stored_none(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("none", None, ttl=60)
    assert await cache.get("none") is None
    assert await cache.get("none", MISSING) is None
    assert await cache.get("absent", MISSING) is MISSING
    assert await cache.get("absent", "fallback") == "fallback"
    assert not MISSING and repr(MISSING) == "MISSING"


async def test_ttl_semantics(cache_client: Any) -> None:
    cache = CacheService(cache_client, default_ttl=120)
    await cache.set("default", 1)
    await cache.set("seconds", 1, ttl=30)
    await cache.set("delta", 1, ttl=dt.timedelta(minutes=2, seconds=30))
    await cache.set("forever", 1, ttl=NO_EXPIRY)
    assert 119 < (await cache.ttl("default") or 0) <= 120
    assert 29 < (await cache.ttl("seconds") or 0) <= 30
    assert 149 < (await cache.ttl("delta") or 0) <= 150
    assert await cache.ttl("forever") == NO_EXPIRY
    assert await cache.ttl("absent") is None
    for bad in (0, -1, float("nan"), dt.timedelta(0)):
        with pytest.raises(ValueError):
            await cache.set("bad", 1, ttl=bad)
    with pytest.raises(ValueError, match="stale_ttl"):
        await cache.set("bad", 1, ttl=10, stale_ttl=5)
    await cache.set("unicode", "é" * 40, ttl=10, stale_ttl=20)  # header then multi-byte text
    assert 9 < (await cache.ttl("unicode") or 0) <= 10
    await cache.set("short", "x", ttl=0.5)
    assert await cache.get("short") == "x"
    await _expired(cache, "short")


async def test_default_ttl_is_one_hour(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("k", 1)
    assert 3599 < (await cache.ttl("k") or 0) <= 3600


async def test_get_many_set_many_exists(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    assert await cache.set_many({"a": 1, "b": None, "c": {"x": [1]}}, ttl=60, tags=["batch"])
    assert await cache.get_many(["a", "b", "c", "d", "a"]) == {"a": 1, "b": None, "c": {"x": [1]}}
    assert await cache.exists("b") and not await cache.exists("d")
    assert await cache.get_many([]) == {}
    assert await cache.set_many({}) is True
    assert await cache.invalidate_tags("batch") == 3
    assert await cache.get_many(["a", "b", "c"]) == {}


async def test_expire_changes_the_fresh_lifetime(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("k", 1, ttl=60)
    assert await cache.expire("k", 300)
    assert 299 < (await cache.ttl("k") or 0) <= 300
    assert await cache.expire("k", NO_EXPIRY)
    assert await cache.ttl("k") == NO_EXPIRY
    assert not await cache.expire("absent", 10)
    await cache.set("swr", 1, ttl=10, stale_ttl=100)
    assert await cache.expire("swr", 50)
    assert 49 < (await cache.ttl("swr") or 0) <= 50  # fresh TTL; the stale window stays on top
    assert 139 < int(await cache_client.pttl(cache.redis_key("swr"))) / 1000 <= 140


async def test_clear_and_invalidate_stay_in_their_namespace(cache_client: Any) -> None:
    mine = CacheService(cache_client)
    other = CacheService(cache_client, namespace="cache2")
    await mine.set("user:1", 1, ttl=60, tags=["t"])
    await other.set("user:1", 2, ttl=60, tags=["t"])
    await cache_client.set("app:cache:raw", "not ours")  # not an entry of any namespace
    await cache_client.set("unrelated", "x")
    assert await mine.invalidate("*") == 1
    assert await other.get("user:1") == 2
    await mine.set("user:1", 1, ttl=60, tags=["t"])
    assert await mine.invalidate_tags("t") == 1
    assert await other.get("user:1") == 2
    await mine.set("user:1", 1, ttl=60, tags=["t"])
    assert await mine.clear() >= 2  # the entry and its tag set
    assert await mine.get("user:1") is None
    assert await other.get("user:1") == 2
    assert await cache_client.get("unrelated") in (b"x", "x")
    assert await _keys(cache_client, "app:cache:{*") == []


async def test_typed_get_and_undecodable_entries(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("item", Item(id=1, name="a"), ttl=60)
    item = await cache.get("item", type_=Item)
    assert isinstance(item, Item) and item == Item(id=1, name="a")
    assert await cache.get("item") == {"id": 1, "name": "a"}
    await cache.set("wrong", {"id": "not a number"}, ttl=60)
    assert await cache.get("wrong", MISSING, type_=Item) is MISSING
    await cache_client.set(cache.redis_key("garbage"), b"\x01j-{not json")
    assert await cache.get("garbage", "default") == "default"
    assert cache.stats()["decode_errors"] == 2


async def test_keys_are_escaped_and_distinct(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    keys = ["a:b", "a%3Ab", "a b", "a/b", "{tag}", "x*y", "q?[]\\", "é:ü", "a|lock", "a::b", ":"]
    for i, key in enumerate(keys):
        await cache.set(key, i, ttl=60)
    for i, key in enumerate(keys):
        assert await cache.get(key) == i
    stored = await _keys(cache_client, "app:cache:*")
    assert len(stored) == len(keys)
    for name in stored:
        suffix = name.split("}:", 1)[1]
        assert not set(suffix) & set("{}*?[]\\| "), name
    assert cache.redis_key("user:1").endswith("}:user:1")  # plain keys stay readable
    with pytest.raises(InvalidKey):
        await cache.get("")
    with pytest.raises(InvalidKey):
        await cache.set(123, 1)  # type: ignore[arg-type]


async def test_large_values_are_compressed(cache_client: Any) -> None:
    cache = CacheService(cache_client, compress_threshold=256)
    value = {"text": "abc" * 5000}
    await cache.set("big", value, ttl=60)
    assert await cache.get("big") == value
    assert int(await cache_client.strlen(cache.redis_key("big"))) < 2000
    with pytest.raises(ValueError):
        CacheService(cache_client, compress_threshold=10, codec=cache.codec)


# -- tags -------------------------------------------------------------------------


async def test_tags_invalidate_exactly_their_entries(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("u:1", 1, ttl=60, tags=["users", "user:1"])
    await cache.set("u:2", 2, ttl=60, tags=["users", "user:2"])
    await cache.set("p:1", 3, ttl=60, tags=["products"])
    assert await cache.invalidate_tags("user:1") == 1
    assert await cache.get("u:1") is None and await cache.get("u:2") == 2
    assert await cache.invalidate_tags("users", "products") == 2
    assert await cache.get_many(["u:2", "p:1"]) == {}
    assert await cache.invalidate_tags("users") == 0
    assert await cache.invalidate_tags() == 0
    remaining = await _keys(cache_client, "*|tag|*")
    assert remaining and all(name.endswith("|tag|user%3A2") for name in remaining)


async def test_tag_sets_never_expire_before_their_members(cache_client: Any) -> None:
    cache = CacheService(cache_client, shards=1)
    await cache.set("long", 1, ttl=100, tags=["t"])
    await cache.set("short", 2, ttl=10, tags=["t"])
    (tag_set,) = await _keys(cache_client, "*|tag|t")
    assert int(await cache_client.pttl(tag_set)) > 99_000
    assert await cache.expire("short", 500)  # a later TTL raise drags the tag set along
    assert int(await cache_client.pttl(tag_set)) > 499_000
    await cache.set("forever", 3, ttl=NO_EXPIRY, tags=["t"])
    assert int(await cache_client.pttl(tag_set)) == -1
    assert await cache.invalidate_tags("t") == 3
    assert await _keys(cache_client, "*|tag|*") == []  # drained sets disappear


async def test_tag_sets_stay_bounded_as_members_expire(cache_client: Any) -> None:
    cache = CacheService(cache_client, shards=1)
    await cache.set_many({f"old:{i}": i for i in range(150)}, ttl=0.05, tags=["t"])
    await _expired(cache, *(f"old:{i}" for i in range(150)))
    for i in range(100):
        await cache.set(f"new:{i}", i, ttl=60, tags=["t"])
    members = await _tag_members(cache_client, "t")
    assert 100 <= members <= 200  # pruning removed most of the 150 dead members
    assert await cache.invalidate_tags("t") == 100


async def test_a_key_is_reachable_through_its_new_tags(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set("k", 1, ttl=60, tags=["a"])
    await cache.set("k", 2, ttl=60, tags=["b"])
    assert await cache.invalidate_tags("b") == 1
    assert await cache.get("k") is None


# -- pattern invalidation ------------------------------------------------------------


async def test_invalidate_pattern(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set_many({"user:1": 1, "user:2": 2, "user:1:posts": 3, "users": 4}, ttl=60)
    assert await cache.invalidate("user:*") == 3
    assert await cache.get_many(["user:1", "user:2", "user:1:posts", "users"]) == {"users": 4}
    assert await cache.invalidate("nothing*") == 0
    assert await cache.invalidate("users") == 1


async def test_invalidate_pattern_escapes_user_input(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    await cache.set_many({"a*b": 1, "axxb": 2, "é x": 3, "é y": 4, "q?": 5, "qz": 6}, ttl=60)
    assert await cache.invalidate(CacheService.literal("a*b")) == 1
    assert await cache.get("axxb") == 2
    assert await cache.invalidate("é*") == 2
    assert await cache.invalidate("q?") == 1  # "?" is literal, not a one-character glob
    assert await cache.get("qz") == 6
    for hostile in ("}:*", "{*", "*}|*", "[a-z]*", "\\*"):
        assert await cache.invalidate(hostile) == 0
    assert await cache.get_many(["axxb", "qz"]) == {"axxb": 2, "qz": 6}


async def test_invalidate_matches_many_wildcards_on_long_keys_exactly(cache_client: Any) -> None:
    # Within the cap, a pattern whose regex form backtracks exponentially on these keys;
    # the server sees at most one of its stars, the rest is matched in linear passes.
    cache = CacheService(cache_client)
    long_a, long_ab = "a" * 3000, "a" * 3000 + "b"
    await cache.set_many({long_a: 1, long_ab: 2, "xaaab": 3, "ab": 4}, ttl=60)
    pattern = "*a" * 3 + "*b"
    assert await cache.invalidate(pattern) == 2  # long_ab and xaaab; "ab" has one "a"
    assert await cache.get_many([long_a, long_ab, "xaaab", "ab"]) == {long_a: 1, "ab": 4}
    assert await cache.invalidate("a**b") == 1  # runs of stars collapse: same as "a*b"


async def test_invalidate_refuses_too_many_wildcards_before_calling_redis(
    cache_client: Any,
) -> None:
    cache = CacheService(cache_client)
    await cache.set("a" * 40, 1, ttl=60)
    with pytest.raises(PatternTooComplex, match=r"cache pattern .* has 30 wildcards; at most 4"):
        await cache.invalidate("*a" * 29 + "*b")
    with pytest.raises(PatternTooComplex, match="has 9 wildcards"):
        await cache.invalidate("*a" * 8 + "*b")
    assert await cache.get("a" * 40) == 1  # nothing lost


@pytest.mark.parametrize("pattern", ["*a" * 8 + "*b", "*a" * 3 + "*b", "a*" * 4])
def test_invalidate_on_the_embedded_store_ends_whatever_the_pattern(
    settings_override: Callable[..., None], pattern: str
) -> None:
    """The issue's stall: 46 s of CPU with the event loop blocked, on memory://."""
    settings_override(redis_url="memory://")
    outcome: list[object] = []

    async def run() -> None:
        client = build_client()
        cache = CacheService(client, namespace="stall", local=LocalCache(ttl=60))
        await cache.set("a" * 200, 1, ttl=60)
        await cache.get("a" * 200)  # in the local tier too
        try:
            outcome.append(await cache.invalidate(pattern))
        except PatternTooComplex as exc:
            outcome.append(exc)
        finally:
            await cache.aclose()
            await client.aclose()

    # A blocked event loop cannot time itself out: the call runs in its own thread and
    # loop, and this thread waits for it with a generous hang guard (not a speed bound).
    worker = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"invalidate({pattern!r}) still running: the matcher stalls"
    expected: object = PatternTooComplex if pattern.count("*") > 4 else int
    assert len(outcome) == 1 and isinstance(outcome[0], expected)  # type: ignore[arg-type]


# -- get_or_set -------------------------------------------------------------------------


async def test_get_or_set_computes_once_per_process(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    calls = 0
    release = asyncio.Event()

    async def factory() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"n": calls}

    gathered = asyncio.gather(*[cache.get_or_set("k", factory, ttl=60) for _ in range(50)])
    await eventually(lambda: cache.stats()["coalesced"] == 49, "49 callers to join the first")
    release.set()
    results = await gathered
    assert calls == 1
    assert results == [{"n": 1}] * 50
    assert results[0] is not results[1]  # callers never share one mutable object
    assert await cache.get_or_set("k", factory, ttl=60) == {"n": 1}
    stats = cache.stats()
    assert stats["factory_calls"] == 1 and stats["coalesced"] == 49 and stats["hits"] >= 1


async def test_get_or_set_typed(cache_client: Any) -> None:
    cache = CacheService(cache_client)

    async def factory() -> Item:
        return Item(id=7, name="seven")

    first = await cache.get_or_set("item", factory, ttl=60, type_=Item)
    again = await cache.get_or_set("item", factory, ttl=60, type_=Item)
    assert first == again == Item(id=7, name="seven") and isinstance(again, Item)


async def test_factory_errors_propagate_and_nothing_is_cached(cache_client: Any) -> None:
    cache = CacheService(cache_client)

    async def broken() -> int:
        await asyncio.sleep(0.02)
        raise LookupError("origin down")

    results = await asyncio.gather(
        *[cache.get_or_set("k", broken, ttl=60) for _ in range(5)], return_exceptions=True
    )
    assert all(isinstance(r, LookupError) for r in results)
    assert await cache.get("k", MISSING) is MISSING

    async def fine() -> int:
        return 1

    assert await cache.get_or_set("k", fine, ttl=60) == 1


async def test_cancelled_computation_hands_over(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    started = asyncio.Event()
    calls = 0

    async def factory() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.sleep(30)
        return calls

    leader = asyncio.create_task(cache.get_or_set("k", factory, ttl=60))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_set("k", factory, ttl=60))
    await eventually(lambda: cache.stats()["coalesced"] == 1, "the follower to join the leader")
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.wait_for(follower, 5) == 2
    assert await cache.get("k") == 2


async def test_waiters_in_other_instances_are_woken_by_the_write(cache_client: Any) -> None:
    holder, waiter = CacheService(cache_client), CacheService(cache_client)
    release = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "computed once"

    first = asyncio.create_task(holder.get_or_set("k", slow, ttl=60))
    await eventually(lambda: calls == 1, "the holder to take the lease and compute")
    second = asyncio.create_task(waiter.get_or_set("k", slow, ttl=60, wait_timeout=20))
    await _waiting(waiter)
    assert not second.done()
    release.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 5)) == ["computed once"] * 2
    assert calls == 1
    stats = waiter.stats()
    assert stats["stampede_waits"] == 1 and stats["wait_timeouts"] == 0
    assert stats["wakeups"] == 1  # woken by the write, not by a timeout slice


async def test_a_waiter_computes_itself_after_wait_timeout(cache_client: Any) -> None:
    holder, waiter = CacheService(cache_client), CacheService(cache_client)
    release = asyncio.Event()

    started = asyncio.Event()

    async def stuck() -> str:
        started.set()
        await release.wait()
        return "holder"

    async def own() -> str:
        return "waiter"

    first = asyncio.create_task(holder.get_or_set("k", stuck, ttl=60))
    await started.wait()  # the holder has the lease
    assert await waiter.get_or_set("k", own, ttl=60, wait_timeout=0.2) == "waiter"
    assert waiter.stats()["wait_timeouts"] == 1
    release.set()
    assert await first == "holder"


async def test_a_failing_lease_holder_wakes_a_waiter_to_take_over(cache_client: Any) -> None:
    holder, waiter = CacheService(cache_client), CacheService(cache_client)
    fail, started = asyncio.Event(), asyncio.Event()

    async def failing() -> str:
        started.set()
        await fail.wait()
        raise LookupError("origin down")

    async def own() -> str:
        return "waiter"

    first = asyncio.create_task(holder.get_or_set("k", failing, ttl=60))
    await started.wait()  # the holder has the lease
    second = asyncio.create_task(waiter.get_or_set("k", own, ttl=60, wait_timeout=20))
    await _waiting(waiter)
    fail.set()
    with pytest.raises(LookupError):
        await first
    assert await asyncio.wait_for(second, 5) == "waiter"
    assert waiter.stats()["wait_timeouts"] == 0 and waiter.stats()["wakeups"] == 1


async def test_stale_while_revalidate(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    calls = 0
    release = asyncio.Event()

    async def factory() -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            await release.wait()  # the refresh outlasts the concurrent stale reads
        return calls

    assert await cache.get_or_set("k", factory, ttl=0.2, stale_ttl=30) == 1
    await _expired(cache, "k")  # get() never serves stale by default
    assert await cache.get("k", allow_stale=True) == 1
    assert await cache.ttl("k") == 0.0
    served = await asyncio.gather(
        *[cache.get_or_set("k", factory, ttl=10, stale_ttl=30) for _ in range(10)]
    )
    assert served == [1] * 10  # stale value at once, no caller waits for the refresh
    release.set()
    await cache.wait_idle()
    assert calls == 2  # one background refresh for all ten stale hits
    assert await cache.get_or_set("k", factory, ttl=10, stale_ttl=30) == 2
    stats = cache.stats()
    assert stats["stale_hits"] == 10 and stats["refreshes"] == 1


async def test_stale_if_error(cache_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    cache = CacheService(cache_client)
    healthy = True
    calls = 0

    async def factory() -> str:
        nonlocal calls
        calls += 1
        if not healthy:
            raise LookupError("origin down")
        return "good"

    assert await cache.get_or_set("k", factory, ttl=0.1, stale_ttl=30) == "good"
    healthy = False
    await _expired(cache, "k")
    with caplog.at_level(logging.WARNING, logger="app.cache"):
        for _ in range(5):
            assert await cache.get_or_set("k", factory, ttl=0.1, stale_ttl=30) == "good"
            await cache.wait_idle()
    assert calls == 2  # one failed refresh; the lease then backs off for a second
    assert cache.stats()["refresh_errors"] == 1
    assert sum("background refresh" in r.message for r in caplog.records) == 1


async def test_one_refresh_across_instances(cache_client: Any) -> None:
    a, b = CacheService(cache_client), CacheService(cache_client)
    calls = 0
    release = asyncio.Event()

    async def factory() -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            await release.wait()  # the refresh outlasts both stale reads
        return calls

    await a.get_or_set("k", factory, ttl=0.1, stale_ttl=30)
    await _expired(a, "k")
    await asyncio.gather(
        a.get_or_set("k", factory, ttl=10, stale_ttl=30),
        b.get_or_set("k", factory, ttl=10, stale_ttl=30),
    )
    release.set()
    await asyncio.gather(a.wait_idle(), b.wait_idle())
    assert calls == 2
    assert a.stats()["refreshes"] + b.stats()["refreshes"] == 1


async def test_a_refresh_that_starts_after_another_one_finished_does_nothing(
    fake_redis: Any, fake_server: fakeredis.FakeServer
) -> None:
    """The stale read and the refresh's lease are two calls, and another instance may
    refresh the entry in between (on a busy machine, its whole refresh). The late
    refresher finds the entry rewritten and leaves it alone: one origin call, not two."""
    cache = CacheService(fake_redis)
    calls = 0

    async def factory() -> int:
        nonlocal calls
        calls += 1
        return calls

    await cache.get_or_set("k", factory, ttl=0.1, stale_ttl=30)
    await _expired(cache, "k")
    assert await cache.get_or_set("k", factory, ttl=10, stale_ttl=30) == 1  # stale
    # Its refresh is scheduled, not started. Another instance's refresh lands first
    # (written with a synchronous client, so the event loop does not run meanwhile):
    other = fakeredis.FakeRedis(server=fake_server)
    stored = other.get(cache.redis_key("k"))
    assert stored is not None
    other.set(cache.redis_key("k"), stored, px=40_000)
    await cache.wait_idle()
    assert calls == 1
    assert cache.stats()["refreshes"] == 0


async def test_early_refresh_xfetch(cache_client: Any) -> None:
    cache = CacheService(cache_client)
    calls = 0

    async def factory() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return calls

    assert await cache.get_or_set("never", factory, ttl=60) == 1
    for _ in range(5):
        assert await cache.get_or_set("never", factory, ttl=60) == 1
    await cache.wait_idle()
    assert calls == 1

    # A huge beta makes every fresh hit refresh early, in the background.
    assert await cache.get_or_set("early", factory, ttl=60, early_refresh=1e9) == 2
    assert await cache.get_or_set("early", factory, ttl=60, early_refresh=1e9) == 2
    await cache.wait_idle()
    assert calls == 3 and cache.stats()["early_refreshes"] >= 1
    assert await cache.get("early") == 3


# -- failure -------------------------------------------------------------------------------
#
# fakeredis emulates an outage with ``server.connected = False`` (every command
# raises ConnectionError); the real-server version stops a redis-server
# mid-test (tests/integration/services/test_cache.py).


@pytest.fixture
def outage(fake_client: Any, fake_server: Any) -> Iterator[tuple[Any, Any]]:
    """(fakeredis client, its FakeServer): set ``server.connected = False`` to cut Redis off."""
    try:
        yield fake_client, fake_server
    finally:
        fake_server.connected = True  # before the client is closed


async def test_fail_open_when_redis_is_unreachable(
    outage: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client, server = outage
    cache = CacheService(client)
    await cache.set("k", "cached", ttl=60)
    server.connected = False
    calls = 0

    async def origin() -> str:
        nonlocal calls
        calls += 1
        return "origin"

    with caplog.at_level(logging.WARNING, logger="app.cache"):
        for _ in range(20):
            assert await cache.get("k") is None
            assert await cache.set("k", "x") is False
            assert await cache.get_or_set("k", origin, ttl=60) == "origin"
        assert await cache.get_many(["k"]) == {}
        assert await cache.delete("k") == 0
        assert await cache.invalidate_tags("t") == 0
        assert await cache.invalidate("*") == 0
        assert await cache.clear() == 0
    assert calls == 20
    stats = cache.stats()
    assert stats["fail_open"] == 20 and stats["errors"] >= 60 and stats["breaker"] == "open"
    warnings = [r for r in caplog.records if r.name == "app.cache"]
    assert 1 <= len(warnings) <= breaker_for(client).transitions + 1  # not one per call


async def test_closed_failure_mode_raises(outage: tuple[Any, Any]) -> None:
    client, server = outage
    cache = CacheService(client, failure_mode="closed")
    server.connected = False

    async def origin() -> str:
        return "origin"

    with pytest.raises(RedisUnavailable):
        await cache.get("k")
    with pytest.raises(RedisUnavailable):
        await cache.set("k", 1)
    with pytest.raises(RedisUnavailable):
        await cache.get_or_set("k", origin)


async def test_a_refused_command_fails_open_like_an_outage(
    cache_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answering WRONGTYPE (a list where an entry belongs) is a miss, logged once."""
    cache = CacheService(cache_client)
    await cache_client.rpush(cache.redis_key("k"), "not an entry")

    async def origin() -> str:
        return "origin"

    with caplog.at_level(logging.WARNING, logger="app.cache"):
        assert await cache.get("k", "default") == "default"
        assert await cache.get_or_set("k", origin, ttl=60) == "origin"
        assert await cache.exists("k") is True  # EXISTS works on any type
    stats = cache.stats()
    assert stats["errors"] == 2 and stats["fail_open"] == 1 and stats["breaker"] == "closed"
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.cache"]
    assert len(warnings) == 1, warnings  # once per change, not per call
    assert "cache 'cache'" in warnings[0] and "refused" in warnings[0]
    assert "WRONGTYPE" not in warnings[0]  # Redis's text stays in __cause__


async def test_closed_mode_raises_a_refused_command_without_redis_text(cache_client: Any) -> None:
    cache = CacheService(cache_client, failure_mode="closed")
    await cache_client.rpush(cache.redis_key("k"), "not an entry")
    with pytest.raises(RedisUnavailable) as info:
        await cache.get("k")
    assert str(info.value) == "cache 'cache': Redis refused the command"
    assert "WRONGTYPE" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"default_ttl": 0}, "default_ttl"),
        ({"default_ttl": "60"}, "default_ttl"),
        ({"default_ttl": True}, "default_ttl"),
        ({"lease": float("nan")}, "lease"),
        ({"lease": float("inf")}, "lease"),
        ({"lease": 0}, "lease"),
        ({"wait_timeout": -1}, "wait_timeout"),
        ({"wait_timeout": None}, "wait_timeout"),
    ],
)
async def test_bad_durations_are_refused_when_the_service_is_built(
    cache_client: Any, options: dict[str, Any], what: str
) -> None:
    with pytest.raises(ConfigurationError, match=what):
        CacheService(cache_client, **options)


async def test_bad_durations_of_a_call_are_configuration_errors(cache_client: Any) -> None:
    cache = CacheService(cache_client)

    async def factory() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="ttl"):
        await cache.set("k", 1, ttl="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ttl"):
        await cache.set("k", 1, ttl=-float("inf"))
    with pytest.raises(ConfigurationError, match="stale_ttl"):
        await cache.set("k", 1, ttl=10, stale_ttl=float("nan"))
    with pytest.raises(ConfigurationError, match="lease"):
        await cache.get_or_set("k", factory, ttl=10, lease=float("nan"))
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        await cache.get_or_set("k", factory, ttl=10, wait_timeout=-0.5)
    with pytest.raises(ConfigurationError, match="early_refresh"):
        await cache.get_or_set("k", factory, ttl=10, early_refresh=-1)
    with pytest.raises(ConfigurationError, match="local tier"):
        LocalCache(ttl=float("nan"))
    assert await cache.get("k", MISSING) is MISSING  # nothing was written


async def test_durations_may_be_timedeltas(cache_client: Any) -> None:
    cache = CacheService(cache_client, lease=dt.timedelta(seconds=5), wait_timeout=dt.timedelta(0))
    assert cache.wait_timeout == 0.0
    policy = cache.policy(lease=dt.timedelta(milliseconds=1500), wait_timeout=dt.timedelta(1))
    assert policy.lease_ms == 1500 and policy.wait_timeout == 86400.0

    async def factory() -> int:
        return 1

    assert await cache.get_or_set("k", factory, ttl=dt.timedelta(seconds=1.1)) == 1
    assert 0.5 < (await cache.ttl("k") or 0) <= 1.1


async def test_stale_local_copy_is_served_when_redis_and_origin_fail(
    outage: tuple[Any, Any],
) -> None:
    client, server = outage
    clock = ManualClock()
    cache = CacheService(client, local=LocalCache(ttl=0.05, clock=clock))
    assert await cache.start()

    async def good() -> str:
        return "good"

    async def broken() -> str:
        raise LookupError("origin down")

    assert await cache.get_or_set("k", good, ttl=60) == "good"
    assert await cache.get("k") == "good"  # now in the local tier
    clock.advance(0.1)  # local copy expired, Redis still holds the entry
    server.connected = False
    assert await cache.get_or_set("k", broken, ttl=60) == "good"
    assert cache.stats()["stale_if_error"] == 1
    with pytest.raises(LookupError):
        await cache.get_or_set("never-cached", broken, ttl=60)
    server.connected = True
    await cache.aclose()


# -- stats ----------------------------------------------------------------------------


async def test_stats(cache_client: Any) -> None:
    cache = CacheService(cache_client)

    async def factory() -> int:
        return 1

    await cache.get("a")
    await cache.set("a", 1, ttl=60)
    await cache.get("a")
    await cache.get_or_set("b", factory, ttl=60)
    await cache.get_or_set("b", factory, ttl=60)
    stats = cache.stats()
    assert stats["namespace"] == "cache"
    assert stats["hits"] == 2 and stats["misses"] == 2 and stats["sets"] == 2
    assert stats["factory_calls"] == 1 and stats["errors"] == 0
    assert stats["hit_ratio"] == 0.5 and stats["breaker"] == "closed" and stats["local"] is None
    cache.reset_stats()
    assert cache.stats()["hits"] == 0


# -- the Cluster layout ------------------------------------------------------------


async def test_sharded_layout_never_crosses_slots(cache_client: Any) -> None:
    """With 16 shards (the Cluster default) every command and script stays in one slot."""
    cache = CacheService(cache_client, shards=16)
    keys = [f"k:{i}" for i in range(40)]
    assert await cache.set_many({k: k for k in keys}, ttl=60, tags=["all"])
    assert len({cache.redis_key(k).split("}")[0] for k in keys}) > 4  # spread over shards
    assert await cache.get_many(keys) == {k: k for k in keys}
    assert await cache.delete(*keys[:5]) == 5
    assert await cache.expire(keys[5], 120)

    async def factory() -> str:
        return "v"

    assert await cache.get_or_set("fresh", factory, ttl=60, tags=["all"]) == "v"
    assert await cache.invalidate("k:1*") == 10  # k:10..k:19 (k:1 was deleted)
    assert await cache.invalidate_tags("all") == 26  # 25 left of k:* plus "fresh"
    assert await cache.clear() >= 0
    assert await _keys(cache_client, "app:cache:*") == []
    assert cache.stats()["errors"] == 0


async def test_clients_with_and_without_decode_responses_share_entries() -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    as_bytes = CacheService(slot_checking_fake_redis(server=server))
    as_text = CacheService(slot_checking_fake_redis(server=server, decode_responses=True))
    big = {"text": "é" * 3000}  # compressed above the 4 KiB threshold
    for writer, reader in ((as_bytes, as_text), (as_text, as_bytes)):
        await writer.set("raw", b"\x00\xff binary", ttl=60, tags=["t"])
        await writer.set("big", big, ttl=60, stale_ttl=120)
        assert await reader.get("raw") == b"\x00\xff binary"
        assert await reader.get("big") == big
        assert await reader.invalidate_tags("t") == 1
