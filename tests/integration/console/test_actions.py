"""Console actions on a real redis-server, each touching only what it names."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.console import ConsoleLimiter, create_console
from app.services.cache import MISSING, get_cache
from app.services.locks import Semaphore
from app.services.rate_limit import RateLimiter
from app.services.sessions import SessionStore
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer
from app.testing.plugin import AppClientFactory

pytestmark = pytest.mark.integration

TOKEN = "ac-3Jf7hK1lZ9xC5vB2nM8qW4eR6tY0uIo"
BEARER = {"authorization": f"Bearer {TOKEN}"}
LIMIT = ConsoleLimiter("per user", lambda r: RateLimiter(r, policies="user=3/minute"))


async def _client(make: AppClientFactory, redis: Redis) -> Any:
    app = FastAPI()
    app.mount("/ops", create_console(token=TOKEN, limiters=[LIMIT]))
    return await make(app, redis)


async def test_resetting_an_identity_leaves_the_others_counted(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    limiter = RateLimiter(real_redis, policies="user=3/minute")  # the one LIMIT builds
    for who in ("u1", "u2"):
        for _ in range(3):
            assert await limiter.is_allowed(who)
    client = await _client(make_app_client, real_redis)
    page = await client.get(
        "/ops/limits", params={"limiter": "per user", "identity": "u1"}, headers=BEARER
    )
    assert "<td data-remaining>0</td>" in page.text
    done = await client.post(
        "/ops/limits/reset", data={"limiter": "per user", "identity": "u1"}, headers=BEARER
    )
    assert done.json()["outcome"] == "rate limit state of 'u1' reset"
    assert await limiter.is_allowed("u1")
    assert not await limiter.is_allowed("u2")
    unknown = await client.post(
        "/ops/limits/reset", data={"limiter": "nope", "identity": "u1"}, headers=BEARER
    )
    assert unknown.status_code == 400


async def test_deleting_a_cache_key_leaves_its_neighbours(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    cache = get_cache("cache", redis=real_redis)
    await cache.set("user:1", {"id": 1}, ttl=60, tags=["users"])
    await cache.set("user:2", {"id": 2}, ttl=60, tags=["users"])
    client = await _client(make_app_client, real_redis)
    looked_up = await client.get("/ops/cache", params={"key": "user:1"}, headers=BEARER)
    assert "user:1: stored, TTL" in looked_up.text
    tagged = await client.get("/ops/cache", params={"tag": "users"}, headers=BEARER)
    assert "<td>user:1</td>" in tagged.text and "<td>user:2</td>" in tagged.text
    done = await client.post("/ops/cache/delete-key", data={"key": "user:1"}, headers=BEARER)
    assert done.json()["outcome"] == "key 'user:1' deleted"
    assert await cache.get("user:1", MISSING) is MISSING
    assert await cache.get("user:2") == {"id": 2}


async def test_revoking_all_sessions_of_a_user_spares_other_users(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    store = SessionStore(real_redis)
    alice = [await store.create(data={"user": "alice"}, client_ip="10.0.0.1") for _ in range(2)]
    bob = await store.create(data={"user": "bob"}, client_ip="10.0.0.2")
    client = await _client(make_app_client, real_redis)
    listed = await client.get("/ops/sessions", params={"user": "alice"}, headers=BEARER)
    assert listed.text.count("10.0.0.1") == 2 and "10.0.0.2" not in listed.text
    done = await client.post(
        "/ops/sessions/revoke", data={"user": "alice", "all": "yes"}, headers=BEARER
    )
    assert done.json()["outcome"] == "2 sessions of 'alice' revoked"
    assert [await store.get(r.id) for r in alice] == [None, None]
    assert await store.get(bob.id) is not None


async def test_trim_keeps_entries_a_group_still_needs(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    async def handler(message: StreamMessage[Any]) -> None:
        return None

    consumer: StreamConsumer[Any] = StreamConsumer(real_redis, "jobs", "g", "c", handler)
    await consumer.ensure_group()
    producer = StreamProducer(real_redis, "jobs")
    await producer.add_many([{"n": i} for i in range(10)])
    assert await consumer.run_once(block=0.1) > 0  # some handled and acked
    await producer.add_many([{"n": i} for i in range(10, 15)])  # not yet delivered
    client = await _client(make_app_client, real_redis)
    done = await client.post(
        "/ops/streams/trim", data={"stream": "jobs", "maxlen": "0"}, headers=BEARER
    )
    assert done.status_code == 200
    assert await producer.length() >= 5  # the undelivered entries survive
    assert await consumer.run_once(block=0.1) == 5
    bad = await client.post(
        "/ops/streams/trim", data={"stream": "jobs", "maxlen": "-1"}, headers=BEARER
    )
    assert bad.status_code == 400


async def test_pending_entries_and_semaphores_are_shown(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    producer = StreamProducer(real_redis, "mail")
    await producer.add_many([{"n": 1}, {"n": 2}])
    key = producer.keys.stream
    await real_redis.xgroup_create(key, "senders", id="0")
    await real_redis.xreadgroup("senders", "sender-7", {key: ">"}, count=1)  # one left unacked
    exports = Semaphore(real_redis, "exports", limit=3, timeout=60)
    permit = await exports.acquire()
    assert permit is not None
    client = await _client(make_app_client, real_redis)
    detail = await client.get("/ops/streams/detail", params={"name": "mail"}, headers=BEARER)
    assert "1 consumers · 1 pending · lag 1" in detail.text
    assert re.search(r"<td>\d+-\d+</td><td>sender-7</td><td>[\d.]+</td><td>1</td>", detail.text)
    locks = await client.get("/ops/locks", headers=BEARER)
    assert re.search(r"<tr><td>exports</td><td>1</td>", locks.text)
    await permit.release()


async def test_logging_out_ends_the_browser_session(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await _client(make_app_client, real_redis)
    await client.post("/ops/login", data={"token": TOKEN})
    page = await client.get("/ops/", headers={"accept": "text/html"})
    assert page.status_code == 200
    marker = 'name="csrf" value="'
    csrf = page.text[page.text.index(marker) + len(marker) :].split('"', 1)[0]
    assert (await client.post("/ops/logout", data={})).status_code == 403
    out = await client.post("/ops/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/ops/login"
    assert (await client.get("/ops/")).status_code == 401
