"""The clock that times leases kept on this side of Redis: one seam, the event loop's by default.

Code that decides *when* to renew a lease and *how long is left* of it (a lock's
watchdog and deadline, an idempotency heartbeat) reads the time, waits and
arms timers through a ``Clock`` instead of calling ``loop.time()`` and
``asyncio.sleep`` itself. In production that is ``LOOP_CLOCK``: the running
event loop's own clock, so behaviour is exactly what the loop would do. A test
passes a clock it moves by hand (``app.testing.clock.VirtualClock``) and runs
hours of renewals without sleeping.

Only the client-side timing goes through it: TTLs in Redis keep running on the
server's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Final, Protocol

__all__ = ["LOOP_CLOCK", "Clock", "LoopClock", "Timer"]


class Timer(Protocol):
    """A pending ``Clock.call_at`` callback (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in seconds, waits and timers on that time.

    ``now()`` values are only compared with each other (and with values derived
    from them); they mean nothing across clocks.
    """

    def now(self) -> float:
        """The current time (seconds; only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait *seconds* (return at the next chance to run when it is <= 0)."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Call *callback* (in the event loop, from no task) once ``now()`` reaches *when*."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """``call_at(now() + delay, callback)``."""
        ...

    def timeout_at(self, when: float) -> AbstractAsyncContextManager[object]:
        """``async with``: cancel the block at *when* and raise ``TimeoutError`` out of it."""
        ...


class LoopClock:
    """The running event loop's clock: ``loop.time()``, ``asyncio.sleep``, ``loop.call_at``/``call_later``."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_at(when, callback)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    def timeout_at(self, when: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout_at(when)

    def __repr__(self) -> str:
        return "LOOP_CLOCK"


LOOP_CLOCK: Final[Clock] = LoopClock()
"""The default clock of everything that takes ``clock=``."""
