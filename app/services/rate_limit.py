"""Rate limiting: one atomic Lua round trip per check, any number of policies.

``RateLimiter`` checks one identifier against one or more policies (see
``app.services.rate_limit_policy``) with one algorithm::

    limiter = RateLimiter(redis, max_requests=3, window_seconds=1)
    await limiter.is_allowed("user-1")              # -> bool; refusals are not counted

    limiter = RateLimiter(redis, policies="burst=10/second;daily=1000/day")
    decision = await limiter.hit("user-1", cost=2)  # one EVALSHA for both policies
    decision.allowed, [(r.name, r.remaining, r.reset_after) for r in decision.results]

Algorithms (each one Lua script, clocked by Redis ``TIME`` or key expiry,
never by the client):

* ``gcra`` (default): one integer per key (the theoretical arrival time);
  smooth, sub-second windows, ``burst`` above the limit, exact to the microsecond.
* ``sliding_counter``: two counts per key (current and previous window),
  weighted; an approximation of a sliding window with constant memory.
* ``sliding_log``: one sorted-set entry per admitted unit: exact, but memory
  and CPU are O(limit) per key, so keep it for small limits.
* ``fixed_window``: one counter per key; the window opens at the first hit.

``ConcurrencyLimiter`` caps requests *in flight*: each admitted request holds
a lease until ``release`` (or until ``lease_seconds`` pass, so a crashed
worker cannot hold slots forever).

Guarantees: a check is one ``EVALSHA`` whatever the number of policies, and
all-or-nothing: a request refused by one policy consumes nothing from the
others. Every key carries a TTL, and the keys of one check share a Cluster
hash tag (the escaped identifier). ``NOSCRIPT`` after a restart or
``SCRIPT FLUSH`` is recovered inside the same call.

Redis down: with ``failure_mode="open"`` (the default, from
``RATE_LIMIT_FAILURE_MODE``) checks allow the request and mark the decision
``degraded``; the circuit breaker makes them answer at once while Redis is
known to be down. With ``"closed"`` they raise ``RedisUnavailable`` (503).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import RedisError

from app.core.config import FailureMode, get_settings
from app.core.errors import RateLimitExceeded, RedisUnavailable
from app.core.keys import KeySpace, escape
from app.core.redis import AnyRedis, breaker_for
from app.core.scripts import Script, ScriptArg
from app.core.telemetry import outcome, traced
from app.services.rate_limit_policy import Policy, PolicyLike, as_policies

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AlgorithmSpec",
    "ConcurrencyLimiter",
    "Policy",
    "RateLimitDecision",
    "RateLimitResult",
    "RateLimiter",
    "validate_policies",
]

log = logging.getLogger("app.rate_limit")

Algorithm = Literal["gcra", "sliding_counter", "sliding_log", "fixed_window"]

_SERVICE = "ratelimit"
_US = 1_000_000.0
_CHARGE, _PEEK, _RELEASE, _CHARGE_BRIEF = b"1", b"0", b"-1", b"2"
_COSTS = tuple(str(i).encode() for i in range(65))


_TAGS: dict[str | bytes | int, str] = {}
_TAGS_MAX = 4096


def _remember_tag(identifier: str | bytes | int) -> str:
    """``{escaped identifier}``, remembered: the same clients come back (bounded)."""
    tag = "{" + escape(identifier) + "}"
    if len(_TAGS) >= _TAGS_MAX:
        _TAGS.clear()
    _TAGS[identifier] = tag
    return tag


def _load(name: str) -> Script:
    return Script.from_package("app.services", f"lua/ratelimit_{name}.lua")


def _gcra_args(policy: Policy) -> tuple[int, int]:
    interval = round(policy.window_us / policy.limit)
    if interval < 1:
        raise ValueError(
            f"policy {policy.name!r} asks for more than one unit per microsecond; "
            "GCRA needs window / limit >= 1 us (use fixed_window for such rates)"
        )
    return interval, interval * policy.capacity


def _fixed_args(policy: Policy) -> tuple[int, int]:
    return policy.limit, max(1, -(-policy.window_us // 1000))


def _window_args(policy: Policy) -> tuple[int, int]:
    return policy.limit, policy.window_us


@dataclass(frozen=True, slots=True)
class AlgorithmSpec:
    """One algorithm: its Lua script and the two numbers it needs per policy."""

    script: Script
    args: Callable[[Policy], tuple[int, int]]


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "gcra": AlgorithmSpec(_load("gcra"), _gcra_args),
    "sliding_counter": AlgorithmSpec(_load("sliding_counter"), _window_args),
    "sliding_log": AlgorithmSpec(_load("sliding_log"), _window_args),
    "fixed_window": AlgorithmSpec(_load("fixed_window"), _fixed_args),
}
"""Algorithm name -> its script and per-policy arguments. Adding one is a script and a line."""

_CONCURRENCY = _load("concurrency")


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


_Layout = tuple[tuple[Policy, int, int], ...]  # (policy, limit, offset in the script reply)


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
        self._layout: _Layout = ()
        self.identifier = identifier
        self.cost = cost
        self.degraded = degraded
        self.lease = lease

    @classmethod
    def _from_reply(
        cls,
        reply: list[int],
        layout: _Layout,
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
                        reply[i + 2] / _US,
                        reply[i + 3] / _US,
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


def _span_attrs(limiter: _Limiter, *args: Any, **kwargs: Any) -> dict[str, str]:
    return {"toolkit.ratelimit.policy": ",".join(p.name for p in limiter.policies)}


def _span_outcome(decision: bool | RateLimitDecision) -> str:
    allowed = decision if isinstance(decision, bool) else decision.allowed
    return "allowed" if allowed else "rejected"


class _Limiter:
    """Shared plumbing: policies, precomputed keys and arguments, failure mode."""

    __slots__ = (
        "_breaker",
        "_fail_open",
        "_full",
        "_layout",
        "_max_cost",
        "_root",
        "_suffixes",
        "policies",
        "redis",
    )

    def __init__(
        self,
        redis: AnyRedis,
        policies: tuple[Policy, ...],
        kind: str,
        failure_mode: FailureMode | None,
    ) -> None:
        settings = get_settings()
        self.redis = redis
        self.policies = policies
        self._breaker = breaker_for(redis)
        self._fail_open = (failure_mode or settings.rate_limit_failure_mode) == "open"
        self._root = KeySpace(settings.redis_key_prefix, _SERVICE).root
        self._suffixes = tuple(
            ":" + ":".join(escape(part) for part in _key_parts(p, kind)) for p in policies
        )
        self._max_cost = min(p.capacity for p in policies)
        self._full = tuple(
            RateLimitResult(p, True, p.limit, p.capacity, 0.0, 0.0) for p in policies
        )
        self._layout = tuple((p, p.limit, 1 + 4 * i) for i, p in enumerate(policies))

    def keys_for(self, identifier: str | bytes | int) -> list[str]:
        """The Redis keys of *identifier*, one per policy, all under the hash tag ``{identifier}``."""
        tag = _TAGS.get(identifier)
        if tag is None:
            tag = _remember_tag(identifier)
        head = self._root + tag
        return [head + suffix for suffix in self._suffixes]

    def _cost(self, cost: int) -> bytes:
        if cost == 1 and cost is not True:
            return b"1"
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be an integer >= 0, got {cost!r}")
        if cost > self._max_cost:
            raise ValueError(
                f"cost {cost} exceeds the capacity of a policy ({self._max_cost}); such a "
                "request could never be admitted"
            )
        return _COSTS[cost] if cost < len(_COSTS) else str(cost).encode()

    async def _run(self, script: Script, keys: list[str], args: Sequence[ScriptArg]) -> Any:
        """Run *script*; its reply, or None when Redis is unavailable and the mode is fail-open."""
        try:
            with self._breaker:
                return await script(self.redis, keys, args)
        except RedisUnavailable as exc:
            if self._fail_open:
                outcome("degraded", exc)
                return None
            raise
        except RedisError as exc:
            log.warning("rate limit script %s failed: %s", script.name, exc)
            if self._fail_open:
                outcome("degraded", exc)
                return None
            raise RedisUnavailable(f"rate limit check failed: {exc}") from exc

    def _decision(
        self,
        reply: list[int] | None,
        identifier: str | bytes | int,
        cost: int,
        lease: str | None = None,
    ) -> RateLimitDecision:
        if reply is None:
            return RateLimitDecision(True, self._full, identifier, cost, degraded=True)
        return RateLimitDecision._from_reply(reply, self._layout, identifier, cost, lease)

    async def reset(self, identifier: str | bytes | int) -> None:
        """Forget everything counted for *identifier* under these policies (one ``UNLINK``).

        Raises ``RedisUnavailable`` when Redis cannot be reached (whatever the
        failure mode: a reset that did not happen must not look like one that did).
        """
        try:
            with self._breaker:
                await self.redis.unlink(*self.keys_for(identifier))
        except RedisError as exc:
            raise RedisUnavailable(f"rate limit reset failed: {exc}") from exc


def validate_policies(policies: Sequence[Policy], algorithm: str) -> tuple[int, ...]:
    """Check that *algorithm* can enforce *policies*; their script arguments.

    Raises ``ValueError`` naming the problem (unknown algorithm, a
    concurrency policy given to a rate limiter, a GCRA rate above one unit
    per microsecond) so configuration errors surface at startup.
    """
    spec = ALGORITHMS.get(algorithm)
    if spec is None:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {sorted(ALGORITHMS)}")
    concurrent = [p.name for p in policies if p.is_concurrency]
    if concurrent:
        raise ValueError(f"policies {concurrent} limit concurrency: use ConcurrencyLimiter")
    return tuple(n for p in policies for n in spec.args(p))


def _key_parts(policy: Policy, kind: str) -> tuple[str | int, ...]:
    parts: tuple[str | int, ...] = (policy.name, kind, policy.limit, policy.window_us)
    return (*parts, policy.burst) if policy.burst is not None else parts


def _resolve(
    max_requests: int | None, window_seconds: float | None, policies: PolicyLike | None
) -> tuple[Policy, ...]:
    if policies is not None:
        if max_requests is not None or window_seconds is not None:
            raise ValueError("give either max_requests/window_seconds or policies, not both")
        return as_policies(policies)
    if max_requests is None or window_seconds is None:
        raise ValueError(
            "a limiter needs max_requests and window_seconds "
            "(RateLimiter(redis, max_requests=3, window_seconds=1)) or policies='10/second'"
        )
    return (Policy(max_requests, window_seconds),)


class RateLimiter(_Limiter):
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

    Keys live under ``<prefix>:ratelimit:{<identifier>}:...`` (prefix from
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
    ) -> None:
        resolved = _resolve(max_requests, window_seconds, policies)
        args = validate_policies(resolved, algorithm)
        super().__init__(redis, resolved, algorithm, failure_mode)
        self.algorithm = algorithm
        self._script = ALGORITHMS[algorithm].script
        # Encoded once per limiter, not per call; is_allowed's whole argument list is constant.
        self._args = tuple(str(n).encode() for n in args)
        self._check_args = (b"1", _CHARGE_BRIEF, *self._args)

    @traced("ratelimit.check", attrs=_span_attrs, result=_span_outcome)
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

    @traced("ratelimit.check", attrs=_span_attrs, result=_span_outcome)
    async def hit(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Charge *cost* units to every policy if all admit them; the state of each policy.

        All-or-nothing and atomic in one ``EVALSHA`` (a refusal charges no
        policy). ``cost=0`` reads without charging. Keys written get a TTL
        (see the class docstring). Cancelled mid-call, the charge may or may
        not have happened. Redis down: a ``degraded`` allowed decision in
        fail-open mode, ``RedisUnavailable`` in fail-closed mode.
        """
        reply = await self._run(
            self._script, self.keys_for(identifier), (self._cost(cost), _CHARGE, *self._args)
        )
        return self._decision(reply, identifier, cost)

    async def peek(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Would *cost* units be admitted now? Charges nothing; otherwise like ``hit``.

        (``sliding_log`` drops expired entries while looking, which changes no decision.)
        """
        reply = await self._run(
            self._script, self.keys_for(identifier), (self._cost(cost), _PEEK, *self._args)
        )
        return self._decision(reply, identifier, cost)

    async def enforce(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """``hit``, raising ``RateLimitExceeded`` (429, ``violated-policies``) when refused."""
        decision = await self.hit(identifier, cost)
        decision.raise_for_limit()
        return decision

    def __repr__(self) -> str:
        return f"RateLimiter({'; '.join(map(str, self.policies))}, algorithm={self.algorithm!r})"


class ConcurrencyLimiter(_Limiter):
    """Caps how many requests of an identifier are in flight at once.

    Args:
        redis: any ``redis.asyncio`` client, fakeredis or ``RedisCluster``.
        max_concurrent: one policy (``"<n>-concurrent"``), or
        policies: ``"4 concurrent"`` or ``Policy(4, unit="concurrent-requests")``s.
        lease_seconds: how long an unreleased lease holds its slot (a worker
            that dies mid-request frees its slots after this long). Requests
            that run longer than this stop being counted.
        retry_after: the ``Retry-After`` hint (seconds) for refused requests.
        failure_mode: as for ``RateLimiter``.

    The lease set of each identifier expires with its longest lease.
    """

    __slots__ = ("_lease_us", "_limits", "retry_hint")

    def __init__(
        self,
        redis: AnyRedis,
        max_concurrent: int | None = None,
        *,
        policies: PolicyLike | None = None,
        lease_seconds: float = 60.0,
        retry_after: float = 1.0,
        failure_mode: FailureMode | None = None,
    ) -> None:
        if policies is None:
            if max_concurrent is None:
                raise ValueError("a ConcurrencyLimiter needs max_concurrent or policies")
            resolved: tuple[Policy, ...] = (Policy(max_concurrent, unit="concurrent-requests"),)
        elif max_concurrent is not None:
            raise ValueError("give either max_concurrent or policies, not both")
        else:
            resolved = as_policies(policies)
        rates = [p.name for p in resolved if not p.is_concurrency]
        if rates:
            raise ValueError(f"policies {rates} are rates, not concurrency: use RateLimiter")
        if not lease_seconds > 0.001:
            raise ValueError("lease_seconds must be more than 1 ms")
        super().__init__(redis, resolved, "concurrency", failure_mode)
        self._lease_us = str(round(lease_seconds * _US)).encode()
        self._limits = tuple(p.limit for p in resolved)
        self.retry_hint = retry_after

    @traced("ratelimit.check", attrs=_span_attrs, result=_span_outcome)
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
            _CONCURRENCY,
            self.keys_for(identifier),
            (self._cost(cost), _CHARGE, lease, self._lease_us, *self._limits),
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
            _CONCURRENCY,
            self.keys_for(decision.identifier),
            (self._cost(decision.cost), _RELEASE, decision.lease, self._lease_us, *self._limits),
        )
        return bool(reply and reply[0] > 0)

    async def peek(self, identifier: str | bytes | int, cost: int = 1) -> RateLimitDecision:
        """Would *cost* slots be granted now? Takes none (expired leases are dropped)."""
        reply = await self._run(
            _CONCURRENCY,
            self.keys_for(identifier),
            (self._cost(cost), _PEEK, b"-", self._lease_us, *self._limits),
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
