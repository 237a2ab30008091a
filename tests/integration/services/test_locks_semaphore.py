"""Semaphore on real servers: the limit under load, crashed holders, watchdog, fair queue.

Every test runs on standalone, a 3-primary Cluster and Sentinel (clients built
as the app builds them; ``redis`` tests also with decoded replies on standalone
and Cluster: ``topology_client``).
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import LockLost, LockNotAcquired
from app.services.locks import Semaphore
from app.testing.clients import ready, topology_url, twin
from app.testing.waiting import eventually

ROOT = Path(__file__).resolve().parents[3]  # the checkout under test

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(topology_client: Any) -> Any:
    """A client of the topology (flushed per test), as the app builds it, or its decoded twin."""
    return topology_client


async def test_never_more_than_limit_holders_among_100_concurrent_tasks(redis: Any) -> None:
    limit = 5
    other = await ready(twin(redis))  # a second pool, like a second worker
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
    topology_redis: Any, request: pytest.FixtureRequest
) -> None:
    redis = await ready(topology_redis)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.services._locks_worker",
            "hold-permit",
            topology_url(request),  # the holder builds its client from the URL, as the app does
            "reports",
            "1",
            "0.5",
        ],
        cwd=ROOT,
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


async def test_full_semaphore_raises_lock_not_acquired(redis: Any) -> None:
    sem = Semaphore(redis, "reports", 2, timeout=10, blocking_timeout=0.1)
    async with sem, sem:
        with pytest.raises(LockNotAcquired) as caught:
            async with sem:
                pytest.fail("a third permit")
        assert caught.value.retry_after is not None and caught.value.retry_after > 5
    assert await sem.count() == 0


async def test_watchdog_keeps_the_permit_and_cancels_the_body_when_lost(
    topology_redis: Any,
) -> None:
    redis = await ready(topology_redis)
    sem = Semaphore(redis, "reports", 1, timeout=0.5, auto_renew=True)
    async with sem as permit:
        start = permit.deadline  # a renewal sent three leases later must be confirmed
        assert start is not None
        end = start + 3 * permit.timeout
        await eventually(lambda: (permit.deadline or 0.0) >= end, "3 leases of renewals")
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


async def test_a_task_cancelled_during_acquire_leaves_no_permit(redis: Any) -> None:
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


async def test_fair_waiters_get_permits_in_arrival_order(redis: Any) -> None:
    sem = Semaphore(redis, "reports", 1, timeout=30, fair=True, blocking_timeout=10)
    held = await sem.acquire()
    assert held is not None
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with sem:
            order.append(n)

    async def queued(waiters: int) -> bool:
        return int(await redis.zcard(sem.key + ":queue")) == waiters

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(waiter(n)))
        await eventually(functools.partial(queued, n + 1), f"waiter {n} to queue")
    await held.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_a_release_pushes_to_the_fair_queue_heads_own_wake_list(redis: Any) -> None:
    """As for locks: the head's wake list, named inside the release script, is in the slot."""
    sem = Semaphore(redis, "reports", 1, timeout=30, fair=True)
    held = await sem.acquire()
    assert held is not None
    reply = await sem._attempt("head-token")  # one attempt: queued, first in line
    assert (reply[0], reply[2]) == (0, 1)
    await held.release()
    assert await redis.blpop([sem.key + ":wake:head-token"], timeout=1) is not None
    assert await sem._attempt("head-token") == [1, 1]
    assert await sem._give_up("head-token")
