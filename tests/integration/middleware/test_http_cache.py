"""HttpCacheMiddleware on real Redis: the same HTTP behaviour, real clocks, outages, processes."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.core.errors import RedisUnavailable
from app.core.redis import build_client
from app.middleware.http_cache import HttpCachePolicy
from app.services.http_cache import HttpResponseCache, compute_etag, url_digest_for
from app.testing.clients import ready
from app.testing.plugin import RedisServerInfo
from app.testing.servers import RedisServer
from app.testing.waiting import eventually
from tests.unit.middleware.test_http_cache import age_entries, cache_layer, make_app

ROOT = Path(__file__).resolve().parents[3]  # the checkout under test

MakeClient = Callable[..., Awaitable[httpx.AsyncClient]]


async def test_http_caching_end_to_end(topology_redis: Any, make_app_client: MakeClient) -> None:
    """ETag/304 (lists, *), Vary, private entries, Set-Cookie/500/no-store, HEAD, Age."""
    app = make_app()
    client = await make_app_client(app, await ready(topology_redis))
    first, second = await client.get("/items/1"), await client.get("/items/1")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    etag = first.headers["etag"]
    assert etag == compute_etag(first.content, b"application/json")
    for header in (etag, f"W/{etag}", f'"x", {etag}', "*"):
        response = await client.get("/items/1", headers={"if-none-match": header})
        assert response.status_code == 304 and response.headers["etag"] == etag
    assert (await client.get("/items/1", headers={"if-none-match": '"x"'})).status_code == 200
    langs = [
        (await client.get("/lang", headers={"accept-language": lang})).json()["lang"]
        for lang in ("fr", "de", "fr")
    ]
    assert langs == ["fr", "de", "fr"] and app.state.calls["lang"] == 2
    users = [
        (await client.get("/me", headers={"authorization": who})).json()["user"]
        for who in ("alice", "bob", "alice", "bob")
    ]
    assert users == ["alice", "bob", "alice", "bob"] and app.state.calls["me"] == 2
    for path in ("/cookie", "/cc?status=500", "/cc?cc=no-store"):
        assert [(await client.get(path)).headers["x-cache"] for _ in range(2)] == ["MISS", "MISS"]
    client.cookies.clear()  # /cookie set one: later requests would be private (own entries)
    head = await client.head("/items/1")
    assert (head.headers["x-cache"], head.content) == ("HIT", b"")
    await age_entries(topology_redis, 3)
    assert (await client.get("/items/1")).headers["age"] == "3"
    assert app.state.calls["item"] == 1


async def test_decode_responses_client(
    make_app_client: MakeClient, redis_server: RedisServerInfo, real_redis: Redis
) -> None:
    text_client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        app = make_app()
        client = await make_app_client(app, text_client)
        responses = [await client.get("/stream?size=3000") for _ in range(2)]
        assert [r.headers["x-cache"] for r in responses] == ["MISS", "HIT"]
        assert responses[1].content == b"x" * 3000
        me = [await client.get("/me", headers={"cookie": "s=1"}) for _ in range(2)]
        assert [r.headers["x-cache"] for r in me] == ["MISS", "HIT"]
    finally:
        await text_client.aclose()


async def test_age_and_expiry_on_the_server_clock(
    make_app_client: MakeClient, real_redis: Redis
) -> None:
    app = make_app(HttpCachePolicy(ttl=2))
    client = await make_app_client(app, real_redis)
    await client.get("/items/1")

    async def cache_state(x_cache: str, age: str | None = None) -> bool:
        response = await client.get("/items/1")
        headers = response.headers
        return headers["x-cache"] == x_cache and (age is None or headers.get("age") == age)

    # a second old by the server's clock, still fresh; then expired, computed anew
    await eventually(lambda: cache_state("HIT", "1"), "a hit one second old")
    await eventually(lambda: cache_state("MISS"), "the entry to expire after 2 s")


async def test_stale_while_revalidate_under_concurrency(
    make_app_client: MakeClient, real_redis: Redis
) -> None:
    app = make_app()
    client = await make_app_client(app, real_redis)
    await client.get("/clock")
    await age_entries(real_redis, 30)
    responses = await asyncio.gather(*[client.get("/clock") for _ in range(50)])
    assert responses[0].headers["x-cache"] == "STALE"
    assert {r.status_code for r in responses} == {200}
    await cache_layer(app).drain()
    assert app.state.calls["clock"] == 2
    assert (await client.get("/clock")).headers["x-cache"] == "HIT"


async def test_two_app_instances_share_entries_and_private_entries_with_one_secret(
    make_app_client: MakeClient, real_redis: Redis, settings_override: Callable[..., None]
) -> None:
    """Two workers (two app instances, one Redis) with the same SECRET_KEY."""
    settings_override(secret_key="s" * 40)
    one, two = make_app(), make_app()
    client_one = await make_app_client(one, real_redis)
    client_two = await make_app_client(two, real_redis)
    a = await client_one.get("/items/1")
    b = await client_two.get("/items/1")
    assert (b.headers["x-cache"], b.headers["etag"]) == ("HIT", a.headers["etag"])
    await client_one.get("/me", headers={"authorization": "alice"})
    shared = await client_two.get("/me", headers={"authorization": "alice"})
    assert shared.headers["x-cache"] == "HIT" and shared.json() == {"user": "alice"}
    other = await client_two.get("/me", headers={"authorization": "bob"})
    assert other.headers["x-cache"] == "MISS" and other.json() == {"user": "bob"}


_WORKER = """
import asyncio, sys
import httpx
from app.core import redis as core_redis
from app.core.errors import RedisUnavailable
from app.core.redis import build_client
from tests.unit.middleware.test_http_cache import make_app

async def main() -> None:
    core_redis.redis_client = build_client(url=sys.argv[1])
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/lang", headers={"accept-language": "fr"})
        print(response.headers["x-cache"], response.headers["etag"], response.text)
    await core_redis.redis_client.aclose()

asyncio.run(main())
"""


def _worker(url: str, seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed, "SECRET_KEY": "k" * 40}
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.split()


async def test_etags_and_entries_are_shared_across_processes(
    redis_server: RedisServerInfo, real_redis: Redis
) -> None:
    first = await asyncio.to_thread(_worker, redis_server.url, "1")
    second = await asyncio.to_thread(_worker, redis_server.url, "2")
    assert first[0] == "MISS" and second[0] == "HIT"
    assert first[1] == second[1] == compute_etag(b'{"lang":"fr"}', b"application/json")


async def test_redis_stopped_mid_test_the_origin_still_answers(
    make_app_client: MakeClient,
    private_server: RedisServer,
    settings_override: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings_override(breaker_reset_timeout=1.0, redis_retry_attempts=0)
    redis = build_client(url=private_server.url)
    try:
        app = make_app(timeout=0.5)
        client = await make_app_client(app, redis)
        await client.get("/items/1")
        assert (await client.get("/items/1")).headers["x-cache"] == "HIT"

        private_server.stop()
        with caplog.at_level(logging.WARNING, logger="app"):
            down = [await client.get("/items/1") for _ in range(20)]
        assert {(r.status_code, r.headers["x-cache"]) for r in down} == {(200, "MISS")}
        assert all(r.json() == {"id": 1, "version": 0} for r in down)
        opened = [r for r in caplog.records if "opened" in r.getMessage()]
        assert len(opened) == 1  # one log line per breaker transition, not per request
        assert not [r for r in caplog.records if r.name == "app.http_cache"]
        assert app.state.calls["item"] == 21

        private_server.start()  # empty, and without our scripts: NOSCRIPT -> EVAL

        async def cached() -> bool:  # once the breaker lets a trial call through
            response = await client.get("/items/1")
            assert response.status_code == 200  # served all along
            return response.headers["x-cache"] == "HIT"

        await eventually(cached, "caching to resume on its own", interval=0.1)
    finally:
        await redis.aclose()


async def test_redis_hanging_costs_at_most_the_timeout(
    make_app_client: MakeClient, private_server: RedisServer
) -> None:
    redis = build_client(url=private_server.url)
    try:
        app = make_app(timeout=0.2)
        client = await make_app_client(app, redis)
        await client.get("/items/1")
        private_server.pause()
        try:
            responses = [await client.get("/items/1") for _ in range(3)]
        finally:
            private_server.resume()
        assert {(r.status_code, r.headers["x-cache"]) for r in responses} == {(200, "MISS")}
    finally:
        await redis.aclose()


async def test_invalidation_reports_an_unreachable_redis(
    private_server: RedisServer, settings_override: Callable[..., None]
) -> None:
    settings_override(redis_retry_attempts=0)
    redis = build_client(url=private_server.url)
    try:
        cache = HttpResponseCache(redis)
        assert await cache.invalidate("http://t/x") is False
        private_server.stop()
        with pytest.raises(RedisUnavailable):
            await cache.invalidate("http://t/x")
    finally:
        await redis.aclose()


async def test_a_store_refused_for_now_fails_open_and_is_logged_once(
    private_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """OOM (maxmemory + noeviction): the breaker stays closed and says nothing, the cache does."""
    redis = build_client(url=private_server.url)
    admin = Redis(port=private_server.port)
    try:
        cache = HttpResponseCache(redis)
        url = url_digest_for("http://t/x")
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        with caplog.at_level(logging.WARNING, logger="app.http_cache"):
            for _ in range(3):
                stored = await cache.store(
                    url, "v", spec="", generation="", status=200, headers=[], body=b"x",
                    etag='"x"', last_modified=0, fresh_ms=60_000,
                )  # fmt: skip
                assert stored is None
        assert cache.stats.errors == 3 and cache.stats.stores == 0
        warnings = [r.getMessage() for r in caplog.records if r.name == "app.http_cache"]
        assert len(warnings) == 1, warnings  # once per change, not per request
        assert "refused the call for now" in warnings[0]
        assert cache._guard.breaker.state == "closed"
        await admin.config_set("maxmemory", 0)
        stored = await cache.store(
            url, "v", spec="", generation="", status=200, headers=[], body=b"x",
            etag='"x"', last_modified=0, fresh_ms=60_000,
        )  # fmt: skip
        assert stored is not None and stored.stored
    finally:
        await admin.aclose()
        await redis.aclose()


async def test_every_topology(topology_redis: Any, make_app_client: MakeClient) -> None:
    """Standalone, Cluster and Sentinel: hit, 304, Vary, private entries, invalidation, clear."""
    app = make_app()
    client = await make_app_client(app, await ready(topology_redis))
    first, second = await client.get("/items/1"), await client.get("/items/1")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    etag = first.headers["etag"]
    assert (await client.get("/items/1", headers={"if-none-match": etag})).status_code == 304
    for lang in ("fr", "de", "fr"):
        assert (await client.get("/lang", headers={"accept-language": lang})).json() == {
            "lang": lang
        }
    await client.get("/me", headers={"authorization": "alice"})
    assert (await client.get("/me", headers={"authorization": "bob"})).json() == {"user": "bob"}
    await client.put("/items/1")
    assert (await client.get("/items/1")).headers["x-cache"] == "MISS"
    assert app.state.calls == {"item": 2, "lang": 2, "me": 2}
    assert await HttpResponseCache(topology_redis).clear() > 0
    assert (await client.get("/lang", headers={"accept-language": "fr"})).headers[
        "x-cache"
    ] == "MISS"
