"""The circuit breaker of a Redis client, and what counts as "Redis is down".

``breaker_for(client)`` is the one ``CircuitBreaker`` of a client object
(thresholds from settings). ``CONNECTION_ERRORS`` are the errors that mean
"Redis is not reachable right now" (the breaker counts them);
``REFUSED_FOR_NOW`` the refusals that mean "the server answered but will not
take writes now" (callers get ``RedisUnavailable``; the breaker stays closed).

Services do not use the breaker directly: ``app.core.guard.Guard`` wraps it
with the error mapping every service shares.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

from redis import exceptions as redis_exc

from app.core.config import get_settings
from app.core.errors import RedisUnavailable

__all__ = [
    "CONNECTION_ERRORS",
    "REFUSED_FOR_NOW",
    "BreakerState",
    "CircuitBreaker",
    "breaker_for",
]

log = logging.getLogger("app.redis")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.ClusterDownError,
    redis_exc.RedisClusterUnreachableError,  # no Cluster node answered (not a RedisError)
    redis_exc.TryAgainError,
    redis_exc.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)
"""Errors that mean "Redis is not reachable right now" (the breaker counts these)."""
REFUSED_FOR_NOW: tuple[type[BaseException], ...] = (
    redis_exc.OutOfMemoryError,
    redis_exc.ReadOnlyError,
)
"""The server answered but refuses writes now (maxmemory + noeviction, a read-only
replica after a failover): callers get ``RedisUnavailable``; the breaker stays closed."""

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed / open / half-open breaker for calls to one Redis client.

    Closed: calls go through; ``failure_threshold`` consecutive connection
    failures open it. Open: ``allow()`` is False for ``reset_timeout``
    seconds, so fail-open paths answer at once instead of waiting a socket
    timeout. Then half-open: one trial call is let through; success closes the
    breaker, failure opens it again. Each transition is logged once.

    Use as ``with breaker: await client.get(...)``: entering raises
    ``RedisUnavailable`` when open; a connection error inside is recorded and
    re-raised as ``RedisUnavailable`` (from the original); an ``OOM`` or
    ``READONLY`` refusal is re-raised as ``RedisUnavailable`` too but counts as
    a success (the server answered), like any other outcome.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 2.0,
        name: str = "redis",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.name = name
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.transitions = 0
        self.rejected = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """May a call go to Redis now? (A half-open breaker admits one trial.)"""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._set("half_open")
            self._trial_in_flight = True
            return True
        self.rejected += 1
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self._state != "closed":
            self._set("closed")

    def record_failure(self, exc: BaseException | None = None) -> None:
        self._trial_in_flight = False
        self._failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._set("open", exc)
        elif self._state == "open":
            self._opened_at = self._clock()

    def _set(self, state: BreakerState, exc: BaseException | None = None) -> None:
        if state == self._state:
            return
        self.transitions += 1
        if state == "open":
            log.error(
                "circuit breaker %r opened after %d failures (%s); fail-open paths skip Redis "
                "for %.1fs",
                self.name,
                self._failures,
                exc,
                self.reset_timeout,
            )
        elif state == "closed":
            log.warning("circuit breaker %r closed: Redis answers again", self.name)
        self._state = state

    def release_trial(self) -> None:
        """Forget an admitted trial call without an outcome (a cancelled call proves nothing)."""
        self._trial_in_flight = False

    def open_error(self, subject: str = "", hint: str = "") -> RedisUnavailable:
        """The error for a call this open breaker refused; ``retry_after`` is ``reset_timeout``.

        *subject* starts the message (``"cache 'users': "``), *hint* ends it.
        """
        wait = max(0.0, self.reset_timeout - (self._clock() - self._opened_at))
        return RedisUnavailable(
            f"{subject}circuit breaker {self.name!r} is open after repeated Redis failures; "
            f"next trial in {wait:.1f}s{hint}",
            retry_after=self.reset_timeout,
        )

    def __enter__(self) -> CircuitBreaker:
        if not self.allow():
            raise self.open_error()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.record_success()
            return
        if isinstance(exc, RedisUnavailable):
            self.record_failure(exc)
            return
        if isinstance(exc, CONNECTION_ERRORS):
            self.record_failure(exc)
            raise RedisUnavailable(f"Redis call failed: {exc}") from exc
        if isinstance(exc, REFUSED_FOR_NOW):
            self.record_success()  # the server answered: no reason to stop trying
            raise RedisUnavailable(f"Redis refused the call for now: {exc}") from exc
        if isinstance(exc, asyncio.CancelledError):
            self.release_trial()  # a cancelled trial proves nothing either way
            return
        self.record_success()

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self._failures,
            "transitions": self.transitions,
            "rejected": self.rejected,
        }


_breakers: weakref.WeakKeyDictionary[Any, CircuitBreaker] = weakref.WeakKeyDictionary()


def breaker_for(client: Any) -> CircuitBreaker:
    """The breaker of *client* (one per client object, thresholds from settings)."""
    breaker = _breakers.get(client)
    if breaker is None:
        s = get_settings()
        breaker = CircuitBreaker(
            failure_threshold=s.breaker_failure_threshold, reset_timeout=s.breaker_reset_timeout
        )
        _breakers[client] = breaker
    return breaker
