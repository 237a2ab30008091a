"""What every part of the locks package shares: durations, tokens, keys, the guarded call.

Imports nothing else of the package (every other module here imports it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import lru_cache
from typing import Any, Final, TypeAlias, TypeVar

from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import ConfigurationError, LockError, LockLost, RedisUnavailable
from app.core.keys import KeySpace
from app.core.redis import CircuitBreaker

__all__ = [
    "LOCK_ATTRS",
    "RECEIPT_TTL_MS",
    "TAKEN",
    "WAITER_TTL_MS",
    "WAKE_TTL_MS",
    "LostCallback",
    "Seconds",
    "as_seconds",
    "as_text",
    "guarded",
    "keyspace",
    "lease_drift",
    "log",
    "new_token",
    "to_ms",
    "wait_bound",
    "waited",
]

log = logging.getLogger("app.locks")

T = TypeVar("T")

Seconds: TypeAlias = "float | int | timedelta"
"""A duration: seconds as a number, or a ``timedelta``."""

LostCallback: TypeAlias = "Callable[[LockLost], Awaitable[None] | None]"
"""``on_lost(error)``: called once when the watchdog finds the lock gone (may be async)."""

WAKE_TTL_MS: Final = 2000  # how long a release's wake marker waits for a blocked waiter
WAITER_TTL_MS: Final = 3000  # a fair waiter that stops polling this long leaves the queue
# A release whose reply was lost is retried by the client library; its receipt lets the
# retry answer "released" (not a false LockLost). Far longer than socket timeout x retries.
RECEIPT_TTL_MS: Final = 10_000

LOCK_ATTRS = {"toolkit.lock.name": "name", "toolkit.lock.kind": "_kind"}  # span attr -> attr
TAKEN = {True: "acquired", False: "timeout"}


def wait_bound(blocking: bool, blocking_timeout: Seconds | None, default: float) -> float:
    """How long an ``acquire(blocking, blocking_timeout)`` may wait; *default* when unset.

    Non-blocking acquires wait 0 and refuse a ``blocking_timeout`` (a likely mistake).
    """
    if not blocking:
        if blocking_timeout is not None:
            raise ConfigurationError("blocking_timeout needs blocking=True")
        return 0.0
    if blocking_timeout is None:
        return default
    return as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)


def as_seconds(value: Seconds | None, what: str, *, allow_zero: bool = False) -> float:
    """*value* as float seconds; refuses negatives, NaN and (unless allowed) zero."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(f"{what} must be seconds (int, float or timedelta), got {value!r}")
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{what} must be {bound} seconds, got {value!r}")
    return seconds


def lease_drift(
    lease: float, drift: Seconds | None, *, renew_interval: float | None = None
) -> float:
    """The drift margin of a *lease* (seconds): *drift*, or by default 1 % of it plus 2 ms.

    A holder treats its lease as ended this long before it can end in Redis,
    which covers the server's clock running faster than this process's and the
    time this process needs to notice. Refuses a margin as long as the lease,
    and, given the *renew_interval* of a watchdog, one that leaves no time for
    a renewal to be confirmed.
    """
    seconds = lease * 0.01 + 0.002 if drift is None else as_seconds(drift, "drift", allow_zero=True)
    if seconds >= lease:
        raise ConfigurationError(
            f"drift ({seconds:g} s) must be shorter than the lease ({lease:g} s); "
            "the default is 1 % of the lease plus 2 ms"
        )
    if renew_interval is not None and renew_interval + seconds >= lease:
        raise ConfigurationError(
            f"renew_interval ({renew_interval:g} s) plus the drift margin ({seconds:g} s) "
            f"must be shorter than the lease ({lease:g} s), or no renewal could be "
            "confirmed in time"
        )
    return seconds


def to_ms(seconds: float) -> int:
    """*seconds* as whole milliseconds for Redis, rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


def waited(seconds: float) -> str:
    """The " (waited N s)" part of an error message; empty when it did not wait."""
    return f" (waited {seconds:g} s)" if seconds > 0 else ""


def new_token() -> str:
    """A fresh random owner token (one per acquisition)."""
    return os.urandom(16).hex()


def as_text(value: Any) -> str | None:
    """A reply as text, whatever the client's ``decode_responses`` (None stays None)."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@lru_cache(maxsize=64)
def _keyspace(prefix: str, service: str) -> KeySpace:
    return KeySpace(prefix, service)


def keyspace(key_prefix: str | None, service: str) -> KeySpace:
    """The ``KeySpace`` of *service* under *key_prefix* (default: the settings' prefix)."""
    return _keyspace(key_prefix or get_settings().redis_key_prefix, service)


def _unavailable(kind: str, name: str, lease: float, exc: BaseException) -> RedisUnavailable:
    return RedisUnavailable(
        f"{kind} {name!r}: Redis is unreachable ({exc}); whether it is held is unknown until "
        f"its lease ({lease:g} s) runs out. Retry when Redis answers again."
    )


async def guarded(
    call: Callable[[], Awaitable[T]], breaker: CircuitBreaker, kind: str, name: str, lease: float
) -> T:
    """Run one Redis call; errors become ``RedisUnavailable`` or ``LockError``."""
    try:
        with breaker:
            return await call()
    except RedisUnavailable as exc:
        raise _unavailable(kind, name, lease, exc) from exc
    except RedisError as exc:
        raise LockError(f"{kind} {name!r}: Redis refused the call: {exc}", lock_name=name) from exc
