"""Limiters by policies, built once per client, and giving concurrency slots back."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from starlette.requests import HTTPConnection

from app.core.config import FailureMode
from app.core.errors import RedisUnavailable
from app.core.guard import Duration, PerClient, as_seconds
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


_Limiters: TypeAlias = dict[tuple[Any, ...], RateLimiter | ConcurrencyLimiter]


def _no_limiters(client: object) -> _Limiters:
    return {}


class LimiterCache:
    """Limiters by policies, per client (``PerClient``: built on first use, kept with the client).

    Bounded: past *maxsize* distinct policy sets for one client (e.g. per-tenant
    quotas from a resolver) the oldest limiter is dropped; rebuilding one costs
    no I/O. A bad *lease_seconds* raises ``ConfigurationError`` here, at startup.
    The limiters of the client of the last call are found without the
    ``PerClient`` lookup (an identity check: a rate-limit check is a hot path).
    """

    def __init__(
        self,
        *,
        failure_mode: FailureMode | None = None,
        lease_seconds: Duration = 60.0,
        maxsize: int = 512,
        namespace: str = "ratelimit",
    ) -> None:
        self.failure_mode = failure_mode
        self.namespace = namespace
        self.lease_seconds = as_seconds(lease_seconds, "lease_seconds")
        self.maxsize = maxsize
        self._limiters: PerClient[_Limiters] = PerClient(_no_limiters)
        self._client: object = None  # the client of the last call, and its limiters
        self._current: _Limiters = {}
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

    def _items(self, client: AnyRedis) -> _Limiters:
        if client is self._client:
            return self._current
        items = self._current = self._limiters(client)
        self._client = client
        return items

    def _put(
        self, items: _Limiters, key: tuple[Any, ...], limiter: RateLimiter | ConcurrencyLimiter
    ) -> None:
        if len(items) >= self.maxsize:
            items.pop(next(iter(items)))
        items[key] = limiter

    def rate(
        self, client: AnyRedis, policies: tuple[Policy, ...], algorithm: Algorithm
    ) -> RateLimiter:
        items = self._items(client)
        key = ("rate", algorithm, policies)
        limiter = items.get(key)
        if not isinstance(limiter, RateLimiter):
            limiter = RateLimiter(
                client,
                policies=policies,
                algorithm=algorithm,
                failure_mode=self.failure_mode,
                namespace=self.namespace,
            )
            self._put(items, key, limiter)
        return limiter

    def concurrency(self, client: AnyRedis, policies: tuple[Policy, ...]) -> ConcurrencyLimiter:
        items = self._items(client)
        key = ("concurrency", policies)
        limiter = items.get(key)
        if not isinstance(limiter, ConcurrencyLimiter):
            limiter = ConcurrencyLimiter(
                client,
                policies=policies,
                lease_seconds=self.lease_seconds,
                failure_mode=self.failure_mode,
                namespace=self.namespace,
            )
            self._put(items, key, limiter)
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
