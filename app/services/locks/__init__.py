"""Distributed locks, semaphores and Redlock on Redis: the public names of the capability."""

from app.services.locks._lock import (
    DEFAULT_FENCE_TTL,
    LostCallback,
    RedisLock,
    Seconds,
    as_seconds,
    fenced_write,
    lease_drift,
    wait_bound,
)
from app.services.locks._redlock import Redlock
from app.services.locks._semaphore import Permit, Semaphore

__all__ = [
    "DEFAULT_FENCE_TTL",
    "LostCallback",
    "Permit",
    "RedisLock",
    "Redlock",
    "Seconds",
    "Semaphore",
    "as_seconds",
    "fenced_write",
    "lease_drift",
    "wait_bound",
]
