"""Every service's basic operations give the same results with REDIS_AUTOPIPELINE on and off.

Each test runs twice on a real server: on the plain pooled client and on the
multiplexed one, both built by ``build_client`` from settings. On the
multiplexed run the test also checks the commands really went over the links.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from app.core.multiplex import MultiplexedRedis
from app.core.redis import build_client
from app.services.cache import CacheService
from app.services.idempotency import IdempotencyService
from app.services.locks import RedisLock
from app.services.rate_limit import RateLimiter
from app.services.sessions import SessionStore
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer

pytestmark = pytest.mark.integration


@pytest.fixture(params=[False, True], ids=["pool", "multiplexed"])
async def client(
    request: pytest.FixtureRequest,
    redis_server: Any,
    real_redis: Redis,
    settings_override: Callable[..., None],
) -> AsyncIterator[Any]:
    settings_override(redis_url=redis_server.url, redis_autopipeline=request.param)
    built = build_client()
    assert isinstance(built, MultiplexedRedis) == request.param
    try:
        yield built
        if isinstance(built, MultiplexedRedis):
            mux = built.multiplexer
            assert mux is not None and mux.connects >= 1  # the service's commands used the links
    finally:
        await built.aclose()


async def test_cache_get_set(client: Any) -> None:
    cache = CacheService(client)
    assert await cache.get("user:1") is None
    await cache.set("user:1", {"id": 1, "name": "Ada"}, ttl=60)
    assert await cache.get("user:1") == {"id": 1, "name": "Ada"}
    values = await asyncio.gather(*(cache.get("user:1") for _ in range(200)))
    assert values == [{"id": 1, "name": "Ada"}] * 200
    await cache.delete("user:1")
    assert await cache.get("user:1") is None


async def test_rate_limiter_admits_exactly_the_limit_under_concurrency(client: Any) -> None:
    limiter = RateLimiter(client, max_requests=30, window_seconds=3600)
    verdicts = await asyncio.gather(*(limiter.is_allowed("user-1") for _ in range(100)))
    assert sum(verdicts) == 30
    assert await limiter.is_allowed("user-2") is True  # another caller has its own budget


async def test_lock_acquire_release(client: Any) -> None:
    first = RedisLock(client, "resource:1", timeout=5)
    second = RedisLock(client, "resource:1", timeout=5)
    assert await first.acquire() is True
    assert await second.acquire() is False
    await first.release()
    assert await second.acquire() is True
    await second.release()


async def test_lock_contenders_get_it_one_at_a_time(client: Any) -> None:
    holders = 0
    most = 0

    async def work() -> None:
        nonlocal holders, most
        async with RedisLock(client, "resource:2", timeout=5, blocking_timeout=20):
            holders += 1
            most = max(most, holders)
            await asyncio.sleep(0)
            holders -= 1

    await asyncio.gather(*(work() for _ in range(20)))
    assert most == 1


async def test_idempotency(client: Any) -> None:
    svc = IdempotencyService(client, ttl=60)
    assert await svc.is_duplicate("req-1") is False
    await svc.store_request("req-1", {"ok": 1})
    assert await svc.is_duplicate("req-1") is True
    assert await svc.get_result("req-1") == {"ok": 1}
    claims = await asyncio.gather(*(svc.claim("req-2", "fp") for _ in range(50)))
    new = [c for c in claims if c.status == "new"]
    assert len(new) == 1 and {c.status for c in claims} == {"new", "in_flight"}
    assert new[0].token is not None
    assert await svc.complete("req-2", new[0].token, {"done": True}) is True
    again = await svc.claim("req-2", "fp")
    assert (again.status, again.result) == ("completed", {"done": True})
    assert (await svc.claim("req-2", "other")).status == "mismatch"


async def test_streams_add_and_run_once(client: Any) -> None:
    seen: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append(message.payload)

    producer = StreamProducer(client, "events", maxlen=1000)
    consumer = StreamConsumer(client, "events", "group", "worker-1", handler, block=0.1)
    await consumer.ensure_group()
    ids = await asyncio.gather(*(producer.add({"n": n}) for n in range(10)))
    assert len(set(ids)) == 10
    handled = 0
    while handled < 10:
        handled += await consumer.run_once(block=0.1)
    assert sorted(p["n"] for p in seen) == list(range(10))


async def test_sessions_create_get(client: Any) -> None:
    store = SessionStore(client)
    records = await asyncio.gather(
        *(store.create(data={"user": n}, client_ip="10.0.0.1") for n in range(20))
    )
    loaded = await asyncio.gather(*(store.get(r.id) for r in records))
    for n, (made, got) in enumerate(zip(records, loaded, strict=True)):
        assert got is not None and got.id == made.id and got.data == {"user": n}
    assert await store.get("no-such-session") is None


async def test_through_asgi_no_caller_sees_another_callers_session(
    redis_server: Any,
    real_redis: Redis,
    settings_override: Callable[..., None],
    make_app_client: Callable[..., Any],
) -> None:
    """Alice and Bob, 100 concurrent profile reads each on one multiplexed client: each
    request answers with its own caller's session, never the other's."""
    settings_override(redis_url=redis_server.url, redis_autopipeline=True)
    shared = build_client()
    assert isinstance(shared, MultiplexedRedis)
    try:
        alice = await make_app_client(None, shared)
        bob = await make_app_client(None, shared)
        for http, user in ((alice, "alice"), (bob, "bob")):
            assert (await http.post("/session/login", json={"user": user})).status_code == 200

        async def profile(http: Any) -> Any:
            response = await http.get("/session/profile")
            assert response.status_code == 200
            return response.json()["user"]

        calls = [profile(alice) if i % 2 == 0 else profile(bob) for i in range(200)]
        users = await asyncio.gather(*calls)
        assert users == ["alice" if i % 2 == 0 else "bob" for i in range(200)]
        mux = shared.multiplexer
        assert mux is not None and mux.max_in_flight_seen > 1  # requests shared the links
    finally:
        await shared.aclose()
