"""``RateLimiter``: counts hits of identifiers against rate policies, one round trip per check."""

from __future__ import annotations

from app.core.config import FailureMode
from app.core.errors import ConfigurationError
from app.core.redis import AnyRedis
from app.core.telemetry import traced
from app.services.rate_limit._algorithms import ALGORITHMS, Algorithm, validate_policies
from app.services.rate_limit._decision import RateLimitDecision
from app.services.rate_limit._limiter import (
    CHARGE,
    CHARGE_BRIEF,
    PEEK,
    Limiter,
    span_attrs,
    span_outcome,
)
from app.services.rate_limit._policy import Policy, PolicyLike, as_policies

__all__ = ["RateLimiter"]


def _resolve(
    max_requests: int | None, window_seconds: float | None, policies: PolicyLike | None
) -> tuple[Policy, ...]:
    if policies is not None:
        if max_requests is not None or window_seconds is not None:
            raise ConfigurationError(
                "give either max_requests/window_seconds or policies, not both"
            )
        return as_policies(policies)
    if max_requests is None or window_seconds is None:
        raise ConfigurationError(
            "a limiter needs max_requests and window_seconds "
            "(RateLimiter(redis, max_requests=3, window_seconds=1)) or policies='10/second'"
        )
    return (Policy(max_requests, window_seconds),)


class RateLimiter(Limiter):
    """Counts hits of identifiers against policies; one round trip per check.

    Args:
        redis: any ``redis.asyncio`` client (bytes or ``decode_responses=True``),
            fakeredis, or ``RedisCluster``.
        max_requests, window_seconds: one policy (the DESIGN contract), or
        policies: ``"10/second;1000/day"``, a ``Policy`` or a list of them.
        algorithm: ``"gcra"`` (default), ``"sliding_counter"``,
            ``"sliding_log"`` (O(limit) memory) or ``"fixed_window"``.
        failure_mode: ``"open"`` / ``"closed"`` when Redis is down; default
            ``RATE_LIMIT_FAILURE_MODE`` (read now, at construction).
        namespace: the key space (default ``ratelimit``): limiters in different
            namespaces count separately even with the same policy.

    Keys live under ``<prefix>:<namespace>:{<identifier>}:...`` (prefix from
    settings at construction) and each expires once it no longer affects any
    decision (GCRA: when its quota is full again; windows: after their window).
    """

    __slots__ = ("_args", "_check_args", "_script", "algorithm")

    def __init__(
        self,
        redis: AnyRedis,
        max_requests: int | None = None,
        window_seconds: float | None = None,
        *,
        policies: PolicyLike | None = None,
        algorithm: Algorithm = "gcra",
        failure_mode: FailureMode | None = None,
        namespace: str = "ratelimit",
    ) -> None:
        resolved = _resolve(max_requests, window_seconds, policies)
        args = validate_policies(resolved, algorithm)
        super().__init__(redis, resolved, algorithm, failure_mode, namespace)
        self.algorithm = algorithm
        self._script = ALGORITHMS[algorithm].script
        # Encoded once per limiter, not per call; is_allowed's whole argument list is constant.
        self._args = tuple(str(n).encode() for n in args)
        self._check_args = (b"1", CHARGE_BRIEF, *self._args)

    @traced("ratelimit.check", attrs=span_attrs, result=span_outcome)
    async def is_allowed(self, identifier: str | bytes | int) -> bool:
        """Count one hit of *identifier* if every policy admits it; True when admitted.

        A refused hit is not counted anywhere. One ``EVALSHA`` whose reply is
        one integer (the script skips the per-policy figures ``hit`` reports);
        atomic across policies and concurrent callers. Cancelled mid-call, the
        hit may or may not have been counted (at most once). Redis down: True
        in fail-open mode, ``RedisUnavailable`` in fail-closed mode.
        """
        reply = await self._run(self._script, self.keys_for(identifier), self._check_args)
        return reply is None or reply == 1

    @traced("ratelimit.check", attrs=span_attrs, result=span_outcome)
    async def hit(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Charge *cost* units to every policy if all admit them; the state of each policy.

        All-or-nothing and atomic in one ``EVALSHA`` (a refusal charges no
        policy). ``cost=0`` reads without charging. Keys written get a TTL
        (see the class docstring). Cancelled mid-call, the charge may or may
        not have happened. Redis down: a ``degraded`` allowed decision in
        fail-open mode, ``RedisUnavailable`` in fail-closed mode.
        """
        reply = await self._run(
            self._script, self.keys_for(identifier), (self._cost(cost), CHARGE, *self._args)
        )
        return self._decision(reply, identifier, cost)

    async def peek(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Would *cost* units be admitted now? Charges nothing; otherwise like ``hit``.

        (``sliding_log`` drops expired entries while looking, which changes no decision.)
        """
        reply = await self._run(
            self._script, self.keys_for(identifier), (self._cost(cost), PEEK, *self._args)
        )
        return self._decision(reply, identifier, cost)

    async def enforce(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """``hit``, raising ``RateLimitExceeded`` (429, ``violated-policies``) when refused."""
        decision = await self.hit(identifier, cost)
        decision.raise_for_limit()
        return decision

    def __repr__(self) -> str:
        return f"RateLimiter({'; '.join(map(str, self.policies))}, algorithm={self.algorithm!r})"
