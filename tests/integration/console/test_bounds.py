"""The console's Redis cost is bounded, and its listings walk every Cluster primary.

Costs are counted as commands the server ran (``INFO commandstats``), never
timed: a page over a keyspace of 20,000 keys makes a fixed, small number of
calls and offers the next page instead of walking everything.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.console import create_console
from app.core.config import get_settings
from app.core.keys import KeySpace
from app.services.locks import RedisLock
from app.services.pubsub import Broadcaster
from app.services.streams import StreamProducer
from app.testing.plugin import AppClientFactory

pytestmark = pytest.mark.integration

TOKEN = "bd-4Kd8sL2pQ7wE9rT1yU6iO3aS5dF0gHj"
BEARER = {"authorization": f"Bearer {TOKEN}", "accept": "text/html"}


def _app() -> FastAPI:
    app = FastAPI()
    app.mount("/ops", create_console(token=TOKEN))
    return app


async def _commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def _fill(redis: Redis, service: str, count: int) -> None:
    prefix = get_settings().redis_key_prefix
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, count, 1000):
            pipe.mset({f"{prefix}:{service}:k{i}": b"x" for i in range(start, start + 1000)})
        await pipe.execute()


async def test_the_overview_makes_a_bounded_number_of_calls_on_a_big_keyspace(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    await _fill(real_redis, "cache", 20_000)
    client = await make_app_client(_app(), real_redis)
    before = await _commands(real_redis)
    page = await client.get("/ops/", headers=BEARER)
    cost = await _commands(real_redis) - before
    assert page.status_code == 200
    assert "partial" in page.text  # the walk stopped at its budget, and says so
    assert cost <= 60, cost  # 20,000 keys would take 100+ SCANs of COUNT 200


async def test_the_locks_page_offers_a_next_page_instead_of_walking_everything(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    await _fill(real_redis, "other", 20_000)
    client = await make_app_client(_app(), real_redis)
    before = await _commands(real_redis)
    page = await client.get("/ops/locks", headers=BEARER)
    cost = await _commands(real_redis) - before
    assert page.status_code == 200
    assert "Next page" in page.text
    assert cost <= 25, cost  # at most 10 SCANs for locks and 10 for semaphores


def _next_cursor(html: str) -> str | None:
    found = re.search(r'href="/ops/locks\?cursor=([^"]+)"', html)
    return found.group(1).replace("%2E", ".") if found else None


async def test_every_held_lock_is_listed_across_pages_and_primaries(
    make_app_client: AppClientFactory, topology_redis: Any
) -> None:
    held = [RedisLock(topology_redis, f"jobs:{i}", timeout=60) for i in range(40)]
    for lock in held:
        assert await lock.acquire()
    client = await make_app_client(_app(), topology_redis)
    seen: set[str] = set()
    cursor: str | None = None
    for _ in range(100):
        page = await client.get("/ops/locks", params={"cursor": cursor or ""}, headers=BEARER)
        assert page.status_code == 200
        seen.update(re.findall(r'data-lock="([^"]+)"', page.text))
        cursor = _next_cursor(page.text)
        if cursor is None:
            break
    assert seen == {f"jobs:{i}" for i in range(40)}


async def test_pages_render_on_every_topology(
    make_app_client: AppClientFactory, topology_redis: Any
) -> None:
    await StreamProducer(topology_redis, "events").add({"n": 1})
    client = await make_app_client(_app(), topology_redis)
    for path in ("/ops/", "/ops/streams", "/ops/cache", "/ops/pubsub", "/ops/sessions"):
        page = await client.get(path, headers=BEARER)
        assert page.status_code == 200, (path, page.text[:300])
    streams = await client.get("/ops/streams", headers=BEARER)
    assert ">events</a>" in streams.text
    overview = await client.get("/ops/", headers=BEARER)
    assert "<td>stream</td>" in overview.text
    audit_key = KeySpace(get_settings().redis_key_prefix, "console").key("audit")
    assert await topology_redis.exists(audit_key) == 0  # reading writes nothing


async def test_channels_with_subscribers_and_history_are_listed_on_every_topology(
    make_app_client: AppClientFactory, topology_redis: Any
) -> None:
    async with (
        Broadcaster(topology_redis, history=10) as broadcaster,
        broadcaster.subscribe("room-1", "room-2"),
    ):
        await broadcaster.publish("room-1", {"hello": "ops"})
        client = await make_app_client(_app(), topology_redis)
        page = await client.get("/ops/pubsub", headers=BEARER)
    assert page.status_code == 200
    rows = re.findall(r"<tr><td>(room-\d)</td><td>(\d+)</td><td>(.*?)</td></tr>", page.text)
    assert [(name, count) for name, count, _ in rows] == [("room-1", "1"), ("room-2", "1")]
    assert "hello" in rows[0][2] and "none kept" in rows[1][2]
