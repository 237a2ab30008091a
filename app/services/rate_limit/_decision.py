"""What a rate-limit check answers: one result per policy, and the decision over all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.core.errors import RateLimitExceeded
from app.services.rate_limit._policy import Policy

__all__ = ["US", "Layout", "RateLimitDecision", "RateLimitResult"]

US = 1_000_000.0
"""Microseconds per second: the scripts count in microseconds."""


@dataclass(slots=True)
class RateLimitResult:
    """The state of one policy after a check.

    Attributes:
        policy: the policy checked.
        allowed: this policy alone would admit the request.
        limit: the policy's quota (``q``).
        remaining: whole units left after this check (``r``).
        reset_after: seconds until one more unit becomes available (``t``):
            the end of the window for ``fixed_window``, the next freed unit
            otherwise; 0 when the quota is full.
        retry_after: seconds until this policy would admit the same cost
            (0 when it does now).
    """

    policy: Policy
    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float

    @property
    def name(self) -> str:
        return self.policy.name


Layout = tuple[tuple[Policy, int, int], ...]  # (policy, limit, offset in the script reply)


class RateLimitDecision:
    """The outcome of one check over all policies of a limiter.

    Attributes:
        allowed: every policy admitted the cost (and was charged).
        results: one ``RateLimitResult`` per policy, in policy order (built
            on first access, so ``hit`` costs little more than ``is_allowed``).
        identifier: who was checked.
        cost: units asked for.
        degraded: Redis was unavailable and the failure mode allowed the
            request without counting it (results then show full quotas).
        lease: for ``ConcurrencyLimiter``, the lease to hand to ``release``.
    """

    __slots__ = (
        "_layout",
        "_reply",
        "_results",
        "allowed",
        "cost",
        "degraded",
        "identifier",
        "lease",
    )

    allowed: bool
    identifier: str | bytes | int
    cost: int
    degraded: bool
    lease: str | None

    def __init__(
        self,
        allowed: bool,
        results: Sequence[RateLimitResult],
        identifier: str | bytes | int,
        cost: int,
        degraded: bool = False,
        lease: str | None = None,
    ) -> None:
        self.allowed = allowed
        self._results: tuple[RateLimitResult, ...] | None = tuple(results)
        self._reply: list[int] | None = None
        self._layout: Layout = ()
        self.identifier = identifier
        self.cost = cost
        self.degraded = degraded
        self.lease = lease

    @classmethod
    def _from_reply(
        cls,
        reply: list[int],
        layout: Layout,
        identifier: str | bytes | int,
        cost: int,
        lease: str | None,
    ) -> RateLimitDecision:
        decision = cls.__new__(cls)
        decision.allowed = allowed = reply[0] == 1
        decision._results = None
        decision._reply = reply
        decision._layout = layout
        decision.identifier = identifier
        decision.cost = cost
        decision.degraded = False
        decision.lease = lease if allowed else None
        return decision

    @property
    def results(self) -> tuple[RateLimitResult, ...]:
        results = self._results
        if results is None:
            reply = self._reply
            assert reply is not None
            results = self._results = tuple(
                [
                    RateLimitResult(
                        policy,
                        reply[i] == 1,
                        limit,
                        reply[i + 1],
                        reply[i + 2] / US,
                        reply[i + 3] / US,
                    )
                    for policy, limit, i in self._layout
                ]
            )
        return results

    def __repr__(self) -> str:
        return (
            f"RateLimitDecision(allowed={self.allowed}, results={self.results!r}, "
            f"identifier={self.identifier!r}, cost={self.cost}, degraded={self.degraded}, "
            f"lease={self.lease!r})"
        )

    @property
    def violated(self) -> tuple[RateLimitResult, ...]:
        """The results of the policies that refused the request (empty when allowed)."""
        return () if self.allowed else tuple(r for r in self.results if not r.allowed)

    @property
    def retry_after(self) -> float:
        """Seconds until every refusing policy would admit the cost (0 when allowed)."""
        return max((r.retry_after for r in self.violated), default=0.0)

    def raise_for_limit(self) -> None:
        """Raise ``RateLimitExceeded`` (429) naming the violated policies, if refused."""
        if self.allowed:
            return
        names = [r.name for r in self.violated]
        retry = self.retry_after
        raise RateLimitExceeded(
            f"quota exceeded for {', '.join(repr(n) for n in names)}; retry after {retry:.3g} s",
            retry_after=retry,
            violated_policies=names,
        )
