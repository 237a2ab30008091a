"""The rate-limit algorithms: one Lua script each, and the two numbers it needs per policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from app.core.errors import ConfigurationError
from app.core.scripts import Script
from app.services.rate_limit._policy import Policy

__all__ = ["ALGORITHMS", "CONCURRENCY", "Algorithm", "AlgorithmSpec", "validate_policies"]

Algorithm = Literal["gcra", "sliding_counter", "sliding_log", "fixed_window"]


def _load(name: str) -> Script:
    return Script.from_package("app.services.rate_limit", f"lua/ratelimit_{name}.lua")


def _gcra_args(policy: Policy) -> tuple[int, int]:
    interval = round(policy.window_us / policy.limit)
    if interval < 1:
        raise ConfigurationError(
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


CONCURRENCY = _load("concurrency")
"""The script of ``ConcurrencyLimiter``: leases in flight, not a rate."""


def validate_policies(policies: Sequence[Policy], algorithm: str) -> tuple[int, ...]:
    """Check that *algorithm* can enforce *policies*; their script arguments.

    Raises ``ConfigurationError`` (a ``ValueError``) naming the problem (unknown algorithm, a
    concurrency policy given to a rate limiter, a GCRA rate above one unit
    per microsecond) so configuration errors surface at startup.
    """
    spec = ALGORITHMS.get(algorithm)
    if spec is None:
        raise ConfigurationError(
            f"unknown algorithm {algorithm!r}: choose one of {sorted(ALGORITHMS)}"
        )
    concurrent = [p.name for p in policies if p.is_concurrency]
    if concurrent:
        raise ConfigurationError(f"policies {concurrent} limit concurrency: use ConcurrencyLimiter")
    return tuple(n for p in policies for n in spec.args(p))
