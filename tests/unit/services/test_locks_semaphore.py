"""Semaphore on fakeredis (with Lua): limit, per-permit leases, waiting, cancellation."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from app.core.errors import (
    ConfigurationError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RedisUnavailable,
)
from app.services.locks import Permit, Semaphore
from app.testing.clock import VirtualClock
from app.testing.waiting import DEFAULT_DEADLINE, eventually


@pytest.fixture
def redis(fake_client: Any) -> Any:
    return fake_client


async def test_at_most_limit_permits_and_release_frees_one(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=3, timeout=5)
    permits = [await sem.acquire() for _ in range(3)]
    assert all(isinstance(p, Permit) for p in permits)
    assert [p.holders for p in permits if p] == [1, 2, 3]
    assert await sem.acquire() is None
    assert await sem.count() == 3 and await sem.locked()

    first = permits[0]
    assert first is not None
    await first.release()
    assert await sem.count() == 2 and not await sem.locked()
    again = await sem.acquire()
    assert again is not None
    for p in (again, permits[1], permits[2]):
        assert p is not None
        await p.release()
    assert await sem.count() == 0
    assert await redis.pttl(sem.key) > 0 or not await redis.exists(sem.key)


async def test_shared_semaphore_gives_each_task_its_own_permit(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=3, timeout=5, blocking_timeout=10)
    inside = most = 0
    full = asyncio.Event()  # the first holders stay until all three permits are out

    async def worker() -> None:
        nonlocal inside, most
        async with sem as permit:
            assert await permit.owned()
            inside += 1
            most = max(most, inside)
            if inside == 3:
                full.set()
            await asyncio.wait_for(full.wait(), DEFAULT_DEADLINE)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(30)))
    assert most == 3
    assert await sem.count() == 0


async def test_nested_async_with_holds_two_permits(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=2, timeout=5)
    async with sem as outer:
        async with sem as inner:
            assert inner is not outer
            assert await sem.count() == 2
        assert await outer.owned() and not await inner.owned()
    assert await sem.count() == 0


async def test_an_expired_permit_comes_back_and_its_release_raises(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=0.2)
    crashed = await sem.acquire()  # its holder "crashes": never releases
    assert crashed is not None
    assert await sem.acquire() is None
    later = await sem.acquire(blocking=True, blocking_timeout=3)
    assert later is not None
    with pytest.raises(LockNotOwned):
        await crashed.release()
    assert await later.owned()
    await later.release()


async def test_extend_adds_or_replaces_one_permits_lease(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=2, timeout=10)
    permit = await sem.acquire()
    assert permit is not None
    assert 14 < await permit.extend(5) <= 15
    assert await permit.extend(2, replace=True) == 2
    await permit.release()
    with pytest.raises(LockNotOwned):
        await permit.extend(1)
    with pytest.raises(LockNotOwned):
        await permit.release()


async def test_async_with_raises_lock_not_acquired_with_retry_after(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=20, blocking_timeout=0)
    held = await sem.acquire()
    with pytest.raises(LockNotAcquired) as caught:
        async with sem:
            pytest.fail("entered a full semaphore")
    assert caught.value.retry_after is not None and 15 < caught.value.retry_after <= 20
    assert held is not None
    await held.release()


async def test_exit_raises_lock_lost_when_the_permit_expired(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=5)
    with pytest.raises(LockLost):
        async with sem as permit:
            await redis.zrem(sem.key, permit.token)


async def test_aexit_without_aenter_in_this_task_is_an_error(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=5)
    with pytest.raises(LockError):
        await sem.__aexit__(None, None, None)


async def test_arguments_are_checked(redis: Any) -> None:
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError):
            Semaphore(redis, "x", limit, 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Semaphore(redis, "x", 1, 0)
    with pytest.raises(ConfigurationError):
        Semaphore(redis, "x", 1, 1, renew_interval=2)


async def test_a_release_wakes_a_waiter(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=60)
    held = await sem.acquire()
    assert held is not None

    async def release_soon() -> None:
        await asyncio.sleep(0.05)
        await held.release()

    task = asyncio.create_task(release_soon())
    permit = await sem.acquire(blocking=True, blocking_timeout=5)  # not the 60 s lease
    assert permit is not None
    await task
    await permit.release()


async def test_fair_waiters_get_permits_in_arrival_order(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=30, fair=True, blocking_timeout=10)
    held = await sem.acquire()
    assert held is not None
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with sem:
            order.append(n)
            await asyncio.sleep(0.01)

    async def queued(waiters: int) -> bool:
        return int(await redis.zcard(sem.key + ":queue")) == waiters

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(waiter(n)))
        await eventually(functools.partial(queued, n + 1), f"waiter {n} to queue")
    await held.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_cancelling_acquire_at_any_point_leaves_no_permit(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=2, timeout=30)
    for ticks in range(12):
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


async def test_watchdog_keeps_a_permit_and_cancels_the_body_when_lost(fake_redis: Any) -> None:
    lost: list[LockLost] = []
    clock = VirtualClock()
    sem = Semaphore(
        fake_redis, "exports", limit=1, timeout=1, auto_renew=True, on_lost=lost.append, clock=clock
    )
    async with sem as permit:
        for _ in range(30):  # ten leases, a renewal interval at a time
            # The permit's lease in Redis (its score, server time in ms) runs down meanwhile...
            await fake_redis.zincrby(sem.key, -600, permit.token)
            shortened = await fake_redis.zscore(sem.key, permit.token)
            await clock.advance(1 / 3)
            # ...and the renewal that came due sets it back to a whole lease.
            assert await fake_redis.zscore(sem.key, permit.token) > shortened + 500
        assert await permit.owned()
    assert lost == [] and permit.lost is None
    finished = False
    with pytest.raises(LockLost):
        async with sem as permit:
            await fake_redis.zrem(sem.key, permit.token)
            await clock.advance(5)  # the first renewal finds the permit gone
            finished = True
    assert not finished and len(lost) == 1


async def test_redis_down_raises_unavailable(redis: Any) -> None:
    redis.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(RedisUnavailable, match="exports"):
        await Semaphore(redis, "exports", limit=1, timeout=5).acquire()


async def test_a_refused_command_is_a_lock_error_without_redis_text(redis: Any) -> None:
    sem = Semaphore(redis, "exports", limit=1, timeout=5)
    await redis.set(sem.key, "a string, not a sorted set")
    with pytest.raises(LockError) as caught:
        await sem.acquire()
    assert caught.value.lock_name == "exports"
    assert str(caught.value) == "semaphore 'exports': Redis refused the command"
    assert "WRONGTYPE" in str(caught.value.__cause__)
