"""What every part of the locks package shares: durations, tokens, the guard.

Imports nothing else of the package (every other module here imports it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from functools import lru_cache, partial
from typing import Final, TypeAlias

from app.core.errors import ConfigurationError, LockError, LockLost
from app.core.guard import Duration, Guard, PerClient, as_seconds

__all__ = [
    "LOCK_ATTRS",
    "RECEIPT_TTL_MS",
    "TAKEN",
    "WAITER_TTL_MS",
    "WAKE_TTL_MS",
    "LostCallback",
    "Seconds",
    "blocking_bound",
    "lease_drift",
    "lease_guard",
    "lease_timing",
    "log",
    "new_token",
    "wait_bound",
    "waited",
]

log = logging.getLogger("app.locks")

Seconds: TypeAlias = Duration
"""A duration: seconds as a number, or a ``timedelta`` (``app.core.guard.Duration``)."""

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
    return blocking_bound(blocking_timeout, default)


def blocking_bound(blocking_timeout: Seconds | None, default: float) -> float:
    """*blocking_timeout* in seconds (checked; 0 allowed), or *default* (the lease) when None."""
    if blocking_timeout is None:
        return default
    return as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)


def lease_timing(
    timeout: Seconds, renew_interval: Seconds | None, drift: Seconds | None, *, auto_renew: bool
) -> tuple[float, float, float]:
    """(lease, renew interval, drift margin) in seconds, checked: the one rule for every lease.

    The renew interval defaults to a third of the lease and must be shorter than it.
    Computed once per combination of values (and of their types, so ``True`` is
    refused as a lease even after ``1`` was accepted): lock objects are made per
    request, with the same few settings.
    """
    return _lease_timing(timeout, renew_interval, drift, auto_renew)


@lru_cache(maxsize=256, typed=True)
def _lease_timing(
    timeout: Seconds, renew_interval: Seconds | None, drift: Seconds | None, auto_renew: bool
) -> tuple[float, float, float]:
    lease = as_seconds(timeout, "timeout (the lease)")
    interval = lease / 3 if renew_interval is None else as_seconds(renew_interval, "renew_interval")
    if interval >= lease:
        raise ConfigurationError(
            f"renew_interval ({interval:g} s) must be shorter than the lease "
            f"({lease:g} s); the default is timeout/3"
        )
    margin = lease_drift(lease, drift, renew_interval=interval if auto_renew else None)
    return lease, interval, margin


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


def waited(seconds: float) -> str:
    """The " (waited N s)" part of an error message; empty when it did not wait."""
    return f" (waited {seconds:g} s)" if seconds > 0 else ""


def new_token() -> str:
    """A fresh random owner token (one per acquisition)."""
    return os.urandom(16).hex()


_GUARDS_PER_CLIENT: Final = 4096  # past this many (kind, name, lease), a client's cache restarts


class _OnClient:
    """What the package keeps per client object: its guards."""

    __slots__ = ("guards",)

    def __init__(self, client: object) -> None:
        self.guards: dict[tuple[str, str, float], Guard] = {}


_on_client: PerClient[_OnClient] = PerClient(_OnClient)


def lease_guard(client: object, kind: str, name: str, lease: float) -> Guard:
    """The ``Guard`` of a lock, semaphore or Redlock master, taken in its constructor.

    Redis unreachable (or the breaker open): ``RedisUnavailable`` saying that whether
    the lock is held stays unknown until its *lease* runs out. Redis refusing a command
    (a key of the wrong type, a script error): ``LockError`` naming the lock, Redis's
    text kept in ``__cause__``. A guard keeps no state of its own (the breaker is the
    client's), so objects of the same kind, name and lease on one client share one,
    built on first use: lock objects are made per request, for the same few names.
    """
    guards = _on_client(client).guards
    key = (kind, name, lease)
    guard = guards.get(key)
    if guard is None:
        if len(guards) >= _GUARDS_PER_CLIENT:
            guards.clear()
        guard = guards[key] = Guard(
            client,
            f"{kind} {name!r}",
            refused=partial(LockError, lock_name=name),
            hint=f"; whether it is held is unknown until its lease ({lease:g} s) runs out. "
            "Retry when Redis answers again.",
        )
    return guard
