"""Redlock over three independent fake servers: quorum, undo, release, extend, loss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import pytest_asyncio

from app.core.errors import ConfigurationError, LockLost, LockNotOwned, RedisUnavailable
from app.services.locks import Redlock
from app.testing.clock import VirtualClock
from app.testing.slots import slot_checking_fake_redis


@pytest_asyncio.fixture(params=[False, True], ids=["bytes", "decoded"])
async def masters(request: pytest.FixtureRequest) -> AsyncIterator[list[Any]]:
    clients = [
        slot_checking_fake_redis(server=fakeredis.FakeServer(), decode_responses=request.param)
        for _ in range(3)
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def _down(client: Any, down: bool = True) -> None:
    client.connection_pool.connection_kwargs["server"].connected = not down


async def _holders(masters: list[Any], key: str) -> int:
    return sum([int(await m.exists(key)) for m in masters])


async def test_quorum_acquire_is_exclusive_and_release_clears_every_master(
    masters: list[Any],
) -> None:
    first = Redlock(masters, "billing", node_timeout=0.5, timeout=5)
    second = Redlock(masters, "billing", node_timeout=0.5, timeout=5)
    assert first.quorum == 2
    assert await first.acquire()
    assert 0 < first.validity < 5
    assert await _holders(masters, first.key) == 3
    assert await first.owned() and await second.locked()
    assert await second.acquire() is False
    assert await _holders(masters, first.key) == 3  # the loser's failed round set nothing

    await first.release()
    assert await _holders(masters, first.key) == 0
    assert await second.acquire()
    await second.release()


async def test_a_minority_held_elsewhere_is_not_enough_and_is_undone(masters: list[Any]) -> None:
    lock = Redlock(masters, "billing", node_timeout=0.5, timeout=5)
    await masters[0].set(lock.key, "someone-else", px=5000)
    await masters[1].set(lock.key, "someone-else", px=5000)
    assert await lock.acquire() is False
    assert not await masters[2].exists(lock.key)  # our lone key was deleted again


async def test_one_master_down_still_acquires_two_down_raises(masters: list[Any]) -> None:
    _down(masters[0])
    lock = Redlock(masters, "billing", node_timeout=0.5, timeout=5)
    assert await lock.acquire()
    await lock.release()

    _down(masters[1])
    with pytest.raises(RedisUnavailable, match="only 1 of 3 masters"):
        await lock.acquire()
    with pytest.raises(RedisUnavailable):
        async with Redlock(masters, "billing", node_timeout=0.5, timeout=5, blocking_timeout=0.2):
            pytest.fail("entered without a quorum")
    assert not await masters[2].exists(lock.key)


async def test_blocking_acquire_waits_for_the_holder(masters: list[Any]) -> None:
    holder = Redlock(masters, "billing", node_timeout=0.5, timeout=0.3)
    assert await holder.acquire()
    waiter = Redlock(masters, "billing", node_timeout=0.5, timeout=5, retry_delay=0.05)
    assert await waiter.acquire(blocking=True, blocking_timeout=3)  # after the lease ran out
    with pytest.raises(LockNotOwned):
        await holder.release()
    await waiter.release()


async def test_extend_needs_a_quorum(masters: list[Any]) -> None:
    lock = Redlock(masters, "billing", node_timeout=0.5, timeout=5)
    await lock.acquire()
    validity = await lock.extend(10, replace=True)
    assert 9 < validity <= 10
    assert 9000 < await masters[2].pttl(lock.key) <= 10_000
    await masters[0].delete(lock.key)
    await masters[1].delete(lock.key)
    with pytest.raises(LockNotOwned):
        await lock.extend(10)
    with pytest.raises(LockNotOwned):
        await lock.release()


async def test_exit_raises_lock_lost_when_a_majority_lost_it(masters: list[Any]) -> None:
    with pytest.raises(LockLost):
        async with Redlock(masters, "billing", node_timeout=0.5, timeout=5) as lock:
            await masters[0].delete(lock.key)
            await masters[1].delete(lock.key)


@pytest.mark.parametrize("masters", [False], indirect=True, ids=["bytes"])
async def test_watchdog_renews_on_the_quorum(masters: list[Any]) -> None:
    clock = VirtualClock()
    async with Redlock(
        masters, "billing", node_timeout=0.5, timeout=1, auto_renew=True, clock=clock
    ) as lock:
        for _ in range(30):  # ten leases, a renewal interval at a time
            # The lease runs down on every master meanwhile (TTLs are on real time)...
            for master in masters:
                await master.pexpire(lock.key, 400)
            await clock.advance(1 / 3)
            # ...and the renewal that came due sets it back to a whole lease on all of them.
            assert [await m.pttl(lock.key) > 900 for m in masters] == [True] * 3
        assert await lock.owned()
        assert lock.validity == pytest.approx(1 - lock.drift, abs=0.01)
    assert await _holders(masters, lock.key) == 0 and lock.lost is None


async def test_cancelled_acquire_leaves_no_key_on_any_master(masters: list[Any]) -> None:
    for ticks in range(10):
        lock = Redlock(masters, "billing", node_timeout=0.5, timeout=30)
        task = asyncio.create_task(lock.acquire())
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        try:
            taken = await task
        except asyncio.CancelledError:
            assert await _holders(masters, lock.key) == 0, f"orphaned after {ticks} ticks"
        else:
            assert taken
            await lock.release()


async def test_the_default_drift_margin_is_one_percent_of_the_lease_plus_2_ms(
    masters: list[Any],
) -> None:
    assert Redlock(masters, "billing", timeout=0.6).drift == pytest.approx(0.6 * 0.01 + 0.002)


async def test_arguments_are_checked(masters: list[Any]) -> None:
    with pytest.raises(ConfigurationError):
        Redlock([], "billing", timeout=5)
    with pytest.raises(ConfigurationError):
        Redlock(masters, "billing", node_timeout=0.5, timeout=5, drift_factor=0.7)
    with pytest.raises(ConfigurationError):
        Redlock(masters, "billing", node_timeout=0.5, timeout=0)
