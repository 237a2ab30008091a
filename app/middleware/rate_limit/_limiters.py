"""Limiters by policies, built once per client, and giving concurrency slots back."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from starlette.requests import HTTPConnection

from app.core.config import FailureMode
from app.core.errors import RedisUnavailable
from app.core.redis import AnyRedis
from app.services.rate_limit import (
    Algorithm,
    ConcurrencyLimiter,
    Policy,
    PolicyLike,
    RateLimitDecision,
    RateLimiter,
    as_policies,
)

__all__ = ["LimiterCache", "PolicyResolver", "release_slot", "split_policies"]

log = logging.getLogger("app.rate_limit")

PolicyResolver: TypeAlias = Callable[[HTTPConnection, str], Awaitable["PolicyLike | None"]]
"""``async (conn, identity) -> policies`` per request (plans, tenants); None: no limit."""


class LimiterCache:
    """Limiters by policies for the current client (rebuilt when the client changes).

    Bounded: past *maxsize* distinct policy sets (e.g. per-tenant quotas from
    a resolver) the oldest limiter is dropped; rebuilding one costs no I/O.
    """

    def __init__(
        self,
        *,
        failure_mode: FailureMode | None = None,
        lease_seconds: float = 60.0,
        maxsize: int = 512,
    ) -> None:
        self.failure_mode = failure_mode
        self.lease_seconds = lease_seconds
        self.maxsize = maxsize
        self._client: AnyRedis | None = None
        self._items: dict[tuple[Any, ...], RateLimiter | ConcurrencyLimiter] = {}
        self._parsed: dict[str, tuple[Policy, ...]] = {}

    def policies(self, spec: PolicyLike) -> tuple[Policy, ...]:
        """``as_policies`` with parsed strings remembered."""
        if not isinstance(spec, str):
            return as_policies(spec)
        found = self._parsed.get(spec)
        if found is None:
            if len(self._parsed) >= self.maxsize:
                self._parsed.pop(next(iter(self._parsed)))
            found = self._parsed[spec] = as_policies(spec)
        return found

    def _get(
        self, client: AnyRedis, key: tuple[Any, ...]
    ) -> RateLimiter | ConcurrencyLimiter | None:
        if client is not self._client:
            self._items.clear()
            self._client = client
        return self._items.get(key)

    def _put(self, key: tuple[Any, ...], limiter: RateLimiter | ConcurrencyLimiter) -> None:
        if len(self._items) >= self.maxsize:
            self._items.pop(next(iter(self._items)))
        self._items[key] = limiter

    def rate(
        self, client: AnyRedis, policies: tuple[Policy, ...], algorithm: Algorithm
    ) -> RateLimiter:
        key = ("rate", algorithm, policies)
        limiter = self._get(client, key)
        if not isinstance(limiter, RateLimiter):
            limiter = RateLimiter(
                client, policies=policies, algorithm=algorithm, failure_mode=self.failure_mode
            )
            self._put(key, limiter)
        return limiter

    def concurrency(self, client: AnyRedis, policies: tuple[Policy, ...]) -> ConcurrencyLimiter:
        key = ("concurrency", policies)
        limiter = self._get(client, key)
        if not isinstance(limiter, ConcurrencyLimiter):
            limiter = ConcurrencyLimiter(
                client,
                policies=policies,
                lease_seconds=self.lease_seconds,
                failure_mode=self.failure_mode,
            )
            self._put(key, limiter)
        return limiter


async def release_slot(limiter: ConcurrencyLimiter | None, lease: RateLimitDecision | None) -> None:
    """Give a concurrency slot back; if Redis refuses (fail-closed), it expires on its own."""
    if limiter is None or lease is None:
        return
    try:
        await limiter.release(lease)
    except RedisUnavailable as exc:
        log.warning("concurrency slot not released (%s); it expires with its lease", exc)


def split_policies(policies: tuple[Policy, ...]) -> tuple[tuple[Policy, ...], tuple[Policy, ...]]:
    return (
        tuple(p for p in policies if not p.is_concurrency),
        tuple(p for p in policies if p.is_concurrency),
    )
