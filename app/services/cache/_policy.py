"""Lifetimes: TTL values, their conversion to milliseconds, and ``CachePolicy``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from app.core.errors import ConfigurationError
from app.core.guard import Duration, as_seconds, to_ms

__all__ = [
    "DEFAULT_TTL",
    "NO_EXPIRY",
    "TTL",
    "CachePolicy",
    "TagsArg",
    "fresh_ms",
    "lifetimes",
    "make_policy",
    "ms",
    "to_seconds",
]

TTL: TypeAlias = Duration
"""Seconds (int or float) or a ``timedelta`` (the toolkit's ``Duration``)."""

NO_EXPIRY: Final[float] = math.inf
"""Pass as ``ttl`` to store an entry that never expires (the only way to get one)."""

DEFAULT_TTL: Final = 3600.0

TagsArg: TypeAlias = "Iterable[str] | Callable[[], Iterable[str]]"


def to_seconds(ttl: TTL, what: str = "ttl") -> float:
    """*ttl* as seconds: ``NO_EXPIRY`` as is, anything else validated by ``as_seconds``.

    ``ConfigurationError`` (a ``ValueError``) for zero, a negative, NaN, ``-inf``,
    a ``bool`` or a non-number.
    """
    if isinstance(ttl, float) and ttl == NO_EXPIRY:
        return NO_EXPIRY
    return as_seconds(ttl, what)


def ms(seconds: float) -> int:
    """*seconds* in whole milliseconds, rounded up (``to_ms``); 0 for ``NO_EXPIRY`` (persist)."""
    return 0 if math.isinf(seconds) else to_ms(seconds)


def fresh_ms(pttl: int, stale_ms: int) -> float:
    """Milliseconds an entry stays fresh given its PTTL (-1: forever) and stale window."""
    if pttl == -1:
        return math.inf
    if pttl < 0:
        return 0.0
    return float(pttl - stale_ms)


def lifetimes(default_ttl: float, ttl: TTL | None, stale_ttl: TTL | None) -> tuple[int, int]:
    """(physical lifetime ms (0: persistent), stale window ms)."""
    fresh = default_ttl if ttl is None else to_seconds(ttl)
    if stale_ttl is None:
        return ms(fresh), 0
    total = to_seconds(stale_ttl, "stale_ttl")
    if total < fresh:
        raise ConfigurationError(f"stale_ttl ({total}s) must be >= ttl ({fresh}s)")
    if math.isinf(total):
        raise ConfigurationError(
            "stale_ttl must be finite (use ttl=NO_EXPIRY for a persistent entry)"
        )
    return ms(total), ms(total) - ms(fresh)


@dataclass(slots=True, eq=False)
class CachePolicy:
    """Precomputed lifetimes of ``get_or_set`` calls (from ``CacheService.policy``)."""

    life_ms: int
    stale_ms: int
    beta: float
    lease_ms: int
    wait_timeout: float
    simple: bool = field(init=False)
    """No stale window and no early refresh: the plain read-or-compute path."""

    def __post_init__(self) -> None:
        self.simple = not self.stale_ms and not self.beta


def make_policy(
    default_ttl: float,
    default_lease_ms: int,
    default_wait_timeout: float,
    ttl: TTL | None,
    stale_ttl: TTL | None,
    early_refresh: float,
    lease: Duration | None,
    wait_timeout: Duration | None,
) -> CachePolicy:
    """The policy of these options, the service's defaults filling those left None.

    ``ConfigurationError`` for a bad TTL, lease, wait or ``early_refresh``.
    """
    if early_refresh < 0:
        raise ConfigurationError("early_refresh (XFetch beta) must be >= 0")
    life_ms, stale_ms = lifetimes(default_ttl, ttl, stale_ttl)
    return CachePolicy(
        life_ms,
        stale_ms,
        float(early_refresh),
        default_lease_ms if lease is None else to_ms(as_seconds(lease, "lease")),
        default_wait_timeout
        if wait_timeout is None
        else as_seconds(wait_timeout, "wait_timeout", allow_zero=True),
    )
