"""A clock that moves only when the test says so, with sleepers and timers on it.

For code that takes ``clock=`` (an ``app.core.clock.Clock``: the locks' watchdog
and deadline, the idempotency heartbeat). Instead of sleeping through a lease,
a test advances the clock and every sleeper and timer whose time came runs, in
order of their deadlines::

    clock = VirtualClock()
    async with RedisLock(fake_redis, "jobs:1", timeout=1, auto_renew=True, clock=clock) as lock:
        await clock.advance(10)          # ten leases of renewals, in milliseconds of real time
        assert await lock.owned()

Only what goes through the clock moves: Redis TTLs (fakeredis's too) and
anything else on real time do not. (``app.testing.waiting.ManualClock`` is the
simpler kind, a time function for code that takes ``clock: Callable[[], float]``.)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from app.core.clock import Timer

__all__ = ["VirtualClock"]

_SETTLE_SPINS: Final = 10_000
"""Bound on the loop turns one wake-up may take to settle (a busy-looping task ends it)."""
_BLIND_SPINS: Final = 100
"""Loop turns per wake-up on an event loop whose ready queue cannot be seen (uvloop)."""


@dataclass(order=True)
class _Entry:
    """One pending sleeper or timer: fires at ``when``; ties in the order they were set."""

    when: float
    seq: int
    callback: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if not self.cancelled:  # cancelled after it came due, before its turn: as asyncio does
            self.cancelled = True
            self.callback()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class VirtualClock:
    """An ``app.core.clock.Clock`` whose time moves only in :meth:`advance`.

    ``now()`` starts at *start*. ``sleep`` and ``call_at`` wait for the clock,
    never for real time; ``timeout_at`` cancels its block when the clock passes
    the deadline. One task advances it at a time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._queue: list[_Entry] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now:g}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """How many sleepers and timers wait for the clock."""
        return sum(not e.cancelled for e in self._queue)

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has moved *seconds* on (just yield when it is <= 0)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._push(self._now + seconds, partial(_wake, fut))
        try:
            await fut
        finally:
            entry.cancel()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run *callback* (soon, from the event loop) once the clock reaches *when*."""
        if when <= self._now:
            return asyncio.get_running_loop().call_soon(callback)
        return self._push(when, callback)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run *callback* once the clock has moved *delay* on."""
        return self.call_at(self._now + delay, callback)

    def timeout_at(self, when: float) -> AbstractAsyncContextManager[object]:
        return self._timeout_at(when)

    @asynccontextmanager
    async def _timeout_at(self, when: float) -> AsyncIterator[object]:
        # asyncio.Timeout does the cancelling and its bookkeeping; this clock only says when.
        async with asyncio.timeout(None) as scope:

            def expire() -> None:
                if scope.when() is None:  # not rescheduled yet (the timer runs only inside)
                    scope.reschedule(-math.inf)  # in the past: fires at the next loop turn

            timer = self.call_at(when, expire)
            try:
                yield scope
            finally:
                timer.cancel()

    async def advance(self, seconds: float) -> None:
        """Move the clock *seconds* on, waking every sleeper and timer whose time came.

        They fire one at a time in order of their deadlines (the clock reads each
        one's deadline while it runs), and each runs until every task it woke
        waits again (for the clock, Redis, an event...) before the next fires: a
        watchdog woken at 0.3 s renews and sleeps again before the 0.6 s timer is
        looked at. Sleepers set during the advance fire in it too if their time
        is inside it.
        """
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r}")
        target = self._now + seconds
        loop = asyncio.get_running_loop()
        await _settle(loop)
        while self._queue and self._queue[0].when <= target:
            entry = heapq.heappop(self._queue)
            if entry.cancelled:
                continue
            self._now = max(self._now, entry.when)
            loop.call_soon(entry.run)
            await _settle(loop)
        self._now = target
        await _settle(loop)

    def _push(self, when: float, callback: Callable[[], object]) -> _Entry:
        entry = _Entry(when, next(self._seq), callback)
        heapq.heappush(self._queue, entry)
        return entry


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let every task that can run, run, until all of them wait for something."""
    ready = getattr(loop, "_ready", None)  # asyncio's queue of callbacks due at the next turn
    if ready is None:
        for _ in range(_BLIND_SPINS):
            await asyncio.sleep(0)
        return
    for _ in range(_SETTLE_SPINS):
        await asyncio.sleep(0)
        if not ready:
            return
