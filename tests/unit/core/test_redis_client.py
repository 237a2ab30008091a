"""The global client: lazy creation, init bounds, redirection by assignment, lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import pytest
from fastapi import FastAPI, Request

from app.api.deps import RedisDep
from app.core import redis as core_redis
from app.core.errors import PatternTooComplex, RedisUnavailable
from app.core.redis import (
    client_decodes_responses,
    close_redis,
    get_redis,
    init_redis,
    redis_lifespan,
    scan_keys,
    unlink_matching,
)
from app.testing.servers import free_port


async def test_get_redis_is_lazy_and_returns_one_client(
    settings_override: Callable[..., None],
) -> None:
    settings_override(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    core_redis.redis_client = None
    client = get_redis()  # no server listens there: building must not connect
    try:
        assert get_redis() is client
        assert core_redis.redis_client is client
    finally:
        await close_redis()
    assert core_redis.redis_client is None


async def test_init_redis_gives_up_after_its_bound_naming_the_masked_url(
    settings_override: Callable[..., None],
) -> None:
    port = free_port()
    settings_override(redis_url=f"redis://:topsecret@127.0.0.1:{port}/0", redis_connect_timeout=0.2)
    core_redis.redis_client = None
    start = time.monotonic()
    with pytest.raises(RedisUnavailable) as info:
        await init_redis(timeout=0.8)
    elapsed = time.monotonic() - start
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "topsecret" not in str(info.value)
    assert "***" in (info.value.url or "")
    assert elapsed < 10  # bounded: it gave up instead of retrying forever
    assert core_redis.redis_client is None  # the half-built client was closed


async def test_init_redis_keeps_an_assigned_client_and_close_leaves_it_alone() -> None:
    fake = fakeredis.FakeAsyncRedis()
    core_redis.redis_client = fake
    assert await init_redis() is fake
    await close_redis()
    assert core_redis.redis_client is fake  # not ours to close
    assert await fake.ping()
    await fake.aclose()


async def test_memory_url_gives_a_working_embedded_store(
    settings_override: Callable[..., None],
) -> None:
    settings_override(redis_url="memory://")
    core_redis.redis_client = None
    client = await init_redis()
    try:
        await client.set("k", b"v")
        assert await get_redis().get("k") == b"v"
        assert await client.eval("return 41 + 1", 0) == 42  # Lua works in the embedded store
    finally:
        await close_redis()


async def test_assigning_the_global_client_redirects_a_running_app(make_app_client: Any) -> None:
    app = FastAPI(lifespan=redis_lifespan())

    @app.get("/value")
    async def value(redis: RedisDep) -> dict[str, Any]:
        raw = await redis.get("key")
        return {"value": raw.decode() if isinstance(raw, bytes) else raw}

    first, second = fakeredis.FakeAsyncRedis(), fakeredis.FakeAsyncRedis()
    await first.set("key", "from-first")
    await second.set("key", "from-second")
    client = await make_app_client(app, first)
    assert (await client.get("/value")).json() == {"value": "from-first"}
    core_redis.redis_client = second  # while the app runs
    assert (await client.get("/value")).json() == {"value": "from-second"}
    await first.aclose()
    await second.aclose()


async def test_redis_lifespan_composes_with_the_users_lifespan(make_app_client: Any) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def mine(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        assert core_redis.redis_client is not None  # Redis is up before the user's startup
        events.append("start")
        yield {"greeting": "hi"}
        events.append("stop")

    app = FastAPI(lifespan=redis_lifespan(mine))

    @app.get("/state")
    async def state(request: Request) -> dict[str, str]:
        return {"greeting": request.state.greeting}

    client = await make_app_client(app, fakeredis.FakeAsyncRedis())
    assert events == ["start"]
    assert (await client.get("/state")).json() == {"greeting": "hi"}


def test_decode_responses_is_detected() -> None:
    assert client_decodes_responses(fakeredis.FakeAsyncRedis(decode_responses=True))
    assert not client_decodes_responses(fakeredis.FakeAsyncRedis())


async def test_scan_helpers_bound_the_pattern_before_calling_redis() -> None:
    client = fakeredis.FakeAsyncRedis()
    await client.mset({"a" * 200: 1, "ab": 2})
    with pytest.raises(PatternTooComplex, match=r"SCAN pattern .* has 10 wildcards"):
        await unlink_matching(client, "*a" * 10)
    with pytest.raises(PatternTooComplex, match="has 5 wildcards"):
        [k async for k in scan_keys(client, "[a]?*[b]?")]
    assert await client.dbsize() == 2  # nothing removed
    assert [k async for k in scan_keys(client, "a***b")] == [b"ab"]  # runs of stars count once
    assert await unlink_matching(client, "\\*\\*\\*\\*\\*ab") == 0  # escaped: literal
    await client.aclose()
