"""``ConcurrencyLimiter``: caps requests in flight with leases that expire on their own."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.core.config import FailureMode
from app.core.errors import ConfigurationError
from app.core.guard import Duration, as_seconds
from app.core.redis import AnyRedis
from app.core.telemetry import traced
from app.services.rate_limit._algorithms import CONCURRENCY
from app.services.rate_limit._decision import US, RateLimitDecision, RateLimitResult
from app.services.rate_limit._limiter import (
    CHARGE,
    PEEK,
    RELEASE,
    Limiter,
    span_attrs,
    span_outcome,
)
from app.services.rate_limit._policy import Policy, PolicyLike, as_policies

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter(Limiter):
    """Caps how many requests of an identifier are in flight at once.

    Args:
        redis: any ``redis.asyncio`` client, fakeredis or ``RedisCluster``.
        max_concurrent: one policy (``"<n>-concurrent"``), or
        policies: ``"4 concurrent"`` or ``Policy(4, unit="concurrent-requests")``s.
        lease_seconds: how long an unreleased lease holds its slot (a worker
            that dies mid-request frees its slots after this long; seconds or a
            ``timedelta``, more than 1 ms). Requests that run longer than this
            stop being counted.
        retry_after: the ``Retry-After`` hint (seconds) for refused requests.
        failure_mode, namespace: as for ``RateLimiter``.

    The lease set of each identifier expires with its longest lease.
    """

    __slots__ = ("_lease_us", "_limits", "retry_hint")

    def __init__(
        self,
        redis: AnyRedis,
        max_concurrent: int | None = None,
        *,
        policies: PolicyLike | None = None,
        lease_seconds: Duration = 60.0,
        retry_after: float = 1.0,
        failure_mode: FailureMode | None = None,
        namespace: str = "ratelimit",
    ) -> None:
        if policies is None:
            if max_concurrent is None:
                raise ConfigurationError("a ConcurrencyLimiter needs max_concurrent or policies")
            resolved: tuple[Policy, ...] = (Policy(max_concurrent, unit="concurrent-requests"),)
        elif max_concurrent is not None:
            raise ConfigurationError("give either max_concurrent or policies, not both")
        else:
            resolved = as_policies(policies)
        rates = [p.name for p in resolved if not p.is_concurrency]
        if rates:
            raise ConfigurationError(
                f"policies {rates} are rates, not concurrency: use RateLimiter"
            )
        lease = as_seconds(lease_seconds, "lease_seconds")
        if lease <= 0.001:
            raise ConfigurationError(f"lease_seconds must be more than 1 ms, got {lease_seconds!r}")
        super().__init__(redis, resolved, "concurrency", failure_mode, namespace)
        self._lease_us = str(round(lease * US)).encode()
        self._limits = tuple(p.limit for p in resolved)
        self.retry_hint = retry_after

    @traced("ratelimit.check", attrs=span_attrs, result=span_outcome)
    async def acquire(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Take *cost* slots under every policy if all have room; ``decision.lease`` when taken.

        All-or-nothing, one ``EVALSHA``. Hand the decision to ``release`` when
        the work ends (``hold`` does it for you); unreleased slots free
        themselves after ``lease_seconds``. Cancelled mid-call, slots may have
        been taken without the caller knowing the lease: they expire. Redis
        down: a ``degraded`` allowed decision (fail-open) or ``RedisUnavailable``.
        """
        lease = secrets.token_hex(8)
        reply = await self._run(
            CONCURRENCY,
            self.keys_for(identifier),
            (self._cost(cost), CHARGE, lease, self._lease_us, *self._limits),
        )
        decision = self._decision(reply, identifier, cost, lease)
        if not decision.allowed:
            retry = self.retry_hint
            results = tuple(
                r
                if r.allowed
                else RateLimitResult(r.policy, False, r.limit, r.remaining, 0.0, retry)
                for r in decision.results
            )
            return RateLimitDecision(False, results, identifier, cost)
        return decision

    async def release(self, decision: RateLimitDecision) -> bool:
        """Give back the slots of an ``acquire`` decision; True when they were still held.

        Idempotent; a decision without a lease (refused or degraded) is a
        no-op. Raises ``RedisUnavailable`` only in fail-closed mode (the
        slots then expire on their own).
        """
        if decision.lease is None:
            return False
        reply = await self._run(
            CONCURRENCY,
            self.keys_for(decision.identifier),
            (self._cost(decision.cost), RELEASE, decision.lease, self._lease_us, *self._limits),
        )
        return bool(reply and reply[0] > 0)

    async def peek(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Would *cost* slots be granted now? Takes none (expired leases are dropped)."""
        reply = await self._run(
            CONCURRENCY,
            self.keys_for(identifier),
            (self._cost(cost), PEEK, b"-", self._lease_us, *self._limits),
        )
        return self._decision(reply, identifier, cost)

    @asynccontextmanager
    async def hold(
        self, identifier: str | bytes | int, cost: int = 1
    ) -> AsyncIterator[RateLimitDecision]:
        """``async with limiter.hold("user-1"):`` take slots, release them on exit.

        Raises ``RateLimitExceeded`` when refused. The release runs on normal
        exit, on errors and on cancellation.
        """
        decision = await self.acquire(identifier, cost)
        decision.raise_for_limit()
        try:
            yield decision
        finally:
            await self.release(decision)

    def __repr__(self) -> str:
        return f"ConcurrencyLimiter({'; '.join(map(str, self.policies))})"
