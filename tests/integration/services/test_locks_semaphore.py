"""Semaphore on a real redis-server: the limit under load, crashed holders, watchdog."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.core.errors import LockLost, LockNotAcquired
from app.services.locks import Semaphore
from app.testing.plugin import RedisServerInfo

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(params=[False, True], ids=["bytes", "decoded"])
async def redis(
    request: pytest.FixtureRequest, redis_server: RedisServerInfo, real_redis: Redis
) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=request.param)
    try:
        yield client
    finally:
        await client.aclose()


async def test_never_more_than_limit_holders_among_100_concurrent_tasks(
    redis: Redis, redis_server: RedisServerInfo
) -> None:
    limit = 5
    other = Redis.from_url(redis_server.url)  # a second pool, like a second worker
    inside = most = 0
    server_counts: list[int] = []

    async def task(n: int) -> None:
        nonlocal inside, most
        client = redis if n % 2 else other
        sem = Semaphore(client, "pool", limit, timeout=5, blocking_timeout=30)
        async with sem:
            inside += 1
            most = max(most, inside)
            server_counts.append(await sem.count())
            await asyncio.sleep(0.01)
            inside -= 1

    try:
        await asyncio.gather(*(task(n) for n in range(100)))
    finally:
        await other.aclose()
    assert len(server_counts) == 100
    assert most <= limit and max(server_counts) <= limit
    assert most == limit  # the permits were actually used, not serialised
    assert await Semaphore(redis, "pool", limit, timeout=5).count() == 0


async def test_a_crashed_holders_permit_returns_after_its_lease(
    redis: Redis, redis_server: RedisServerInfo
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.services._locks_worker",
            "hold-permit",
            redis_server.url,
            "reports",
            "1",
            "0.5",
        ],
        cwd="/work/main",
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "held"
        sem = Semaphore(redis, "reports", 1, timeout=5)
        assert await sem.acquire() is None  # the other process really holds it
        proc.kill()  # the holder crashes without releasing
        await asyncio.to_thread(proc.wait, 10)
        permit = await sem.acquire(blocking=True, blocking_timeout=5)
        assert permit is not None
        await permit.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def test_full_semaphore_raises_lock_not_acquired(redis: Redis) -> None:
    sem = Semaphore(redis, "reports", 2, timeout=10, blocking_timeout=0.1)
    async with sem, sem:
        with pytest.raises(LockNotAcquired) as caught:
            async with sem:
                pytest.fail("a third permit")
        assert caught.value.retry_after is not None and caught.value.retry_after > 5
    assert await sem.count() == 0


async def test_watchdog_keeps_the_permit_and_cancels_the_body_when_lost(redis: Redis) -> None:
    sem = Semaphore(redis, "reports", 1, timeout=0.5, auto_renew=True)
    async with sem as permit:
        await asyncio.sleep(1.5)  # three leases
        assert await permit.owned()
        assert await sem.acquire() is None
    progress: list[str] = []
    with pytest.raises(LockLost):
        async with sem as permit:
            progress.append("started")
            await redis.zrem(sem.key, permit.token or "")
            await asyncio.sleep(10)
            progress.append("finished")
    assert progress == ["started"]


async def test_a_task_cancelled_during_acquire_leaves_no_permit(redis: Redis) -> None:
    sem = Semaphore(redis, "reports", 3, timeout=30)
    for ticks in range(0, 30, 3):
        task = asyncio.create_task(sem.acquire(blocking=True, blocking_timeout=5))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        try:
            permit = await task
        except asyncio.CancelledError:
            assert await sem.count() == 0, f"orphaned permit after {ticks} ticks"
        else:
            assert permit is not None
            await permit.release()


async def test_fair_waiters_get_permits_in_arrival_order(redis: Redis) -> None:
    sem = Semaphore(redis, "reports", 1, timeout=30, fair=True, blocking_timeout=10)
    held = await sem.acquire()
    assert held is not None
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with sem:
            order.append(n)

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(waiter(n)))
        await asyncio.sleep(0.05)
    await held.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
