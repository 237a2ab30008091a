"""The global client against real servers: late start, restarts, pool bursts, health."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from app.core import redis as core_redis
from app.core.config import get_settings
from app.core.errors import RedisUnavailable
from app.core.redis import (
    breaker_for,
    build_client,
    close_redis,
    health,
    init_redis,
    scan_keys,
    unlink_matching,
)
from app.core.scripts import Script
from app.testing.servers import RedisServer, free_port
from app.testing.waiting import cancel_after, eventually

pytestmark = pytest.mark.integration

both_paths = pytest.mark.parametrize(
    "autopipeline", [True, False], ids=["multiplexed", "pool"]
)  # the core client behaviours hold with REDIS_AUTOPIPELINE on and off


async def test_init_redis_waits_for_a_server_that_starts_late(
    settings_override: Callable[..., None],
) -> None:
    port = free_port()
    settings_override(redis_url=f"redis://127.0.0.1:{port}/0", redis_connect_timeout=0.2)
    core_redis.redis_client = None
    server = RedisServer(port=port)
    try:
        init = asyncio.create_task(init_redis(timeout=15))
        await asyncio.sleep(0.6)
        assert not init.done()  # still retrying: nothing listens yet
        await asyncio.to_thread(server.start)
        client = await asyncio.wait_for(init, 15)
        assert await client.ping()
    finally:
        await close_redis()
        server.cleanup()


async def test_lua_script_runs_after_script_flush(real_redis: Redis) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])", name="incrby")
    assert await script(real_redis, ["n"], [2]) == 2
    await real_redis.script_flush()
    assert await real_redis.script_exists(script.sha) == [False]
    assert await script(real_redis, ["n"], [3]) == 5  # NOSCRIPT -> EVAL reloads it
    assert await real_redis.script_exists(script.sha) == [True]
    assert await script(real_redis, ["n"], [1]) == 6


@both_paths
async def test_client_recovers_after_a_server_restart(
    private_server: RedisServer, settings_override: Callable[..., None], autopipeline: bool
) -> None:
    settings_override(redis_url=private_server.url, redis_autopipeline=autopipeline)
    client: Any = build_client()
    try:
        script = Script("return redis.call('SET', KEYS[1], ARGV[1])", name="set")
        await script(client, ["k"], ["v1"])
        await asyncio.to_thread(private_server.restart)  # data and script cache are gone
        await script(client, ["k"], ["v2"])  # stale connection retried, script reloaded
        assert await client.get("k") == b"v2"
    finally:
        await client.aclose()


@both_paths
async def test_breaker_opens_while_redis_is_down_and_closes_after_recovery(
    private_server: RedisServer, settings_override: Callable[..., None], autopipeline: bool
) -> None:
    settings_override(
        redis_url=private_server.url,
        redis_autopipeline=autopipeline,
        breaker_failure_threshold=2,
        breaker_reset_timeout=0.3,
        redis_socket_timeout=0.3,
        redis_connect_timeout=0.3,
        redis_retry_attempts=0,
    )
    client: Any = build_client()
    breaker = breaker_for(client)
    try:
        with breaker:
            await client.ping()
        await asyncio.to_thread(private_server.stop)
        for _ in range(2):
            with pytest.raises(RedisUnavailable), breaker:
                await client.ping()
        assert breaker.state == "open"
        rejected = breaker.stats()["rejected"]
        with pytest.raises(RedisUnavailable, match="is open"), breaker:
            await client.ping()
        # rejected by the breaker itself, without touching the network
        assert breaker.stats()["rejected"] == rejected + 1
        await asyncio.to_thread(private_server.start)
        await asyncio.sleep(0.35)
        assert str(breaker.stats()["state"]) == "half_open"
        with breaker:
            assert await client.ping()
        assert str(breaker.stats()["state"]) == "closed"
    finally:
        await client.aclose()


async def test_pool_waits_for_a_free_connection_instead_of_failing(
    real_redis: Redis, redis_server: Any, settings_override: Callable[..., None]
) -> None:
    settings_override(
        redis_url=redis_server.url,
        redis_pool_size=3,
        redis_pool_timeout=10,
        redis_autopipeline=False,  # the pool path: every command checks out a connection
    )
    client: Any = build_client()
    try:
        # 60 concurrent blocking commands, each holding a connection for 20 ms, through 3 connections
        results = await asyncio.gather(
            *(client.blpop([f"none:{i}"], timeout=0.02) for i in range(60))
        )
        assert results == [None] * 60
        assert len(client.connection_pool._available_connections) <= 3
    finally:
        await client.aclose()


async def test_pool_wait_is_bounded(
    real_redis: Redis, redis_server: Any, settings_override: Callable[..., None]
) -> None:
    settings_override(
        redis_url=redis_server.url,
        redis_pool_size=1,
        redis_pool_timeout=0.1,
        redis_autopipeline=False,  # the pool path: GET waits for the one pooled connection
    )
    client: Any = build_client()
    try:
        blocked_before = int((await real_redis.info("clients"))["blocked_clients"])
        holder: asyncio.Task[Any] = asyncio.create_task(client.blpop(["pool:held"], timeout=30))

        async def held() -> bool:  # the only connection is blocked in BLPOP on the server
            return int((await real_redis.info("clients"))["blocked_clients"]) > blocked_before

        await eventually(held, "the holder to block on the pool's only connection")
        with pytest.raises(redis_exc.ConnectionError, match="no free Redis connection within"):
            await client.get("x")
        await real_redis.lpush("pool:held", "done")  # let the holder go
        assert await holder is not None
    finally:
        await client.aclose()


async def _cancel_at_each_turn(command: Callable[[], Any], turns: int = 12) -> list[int]:
    """Cancel *command* after 1..*turns* loop turns, 5 times each; the turns whose cancel was
    lost (``cancel_after``: accepted, yet the command returned normally)."""
    return [
        turns_before
        for turns_before in range(1, turns + 1)
        for _ in range(5)
        if await cancel_after(turns_before, command) == "lost"
    ]


@pytest.mark.parametrize("build", ["toolkit", "redis-py"])
async def test_a_cancelled_command_on_a_pooled_connection_raises_in_its_caller(
    real_redis: Redis, redis_server: Any, settings_override: Callable[..., None], build: str
) -> None:
    # redis.asyncio wraps each write in asyncio.wait_for (a socket_timeout is set); on
    # Python 3.11 its wait_for returned the write's result to a caller cancelled as the
    # write finished (CPython gh-86296), and the command ran on: seen at turns 1-3, every
    # time, before app.core.pool delivered those cancellations. A caller's own client
    # (built by redis-py) gets the same delivery once the toolkit is imported.
    settings_override(redis_url=redis_server.url, redis_autopipeline=False)
    client: Any = (
        build_client() if build == "toolkit" else Redis.from_url(redis_server.url, socket_timeout=5)
    )
    try:
        await client.set("cancel:k", "v")
        assert await _cancel_at_each_turn(lambda: client.get("cancel:k")) == []
        assert await client.get("cancel:k") == b"v"  # the connections are still usable
    finally:
        await client.aclose()


async def test_a_write_that_cannot_finish_still_times_out(
    redis_server: Any, tcp_proxy: Callable[..., Any]
) -> None:
    proxy = tcp_proxy()
    client = Redis.from_url(proxy.url, socket_timeout=0.2, socket_connect_timeout=1)
    try:
        assert await client.ping()
        proxy.stall()  # the proxy stops reading: the socket buffers fill, the write blocks
        with pytest.raises(redis_exc.TimeoutError, match="writing"):
            await client.set("k", b"x" * (32 << 20))
    finally:
        proxy.resume()
        await client.aclose()


async def test_health_reports_version_and_role(real_redis: Redis) -> None:
    report = await health(real_redis)
    assert report["status"] == "ok"
    assert report["role"] == "master"
    assert str(report["version"]).startswith(("6.", "7.", "8."))
    assert report["latency_ms"] >= 0


async def test_scan_helpers_stay_inside_the_pattern(real_redis: Redis) -> None:
    await real_redis.mset({f"app:x:{i}": i for i in range(1200)} | {"app:y:1": 1, "other": 1})
    seen = {k async for k in scan_keys(real_redis, "app:x:*")}
    assert len(seen) == 1200
    assert await unlink_matching(real_redis, "app:x:*") == 1200
    assert await real_redis.dbsize() == 2


async def test_healthz_answers_503_problem_when_redis_is_down(
    private_server: RedisServer, make_app_client: Any, settings_override: Callable[..., None]
) -> None:
    settings_override(
        redis_url=private_server.url, redis_socket_timeout=0.3, redis_connect_timeout=0.3
    )
    client_redis = build_client(get_settings())
    client = await make_app_client(None, client_redis)
    assert (await client.get("/healthz")).status_code == 200
    await asyncio.to_thread(private_server.stop)
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 503 and body["type"].endswith("/redis-unavailable")
    assert response.headers["retry-after"] == "1"
    await client_redis.aclose()
