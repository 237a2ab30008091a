"""VirtualClock: sleepers, timers and timeouts that move only when the test advances the clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.core.clock import LOOP_CLOCK, Clock
from app.testing.clock import VirtualClock


def test_it_is_a_clock() -> None:
    clocks: list[Clock] = [VirtualClock(), LOOP_CLOCK]  # mypy checks the protocol here
    assert clocks[0].now() == 0.0
    assert VirtualClock(start=50).now() == 50.0


async def test_a_sleeper_wakes_only_once_the_clock_passed_its_time() -> None:
    clock = VirtualClock()
    sleeper = asyncio.create_task(clock.sleep(2))
    await clock.advance(1.999)
    assert not sleeper.done()
    await clock.advance(0.001)
    assert sleeper.done()
    assert clock.now() == 2.0 and clock.pending == 0


async def test_sleepers_wake_in_order_of_their_deadlines_reading_their_own_time() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [
        asyncio.create_task(sleeper(name, s))
        for name, s in (("c", 3), ("a", 1), ("b", 2), ("d", 9))
    ]
    await clock.advance(5)
    assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert clock.now() == 5.0 and clock.pending == 1
    await clock.advance(4)
    assert woke[-1] == ("d", 9.0)
    await asyncio.gather(*tasks)


async def test_sleepers_set_during_an_advance_fire_in_it_after_the_woken_code_ran(
    fake_redis: Any,
) -> None:
    """A loop that sleeps, then talks to Redis, then sleeps again: one advance runs it
    as many times as its period fits, each round finished before the next timer."""
    clock = VirtualClock()
    rounds: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(1)
            rounds.append(clock.now())
            await fake_redis.incr("ticks")

    task = asyncio.create_task(ticker())
    await clock.advance(3.5)
    assert rounds == [1.0, 2.0, 3.0]
    assert int(await fake_redis.get("ticks")) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.pending == 0  # a cancelled sleeper leaves nothing behind


async def test_sleep_of_zero_or_less_just_yields() -> None:
    clock = VirtualClock()
    await clock.sleep(0)
    await clock.sleep(-1)
    assert clock.now() == 0.0 and clock.pending == 0


async def test_timers_fire_at_their_time_unless_cancelled() -> None:
    clock = VirtualClock()
    fired: list[str] = []
    clock.call_at(2, lambda: fired.append("kept"))
    dropped = clock.call_at(1, lambda: fired.append("dropped"))
    dropped.cancel()
    await clock.advance(1.5)
    assert fired == []
    await clock.advance(1)
    assert fired == ["kept"]
    clock.call_at(0, lambda: fired.append("past"))  # a time already passed: runs soon
    await asyncio.sleep(0)
    assert fired == ["kept", "past"]


async def test_call_later_counts_from_now() -> None:
    clock = VirtualClock(start=10)
    fired: list[str] = []
    clock.call_later(2, lambda: fired.append("later"))
    await clock.advance(1.5)
    assert fired == []
    await clock.advance(0.5)
    assert fired == ["later"]


async def test_timeout_at_cancels_the_block_when_the_clock_passes_it() -> None:
    clock = VirtualClock()
    reached_end = False

    async def guarded() -> None:
        nonlocal reached_end
        async with clock.timeout_at(3):
            await asyncio.Event().wait()
            reached_end = True

    task = asyncio.create_task(guarded())
    await clock.advance(2.9)
    assert not task.done()
    await clock.advance(0.2)
    with pytest.raises(TimeoutError):
        await task
    assert not reached_end


async def test_timeout_at_leaves_a_block_that_ended_in_time_alone() -> None:
    clock = VirtualClock()
    advancing = asyncio.create_task(clock.advance(0.5))
    async with clock.timeout_at(1):
        await clock.sleep(0.5)
    await advancing
    assert clock.pending == 0  # the timer went with the block
    await clock.advance(5)  # and nothing fires at the old deadline


async def test_a_timeout_already_passed_cancels_at_the_first_wait() -> None:
    clock = VirtualClock(start=10)
    with pytest.raises(TimeoutError):
        async with clock.timeout_at(5):
            await asyncio.Event().wait()


async def test_it_never_moves_back() -> None:
    with pytest.raises(ValueError, match="forward"):
        await VirtualClock().advance(-1)
