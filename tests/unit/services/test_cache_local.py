"""The in-process tier: LRU bounds, TTL, races, and coherence over pub/sub (fakeredis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from app.services.cache import MISSING, CacheService, LocalCache
from app.testing.clients import fake_twin
from app.testing.waiting import ManualClock, eventually


def active_tier(**options: Any) -> tuple[LocalCache, ManualClock]:
    clock = ManualClock()
    tier = LocalCache(clock=clock, **options)
    tier.active = True
    return tier, clock


def put(tier: LocalCache, key: str, payload: bytes = b"v", **options: Any) -> None:
    options.setdefault("ttl", None)
    options.setdefault("hard_ttl", None)
    options.setdefault("tags", ())
    tier.put(key, payload, epoch=tier.epoch, **options)


# -- LocalCache on its own ----------------------------------------------------------


def test_lru_bound_by_entries() -> None:
    tier, _ = active_tier(max_entries=3, ttl=60)
    for key in "abc":
        put(tier, key)
    assert tier.get("a") is not None  # a is now the most recently used
    put(tier, "d")
    assert tier.get("b") is None and len(tier) == 3 and tier.evictions == 1
    assert all(tier.get(k) is not None for k in "acd")


def test_lru_bound_by_bytes() -> None:
    tier, _ = active_tier(max_bytes=2000, max_item_bytes=1000, ttl=60)
    for i in range(5):
        put(tier, f"k{i}", b"x" * 500)
    assert tier.bytes <= 2000 and len(tier) == 3
    assert tier.get("k0") is None and tier.get("k4") is not None
    put(tier, "huge", b"x" * 5000)  # over max_item_bytes: never kept
    assert tier.get("huge") is None and tier.get("k4") is not None


def test_ttl_and_the_remaining_redis_lifetime_bound_an_entry() -> None:
    tier, clock = active_tier(ttl=1.0)
    put(tier, "short", ttl=0.2, hard_ttl=5.0)
    put(tier, "long", ttl=30.0, hard_ttl=30.0)
    clock.now += 0.5
    assert tier.get("short") is None
    assert tier.get("long") is not None
    assert tier.peek_stale("short") is not None  # kept as a stale-if-error fallback
    clock.now += 0.6
    assert tier.get("long") is None  # the tier's own TTL (1 s) wins
    clock.now += 10
    assert tier.peek_stale("short") is None  # past its Redis lifetime: gone for good


def test_an_inactive_tier_serves_nothing() -> None:
    tier, _ = active_tier(ttl=60)
    put(tier, "k")
    tier.active = False
    assert tier.get("k") is None
    put(tier, "other")
    tier.active = True
    assert tier.get("other") is None


def test_a_fill_that_raced_an_invalidation_is_dropped() -> None:
    tier, _ = active_tier(ttl=60)
    epoch = tier.epoch  # a reader notes the epoch, then asks Redis...
    tier.invalidate_keys(["k"])  # ...an invalidation arrives meanwhile...
    tier.put("k", b"old", ttl=None, hard_ttl=None, tags=(), epoch=epoch)
    assert tier.get("k") is None  # ...so the possibly-old answer is not kept


def test_invalidation_by_key_tag_pattern_and_flush() -> None:
    tier, _ = active_tier(ttl=60)
    put(tier, "app:cache:{cache.1}:user:1", tags=("users",))
    put(tier, "app:cache:{cache.2}:user:2", tags=("users", "vip"))
    put(tier, "app:cache:{cache.3}:post:1")
    assert tier.invalidate_tags(["vip"]) == 1
    assert tier.get("app:cache:{cache.1}:user:1") is not None
    assert tier.invalidate_keys(["app:cache:{cache.1}:user:1", "absent"]) == 1
    put(tier, "app:cache:{cache.1}:user:1")
    from app.services.cache._local import pattern_predicate

    assert tier.invalidate_matching(pattern_predicate("user:*")) == 1
    assert tier.get("app:cache:{cache.3}:post:1") is not None
    seen: list[int] = []
    tier.on_invalidate = lambda: seen.append(tier.epoch)
    tier.flush()
    assert len(tier) == 0 and tier.bytes == 0 and seen == [tier.epoch]


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        LocalCache(ttl=0)
    with pytest.raises(ValueError):
        LocalCache(max_entries=0)


# -- two "processes" sharing one (fake) Redis --------------------------------------------


@pytest_asyncio.fixture
async def pair(fake_client: Any) -> AsyncIterator[tuple[CacheService, CacheService]]:
    """Two CacheServices with local tiers over two clients of one fake server."""
    clients = [fake_twin(fake_client) for _ in range(2)]
    services = [CacheService(c, local=LocalCache(ttl=60)) for c in clients]
    for service in services:
        assert await service.start()
    try:
        yield services[0], services[1]
    finally:
        for service in services:
            await service.aclose()
        for client in clients:
            await client.aclose()


async def prime(service: CacheService, key: str, expected: Any) -> None:
    """Read *key* until *expected* is served from the local tier.

    A read that raced an invalidation message is (rightly) not kept locally,
    so this retries until a read is answered by the tier itself.
    """

    async def local_hit() -> bool:
        before = service.stats()["local_hits"]
        value = await service.get(key, MISSING)
        return bool(value == expected and service.stats()["local_hits"] > before)

    await eventually(local_hit)


async def _equals(service: CacheService, key: str, expected: Any) -> bool:
    return bool(await service.get(key, MISSING) == expected)


async def test_the_local_tier_answers_without_redis(
    pair: tuple[CacheService, CacheService],
) -> None:
    a, b = pair
    await a.set("k", "v1", ttl=60)
    await prime(b, "k", "v1")
    await b.redis.unlink(b.redis_key("k"))  # behind the cache's back: no invalidation sent
    assert await b.get("k") == "v1"  # so the local copy is what answers


@pytest.mark.parametrize(
    "change",
    ["set", "delete", "expire", "set_many", "invalidate_tags", "invalidate", "clear"],
)
async def test_a_change_in_one_process_evicts_the_others(
    pair: tuple[CacheService, CacheService], change: str
) -> None:
    a, b = pair
    await a.set("user:1", "old", ttl=60, tags=["users"])
    await prime(b, "user:1", "old")
    if change == "set":
        await a.set("user:1", "new", ttl=60)
        await eventually(lambda: _equals(b, "user:1", "new"))
        return
    if change == "delete":
        await a.delete("user:1")
    elif change == "expire":
        await a.expire("user:1", 0.05)
    elif change == "set_many":
        await a.set_many({"user:1": "new"}, ttl=60)
        await eventually(lambda: _equals(b, "user:1", "new"))
        return
    elif change == "invalidate_tags":
        await a.invalidate_tags("users")
    elif change == "invalidate":
        await a.invalidate("user:*")
    else:
        await a.clear()
    await eventually(lambda: _equals(b, "user:1", MISSING))


async def test_entries_learn_their_tags_from_redis(
    pair: tuple[CacheService, CacheService],
) -> None:
    a, b = pair
    await a.set("x", 1, ttl=60, tags=["t"])
    await a.set("y", 2, ttl=60)
    await prime(b, "x", 1)
    await prime(b, "y", 2)
    await a.invalidate_tags("t")
    await eventually(lambda: _equals(b, "x", MISSING))
    assert await b.get("y") == 2 and b.local is not None and len(b.local) == 1


async def test_writes_in_the_own_process_are_read_back(
    pair: tuple[CacheService, CacheService],
) -> None:
    a, _ = pair
    await a.set("k", 1, ttl=60)
    await prime(a, "k", 1)
    await a.set("k", 2, ttl=60)
    assert await a.get("k") == 2
    await a.delete("k")
    assert await a.get("k", MISSING) is MISSING


async def test_resubscribing_flushes_the_tier(pair: tuple[CacheService, CacheService]) -> None:
    a, b = pair
    await a.set("k", "v1", ttl=60)
    await prime(b, "k", "v1")
    assert b._listener is not None
    await b._listener.aclose()  # the subscription drops...
    await a.redis.set(a.redis_key("k"), a.codec.encode("v2"))  # ...and a change goes unnoticed
    assert await b.get("k") == "v2"  # an unsubscribed tier serves nothing
    assert await b.start()  # resubscribed: everything cached before is gone
    assert b.stats()["local"]["subscriptions"] == 2
    assert await b.get("k") == "v2"


async def test_get_or_set_and_get_many_use_the_local_tier(
    pair: tuple[CacheService, CacheService],
) -> None:
    a, b = pair
    calls = 0

    async def factory() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await a.get_or_set("k", factory, ttl=60) == 1
    await prime(b, "k", 1)
    before = b.stats()["local_hits"]
    assert await b.get_or_set("k", factory, ttl=60) == 1
    assert await b.get_many(["k", "missing"]) == {"k": 1}
    assert b.stats()["local_hits"] == before + 2 and calls == 1
    stats = b.stats()["local"]
    assert stats["active"] and stats["entries"] == 1 and stats["subscriptions"] == 1
