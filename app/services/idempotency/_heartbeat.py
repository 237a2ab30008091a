"""The background task that renews an in-flight idempotency claim while its request runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from app.core.clock import LOOP_CLOCK, Clock, Timer
from app.core.guard import Duration, as_seconds

__all__ = ["Heartbeat", "Renewer"]

log = logging.getLogger("app.idempotency")


class Renewer(Protocol):
    """What a heartbeat needs of the service: ``IdempotencyService.renew``."""

    async def renew(self, key: str, token: str) -> bool: ...


class Heartbeat:
    """Renews one in-flight claim every ``interval`` seconds until stopped (see ``heartbeat``).

    Lazy: ``start`` only arms a timer for the first renewal; the background
    task that renews is created when that timer fires. Most requests end well
    inside one interval, so they never create a task, and stopping them is
    cancelling the timer (no task switch).

    A renewal that fails because Redis is unreachable is logged and retried at
    the next tick (the lease may survive a short outage); a renewal that finds
    the claim taken or gone sets ``lost`` and ends the task. The timer and the
    waits between renewals are on *clock* (default ``LOOP_CLOCK``, the event
    loop's time).
    """

    __slots__ = (
        "_clock",
        "_service",
        "_task",
        "_timer",
        "interval",
        "key",
        "lost",
        "renewals",
        "token",
    )

    def __init__(
        self,
        service: Renewer,
        key: str,
        token: str,
        *,
        interval: Duration,
        clock: Clock | None = None,
    ) -> None:
        self._service = service
        self._clock: Clock = LOOP_CLOCK if clock is None else clock
        self.key = key
        self.token = token
        self.interval = as_seconds(interval, "heartbeat interval")  # ConfigurationError if bad
        self.lost = False
        self.renewals = 0
        self._timer: Timer | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Heartbeat:
        """Start renewing (idempotent): the first renewal is one ``interval`` from now."""
        if self._timer is None and self._task is None:
            self._timer = self._clock.call_later(self.interval, self._spawn)
        return self

    def _spawn(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"idempotency-heartbeat:{self.key}"
        )

    def cancel(self) -> bool:
        """Stop renewing without waiting, if no renewal has started: True when stopped.

        False when the renewal task already runs; ``await stop()`` then ends it.
        Most requests end before their first renewal, and stop here without
        awaiting anything.
        """
        if self._task is not None:
            return False
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return True

    async def stop(self) -> None:
        """Stop renewing and wait for the renewal task, if one started, to end (safe to call twice)."""
        if self.cancel():
            return
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                renewed = await self._service.renew(self.key, self.token)
            except Exception as exc:  # Redis down or erroring: the lease may still survive
                log.warning("idempotency lease renewal failed (retrying next tick): %s", exc)
            else:
                if not renewed:
                    self.lost = True
                    log.warning(
                        "idempotency claim %s lost its lease while the request was still "
                        "running; a retry may run it again (raise the lease or check Redis "
                        "latency)",
                        self.key,
                    )
                    return
                self.renewals += 1
            await self._clock.sleep(self.interval)

    async def __aenter__(self) -> Heartbeat:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()  # whatever the block raised: the renewals end with it
