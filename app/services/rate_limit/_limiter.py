"""What every limiter shares: policies, precomputed keys and arguments, the failure mode."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from app.core.config import FailureMode, get_settings
from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.guard import FailOpen, Guard
from app.core.keys import KeySpace, escape
from app.core.redis import AnyRedis
from app.core.scripts import Script, ScriptArg
from app.core.telemetry import outcome
from app.services.rate_limit._decision import RateLimitDecision, RateLimitResult
from app.services.rate_limit._policy import Policy

__all__ = [
    "CHARGE",
    "CHARGE_BRIEF",
    "PEEK",
    "RELEASE",
    "Limiter",
    "span_attrs",
    "span_outcome",
]

log = logging.getLogger("app.rate_limit")

_SERVICE = "ratelimit"
# The scripts' modes: charge; look without charging; give back a lease; charge, answer yes/no.
CHARGE, PEEK, RELEASE, CHARGE_BRIEF = b"1", b"0", b"-1", b"2"
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


def span_attrs(limiter: Limiter, *args: Any, **kwargs: Any) -> dict[str, str]:
    return {"toolkit.ratelimit.policy": ",".join(p.name for p in limiter.policies)}


def span_outcome(decision: bool | RateLimitDecision) -> str:
    allowed = decision if isinstance(decision, bool) else decision.allowed
    return "allowed" if allowed else "rejected"


class Limiter:
    """Shared plumbing: policies, precomputed keys and arguments, failure mode."""

    __slots__ = (
        "_fail_open",
        "_full",
        "_guard",
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
        namespace: str = _SERVICE,
    ) -> None:
        self.redis = redis
        self.policies = policies
        # A command Redis refuses (a script error, WRONGTYPE) is treated like an outage, as
        # it always was here: fail-open allows the request, fail-closed answers 503.
        self._guard = Guard(
            redis,
            f"rate limit {', '.join(p.name for p in policies)!r}",
            refused=RedisUnavailable,
        )
        self._fail_open = FailOpen(
            self._guard,
            log,
            enabled=(failure_mode or get_settings().rate_limit_failure_mode) == "open",
            fallback="allowing requests without counting them",
        )
        self._root = KeySpace.of(namespace).root
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
            raise ConfigurationError(f"cost must be an integer >= 0, got {cost!r}")
        if cost > self._max_cost:
            raise ConfigurationError(
                f"cost {cost} exceeds the capacity of a policy ({self._max_cost}); such a "
                "request could never be admitted"
            )
        return _COSTS[cost] if cost < len(_COSTS) else str(cost).encode()

    async def _run(self, script: Script, keys: list[str], args: Sequence[ScriptArg]) -> Any:
        """Run *script*; its reply, or None when Redis is unavailable and the mode is fail-open."""
        try:
            with self._guard:
                return await script(self.redis, keys, args)
        except RedisUnavailable as exc:
            self._fail_open.failed(exc)  # counts, logs once per change; re-raises if fail-closed
            outcome("degraded", exc)
            return None

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
        with self._guard:
            await self.redis.unlink(*self.keys_for(identifier))


def _key_parts(policy: Policy, kind: str) -> tuple[str | int, ...]:
    parts: tuple[str | int, ...] = (policy.name, kind, policy.limit, policy.window_us)
    return (*parts, policy.burst) if policy.burst is not None else parts
