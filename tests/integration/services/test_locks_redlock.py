"""Redlock on three spawned redis-server processes: quorum with failures."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.core.errors import LockNotAcquired, RedisUnavailable
from app.services.locks import Redlock
from app.testing.servers import RedisServer, redis_server_binary
from app.testing.waiting import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(redis_server_binary() is None, reason="needs redis-server on PATH"),
]


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    started: list[RedisServer] = []
    try:
        for _ in range(3):
            started.append(RedisServer().start())
        yield started
    finally:
        for server in started:
            server.cleanup()


@pytest_asyncio.fixture
async def masters(servers: list[RedisServer]) -> AsyncIterator[list[Redis]]:
    clients = [
        Redis.from_url(s.url, socket_connect_timeout=0.2, socket_timeout=0.5) for s in servers
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


async def _holders(masters: list[Redis], key: str) -> int:
    total = 0
    for client in masters:
        with contextlib.suppress(Exception):  # a stopped master holds nothing
            total += int(await client.exists(key))
    return total


async def test_acquires_on_all_three_and_excludes_a_second_owner(masters: list[Redis]) -> None:
    first = Redlock(masters, "billing", timeout=1, node_timeout=0.25)
    second = Redlock(masters, "billing", timeout=1, node_timeout=0.25)
    assert await first.acquire()
    assert await _holders(masters, first.key) == 3
    assert not await second.acquire()
    with pytest.raises(LockNotAcquired):
        async with Redlock(masters, "billing", timeout=1, node_timeout=0.25, blocking_timeout=0.1):
            pytest.fail("entered a held Redlock")
    await first.release()
    assert await _holders(masters, first.key) == 0
    assert await second.acquire()
    await second.release()


async def test_acquires_with_one_master_stopped_and_fails_with_two(
    servers: list[RedisServer], masters: list[Redis]
) -> None:
    servers[0].stop()
    lock = Redlock(masters, "billing", timeout=5, node_timeout=1)  # a stalled host still answers
    assert await lock.acquire()
    assert 0 < lock.validity < 5
    assert await lock.owned()
    assert await _holders(masters, lock.key) == 2
    assert not await Redlock(masters, "billing", timeout=5, node_timeout=1).acquire()
    await lock.release()
    assert await _holders(masters, lock.key) == 0

    servers[1].stop()
    with pytest.raises(RedisUnavailable, match="only 1 of 3 masters"):
        await lock.acquire()
    with pytest.raises(RedisUnavailable):
        async with Redlock(masters, "billing", timeout=1, node_timeout=0.25, blocking_timeout=0.2):
            pytest.fail("entered without a quorum")
    assert await _holders(masters, lock.key) == 0  # the lone master's key was undone


async def test_watchdog_renews_on_the_surviving_majority(
    servers: list[RedisServer], masters: list[Redis]
) -> None:
    servers[2].stop()
    clients = masters
    async with Redlock(clients, "billing", timeout=1, auto_renew=True, node_timeout=0.25) as lock:
        start = lock.deadline  # a renewal sent three leases later must be confirmed
        assert start is not None
        end = start + 3 * lock.timeout
        await eventually(lambda: (lock.deadline or 0.0) >= end, "3 leases of renewals")
        assert await lock.owned()
        assert not await Redlock(clients, "billing", timeout=1).acquire()
    assert await _holders(clients, lock.key) == 0
