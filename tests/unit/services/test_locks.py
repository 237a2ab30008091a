"""RedisLock on fakeredis (with Lua): the contract, fencing, waiting, cancellation, errors."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from redis.exceptions import RedisError

from app.core.errors import (
    ConfigurationError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RedisUnavailable,
)
from app.services.locks import RedisLock, fenced_write
from app.testing.clients import fake_twin
from app.testing.clock import VirtualClock
from app.testing.slots import slot_checking_fake_redis
from app.testing.waiting import cancel_after, eventually


@pytest.fixture
def redis(fake_client: Any) -> Any:
    """A fresh fake server, through a client with decode_responses False and True."""
    return fake_client


_peer = fake_twin  # another client (another "process") on the same fake server


async def _queued(client: Any, key: str, waiters: int) -> None:
    """Wait until *waiters* fair waiters stand in the queue of the lock at *key*."""

    async def queued() -> bool:
        return int(await client.zcard(key + ":queue")) == waiters

    await eventually(queued, f"{waiters} fair waiter(s) to queue")


# -- the DESIGN.md contract ------------------------------------------------------


async def test_acquire_is_non_blocking_exclusive_and_released(redis: Any) -> None:
    first = RedisLock(redis, "resource:1", timeout=5)
    second = RedisLock(redis, "resource:1", timeout=5)

    assert await first.acquire() is True
    assert await second.acquire() is False
    assert await first.owned() and not await second.owned()
    assert await first.locked() and await second.locked()

    await first.release()
    assert not await first.locked()
    assert await second.acquire() is True
    await second.release()


async def test_the_key_carries_the_lease(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=5)
    await lock.acquire()
    pttl = await redis.pttl(lock.key)
    assert 4000 < pttl <= 5000
    await lock.release()


async def test_release_of_a_lock_not_held_raises(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=5)
    with pytest.raises(LockNotOwned):
        await lock.release()


async def test_release_after_the_lock_changed_hands_leaves_the_new_owner_alone(redis: Any) -> None:
    old = RedisLock(redis, "resource:1", timeout=5)
    new = RedisLock(redis, "resource:1", timeout=5)
    await old.acquire()
    await redis.delete(old.key)  # the lease ran out
    assert await new.acquire()

    with pytest.raises(LockNotOwned, match="expired or was taken"):
        await old.release()
    assert await new.owned()
    await new.release()


async def test_one_object_is_one_owner_not_reentrant(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=5)
    assert await lock.acquire()
    assert await lock.acquire() is False  # the same owner cannot take it twice
    assert await lock.acquire(blocking=True, blocking_timeout=0.05) is False
    await lock.release()


async def test_tasks_sharing_one_object_take_turns(redis: Any) -> None:
    lock = RedisLock(redis, "counter", timeout=5, blocking_timeout=10)
    inside = 0
    most = 0

    async def worker() -> None:
        nonlocal inside, most
        for _ in range(3):
            async with lock:
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.001)
                inside -= 1

    await asyncio.gather(*(worker() for _ in range(8)))
    assert most == 1
    assert not await lock.locked()


async def test_lease_is_required_and_arguments_are_checked(redis: Any) -> None:
    for bad in (0, -1, None, float("nan"), "5"):
        with pytest.raises(ConfigurationError):
            RedisLock(redis, "x", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="renew_interval"):
        RedisLock(redis, "x", timeout=1, renew_interval=1)
    with pytest.raises(ConfigurationError):
        RedisLock(redis, "", timeout=1)
    lock = RedisLock(redis, "x", timeout=1)
    with pytest.raises(ConfigurationError, match="blocking=True"):
        await lock.acquire(blocking_timeout=1)


async def test_names_are_escaped_into_one_hash_tag(redis: Any) -> None:
    lock = RedisLock(redis, "a}{b:*", timeout=5)
    assert lock.key == "app:lock:{a%7D%7Bb%3A%2A}"
    assert await lock.acquire()
    await lock.release()


# -- fencing tokens -------------------------------------------------------------------


async def test_fencing_tokens_strictly_increase_across_holders(redis: Any) -> None:
    fences: list[int] = []
    for _ in range(5):
        lock = RedisLock(redis, "resource:1", timeout=5)
        assert await lock.acquire()
        assert lock.fence is not None
        fences.append(lock.fence)
        await lock.release()
    assert fences == sorted(set(fences))
    assert all(b == a + 1 for a, b in itertools.pairwise(fences))


async def test_fence_counter_expires_and_restarts_above_every_old_token(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=5, fence_ttl=60)
    await lock.acquire()
    first = lock.fence
    assert first is not None
    fence_key = lock.key + ":fence"
    assert 0 < await redis.pttl(fence_key) <= 60_000
    await lock.release()

    await redis.delete(fence_key)  # the counter expired while the lock sat idle
    await lock.acquire()
    assert lock.fence is not None and lock.fence > first
    await lock.release()


async def test_fenced_write_refuses_a_stale_holder(redis: Any) -> None:
    stale = RedisLock(redis, "report", timeout=5)
    await stale.acquire()
    assert stale.fence is not None
    await redis.delete(stale.key)  # stale holder paused past its lease...
    fresh = RedisLock(redis, "report", timeout=5)
    await fresh.acquire()
    assert fresh.fence is not None

    assert await fenced_write(redis, "report:1", "fresh", fresh.fence, ttl=60)
    assert not await fenced_write(redis, "report:1", "stale", stale.fence)  # ...and woke up
    assert await fenced_write(redis, "report:1", "fresh again", fresh.fence)
    stored = await redis.hget("report:1", "value")
    assert stored in (b"fresh again", "fresh again")
    await fresh.release()


# -- extend ------------------------------------------------------------------------------


async def test_extend_adds_to_or_replaces_the_lease(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=10)
    await lock.acquire()
    left = await lock.extend(5)
    assert 14 < left <= 15
    assert 14_000 < await redis.pttl(lock.key) <= 15_000
    left = await lock.extend(3, replace=True)
    assert left == 3
    assert 2000 < await redis.pttl(lock.key) <= 3000
    await lock.release()


async def test_extend_of_a_lost_lock_raises(redis: Any) -> None:
    lock = RedisLock(redis, "resource:1", timeout=10)
    with pytest.raises(LockNotOwned):
        await lock.extend(1)
    await lock.acquire()
    await redis.delete(lock.key)
    with pytest.raises(LockNotOwned):
        await lock.extend(1)
    assert not await redis.exists(lock.key)  # extend never recreates a key


# -- async with ---------------------------------------------------------------------------


async def test_async_with_raises_lock_not_acquired_with_retry_after(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30)
    await holder.acquire()
    with pytest.raises(LockNotAcquired) as caught:
        async with RedisLock(redis, "jobs:1", timeout=5, blocking_timeout=0.05):
            pytest.fail("entered a held lock")
    assert caught.value.lock_name == "jobs:1"
    assert caught.value.retry_after is not None and 25 < caught.value.retry_after <= 30
    assert caught.value.headers()["Retry-After"] == "30"
    await holder.release()


async def test_async_with_exit_raises_lock_lost_when_the_lock_changed_hands(redis: Any) -> None:
    intruder = RedisLock(redis, "jobs:1", timeout=30)
    with pytest.raises(LockLost):
        async with RedisLock(redis, "jobs:1", timeout=5) as lock:
            await redis.delete(lock.key)  # the lease "ran out"
            assert await intruder.acquire()
    assert await intruder.owned()  # its key survived our exit
    await intruder.release()


async def test_async_with_keeps_the_body_exception_when_the_lock_held(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=5)
    with pytest.raises(KeyError):
        async with lock:
            raise KeyError("boom")
    assert not await lock.locked()


async def test_release_inside_the_block_is_fine(redis: Any) -> None:
    async with RedisLock(redis, "jobs:1", timeout=5) as lock:
        await lock.release()
    assert not await lock.locked()


# -- waiting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("same_client", [True, False], ids=["same-process", "other-process"])
async def test_a_blocked_waiter_is_woken_by_release_long_before_the_lease_ends(
    redis: Any, same_client: bool
) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=60)
    await holder.acquire()
    other = redis if same_client else _peer(redis)
    waiter = RedisLock(other, "jobs:1", timeout=5)

    async def release_soon() -> None:
        await asyncio.sleep(0.05)
        await holder.release()

    releaser = asyncio.create_task(release_soon())
    # Woken by the release: without a wake-up it would wait for the 60 s lease and give up.
    assert await waiter.acquire(blocking=True, blocking_timeout=5)
    await releaser
    await waiter.release()
    if other is not redis:
        await other.aclose()


async def test_a_waiter_takes_over_when_the_holder_dies(redis: Any) -> None:
    dead = RedisLock(redis, "jobs:1", timeout=0.2)
    await dead.acquire()  # and never releases
    waiter = RedisLock(redis, "jobs:1", timeout=5)
    assert await waiter.acquire(blocking=True, blocking_timeout=3)
    await waiter.release()


async def test_blocking_acquire_gives_up_after_blocking_timeout(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=60)
    await holder.acquire()
    assert (
        await RedisLock(redis, "jobs:1", timeout=5).acquire(blocking=True, blocking_timeout=0.1)
        is False
    )
    await holder.release()


async def test_fair_waiters_are_served_in_arrival_order(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    await holder.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        lock = RedisLock(_peer(redis), "jobs:1", timeout=30, fair=True, blocking_timeout=10)
        async with lock:
            order.append(n)
            await asyncio.sleep(0.01)
        await lock.redis.aclose()

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiter(n)))
        await _queued(redis, holder.key, n + 1)  # each one queues before the next arrives
    await holder.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert not await redis.exists(holder.key + ":queue")


async def test_a_fair_waiter_that_gives_up_leaves_the_queue(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    await holder.acquire()
    quitter = RedisLock(redis, "jobs:1", timeout=5, fair=True)
    assert not await quitter.acquire(blocking=True, blocking_timeout=0.1)
    assert await redis.zcard(holder.key + ":queue") == 0
    await holder.release()
    # nobody queued: a fair newcomer gets it at once
    assert await RedisLock(redis, "jobs:1", timeout=5, fair=True).acquire()


# -- the fast path (nobody waits) and its transitions ----------------------------------------------

_WAIT_KEYS = (":wake", ":waiting", ":queue", ":queue-heartbeats")


async def test_an_uncontended_hold_leaves_no_wake_marker_and_no_queue(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=30)
    assert await lock.acquire()
    await lock.release()
    assert await redis.exists(*(lock.key + s for s in _WAIT_KEYS)) == 0


@pytest.mark.parametrize("fair", [False, True], ids=["plain-waiter", "fair-waiter"])
async def test_a_release_with_a_waiter_present_wakes_it(redis: Any, fair: bool) -> None:
    """A waiter that arrives on a fast-path hold is woken: a plain one through the shared
    wake list, a fair one (first in the queue) through its own."""
    holder = RedisLock(redis, "jobs:1", timeout=30)
    assert await holder.acquire()
    waiter = RedisLock(_peer(redis), "jobs:1", timeout=30, fair=fair)
    reply = await waiter._attempt("waiter-token")
    assert reply[0] == 0 and 0 < reply[1] <= 30_000
    await holder.release()
    wake_list = holder.key + (":wake:waiter-token" if fair else ":wake")
    assert await redis.blpop([wake_list], timeout=1) is not None
    assert await waiter._attempt("waiter-token") == [1, (holder.fence or 0) + 1]
    assert await waiter._give_up("waiter-token")
    await waiter.redis.aclose()


async def test_a_blocked_waiter_on_a_fast_hold_gets_it_after_the_release(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=60)
    assert await holder.acquire()
    other = _peer(redis)
    waiter = asyncio.create_task(
        RedisLock(other, "jobs:1", timeout=5).acquire(blocking=True, blocking_timeout=5)
    )
    await eventually(
        lambda: redis.exists(holder.key + ":waiting"), "the waiter left its mark", timeout=5
    )
    await holder.release()
    assert await waiter
    await other.aclose()


async def test_fences_of_fast_and_fair_acquires_increase_together(redis: Any) -> None:
    fences: list[int] = []
    for fair in (False, True, False, False, True):
        lock = RedisLock(redis, "jobs:1", timeout=30, fair=fair)
        assert await lock.acquire()
        assert lock.fence is not None  # there at once, with no further call
        fences.append(lock.fence)
        await lock.release()
    assert fences == sorted(set(fences))


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelling_acquire_at_any_point_leaves_no_key(redis: Any) -> None:
    for ticks in range(12):
        lock = RedisLock(redis, "jobs:1", timeout=30)
        task = asyncio.create_task(lock.acquire(blocking=True, blocking_timeout=5))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        try:
            taken = await task
        except asyncio.CancelledError:
            assert not await redis.exists(lock.key), f"orphaned lock after {ticks} ticks"
        else:
            assert taken  # finished before the cancel landed: it is ours to release
            await lock.release()


async def test_cancelling_a_fair_waiter_removes_it_from_the_queue(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    await holder.acquire()
    waiter = RedisLock(redis, "jobs:1", timeout=5, fair=True)
    task = asyncio.create_task(waiter.acquire(blocking=True, blocking_timeout=5))
    await _queued(redis, holder.key, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await redis.zcard(holder.key + ":queue") == 0
    await holder.release()


async def test_cancelled_release_still_releases(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=30)

    async def released() -> bool:
        return not await redis.exists(lock.key)

    for turns in range(1, 6):  # fakeredis may answer within the first turn: then nothing to cancel
        await lock.acquire()
        # requested before the release finished, the cancel must reach the caller
        assert await cancel_after(turns, lock.release) != "lost"
        await eventually(released, "the cancelled release to finish releasing")
        assert lock.token is None


async def test_cancelling_the_body_releases_and_propagates_the_cancellation(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=30)
    entered = asyncio.Event()

    async def body() -> None:
        async with lock:
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await redis.exists(lock.key)


# -- watchdog ----------------------------------------------------------------------------------


async def test_watchdog_keeps_the_lock_through_a_long_body(fake_redis: Any) -> None:
    clock = VirtualClock()
    async with RedisLock(fake_redis, "jobs:1", timeout=1, auto_renew=True, clock=clock) as lock:
        for _ in range(30):  # ten leases, a renewal interval at a time
            # The server's lease runs down meanwhile (its TTL is on real time: shorten it)...
            await fake_redis.pexpire(lock.key, 400)
            await clock.advance(1 / 3)
            # ...and the renewal that came due sets it back to a whole lease.
            assert await fake_redis.pttl(lock.key) > 900
        assert await lock.owned()
        assert lock.deadline == pytest.approx(clock.now() + 1 - lock.drift)
    assert not await lock.locked() and lock.lost is None


async def test_watchdog_cancels_the_body_and_calls_on_lost(redis: Any) -> None:
    seen: list[LockLost] = []
    finished = False

    async def on_lost(err: LockLost) -> None:
        seen.append(err)

    clock = VirtualClock()
    with pytest.raises(LockLost) as caught:
        async with RedisLock(
            redis, "jobs:1", timeout=0.3, auto_renew=True, on_lost=on_lost, clock=clock
        ) as lock:
            await redis.delete(lock.key)
            await clock.advance(5)  # the first renewal (at 0.1 s) finds the key gone
            finished = True
    assert not finished
    await asyncio.sleep(0)
    assert seen == [caught.value]
    assert caught.value.lock_name == "jobs:1"


async def test_watchdog_without_a_block_reports_loss_and_release_raises(redis: Any) -> None:
    lost: list[LockLost] = []
    clock = VirtualClock()
    lock = RedisLock(
        redis, "jobs:1", timeout=0.3, auto_renew=True, on_lost=lost.append, clock=clock
    )
    await lock.acquire()
    await redis.delete(lock.key)
    await clock.advance(0.099)
    assert lost == []  # no renewal was due yet
    await clock.advance(0.001)  # the first renewal finds the key gone
    assert lost == [lock.lost] and "another owner took it" in str(lock.lost)
    with pytest.raises(LockNotOwned):
        await lock.release()


# -- Redis down ---------------------------------------------------------------------------------


async def test_redis_down_raises_unavailable_never_false(redis: Any) -> None:
    server = redis.connection_pool.connection_kwargs["server"]
    server.connected = False
    lock = RedisLock(redis, "jobs:1", timeout=5)
    with pytest.raises(RedisUnavailable, match="jobs:1"):
        await lock.acquire()
    with pytest.raises(RedisUnavailable):
        async with lock:
            pytest.fail("entered without Redis")
    server.connected = True


async def test_a_key_of_the_wrong_type_is_a_lock_error_not_a_redis_error(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=5)
    await redis.hset(lock.key, "not", "a lock")
    with pytest.raises(LockError, match="jobs:1") as caught:
        await lock.acquire()
    assert isinstance(caught.value.__cause__, RedisError)


async def test_a_refused_command_names_the_lock_but_never_quotes_redis(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=5)
    await redis.hset(lock.key, "not", "a lock")
    with pytest.raises(LockError) as caught:
        await lock.acquire()
    assert caught.value.lock_name == "jobs:1"
    assert str(caught.value) == "lock 'jobs:1': Redis refused the command"
    assert "WRONGTYPE" in str(caught.value.__cause__)  # kept for the logs, not the message
    with pytest.raises(LockError, match=r"^lock 'jobs:1': Redis refused the command$"):
        await RedisLock(redis, "jobs:1", timeout=5, fair=True).acquire()  # the queueing script


async def test_fenced_write_refused_is_a_lock_error_naming_the_key(redis: Any) -> None:
    await redis.set("report:1", "a string, not a hash")
    with pytest.raises(LockError) as caught:
        await fenced_write(redis, "report:1", "value", 1)
    assert caught.value.lock_name == "report:1"
    assert str(caught.value) == "fenced write to 'report:1': Redis refused the command"
    assert isinstance(caught.value.__cause__, RedisError)


async def test_redis_down_message_names_the_lock_and_what_stays_unknown(redis: Any) -> None:
    redis.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(RedisUnavailable) as caught:
        await RedisLock(redis, "jobs:1", timeout=5).acquire()
    message = str(caught.value)
    assert message.startswith("lock 'jobs:1': Redis is unreachable (")
    assert message.endswith(
        "; whether it is held is unknown until its lease (5 s) runs out. "
        "Retry when Redis answers again."
    )


async def test_an_open_breaker_refuses_at_once_with_its_reset_time(
    settings_override: Callable[..., None],
) -> None:
    settings_override(breaker_failure_threshold=1, breaker_reset_timeout=30.0)
    server = fakeredis.FakeServer()
    client = slot_checking_fake_redis(server=server)
    try:
        lock = RedisLock(client, "jobs:1", timeout=5)
        server.connected = False
        with pytest.raises(RedisUnavailable, match="unreachable"):
            await lock.acquire()  # the failure that opens the breaker
        server.connected = True  # Redis is back, but the breaker is open: no call is sent
        with pytest.raises(RedisUnavailable, match="circuit breaker") as caught:
            await lock.acquire()
        assert caught.value.retry_after == 30.0
        assert str(caught.value).startswith("lock 'jobs:1': ")
        assert not await client.exists(lock.key)
    finally:
        await client.aclose()


async def test_infinite_or_boolean_durations_are_refused(redis: Any) -> None:
    for bad in (float("inf"), True):
        with pytest.raises(ConfigurationError, match="timeout"):
            RedisLock(redis, "x", timeout=bad)
        with pytest.raises(ConfigurationError, match="blocking_timeout"):
            RedisLock(redis, "x", timeout=1, blocking_timeout=bad)
    with pytest.raises(ConfigurationError, match="ttl"):
        await fenced_write(redis, "report:1", "v", 1, ttl=float("nan"))


async def test_a_boolean_is_refused_even_after_the_equal_number_was_accepted(redis: Any) -> None:
    # checked settings are remembered per value: True == 1 and hashes alike, yet stays refused
    RedisLock(redis, "x", timeout=2, renew_interval=1, fence_ttl=1)
    with pytest.raises(ConfigurationError, match="renew_interval"):
        RedisLock(redis, "x", timeout=2, renew_interval=True)
    with pytest.raises(ConfigurationError, match="fence_ttl"):
        RedisLock(redis, "x", timeout=2, fence_ttl=True)
    RedisLock(redis, "x", timeout=1)
    with pytest.raises(ConfigurationError, match="timeout"):
        RedisLock(redis, "x", timeout=True)


async def test_keys_live_under_the_configured_prefix(
    redis: Any, settings_override: Callable[..., None]
) -> None:
    settings_override(redis_key_prefix="tenant7")
    assert RedisLock(redis, "jobs:1", timeout=5).key == "tenant7:lock:{jobs%3A1}"
    assert (
        RedisLock(redis, "jobs:1", timeout=5, namespace="other").key == "tenant7:other:{jobs%3A1}"
    )
