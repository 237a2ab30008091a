"""Rate-limit policies: ``Policy``, parsed from text or built in code.

The text syntax is documented in the package docstring (``app.services.rate_limit``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from app.core.errors import ConfigurationError
from app.core.guard import as_seconds

__all__ = [
    "Policy",
    "PolicyLike",
    "QuotaUnit",
    "as_policies",
    "parse_policies",
]

QuotaUnit = Literal["requests", "concurrent-requests"]
"""IETF ``qu`` values this toolkit emits (``requests`` is the default)."""

_NAME = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")  # no "/": it separates limit and window
_UNIT_SECONDS: dict[str, float] = {
    "ms": 0.001,
    "millisecond": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "week": 604800.0,
}
_LABELS = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day", 604800.0: "week"}
_RATE = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9_.:+-]{1,64})\s*=\s*)?"
    r"(?P<limit>\d+)\s*(?:/|\s+per\s+)\s*"
    r"(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[A-Za-z]+)$",
    re.IGNORECASE,
)
_CONCURRENT = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9_.:+-]{1,64})\s*=\s*)?"
    r"(?P<limit>\d+)\s+concurrent(?:\s+requests?)?$",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"[;,]")


def _unit_seconds(unit: str) -> float | None:
    unit = unit.lower()
    if unit in _UNIT_SECONDS:
        return _UNIT_SECONDS[unit]
    if unit.endswith("s") and unit[:-1] in _UNIT_SECONDS:
        return _UNIT_SECONDS[unit[:-1]]
    return None


def _window_label(window: float) -> str:
    if window in _LABELS:
        return _LABELS[window]
    if window < 1:
        return f"{window * 1000:g}ms"
    return f"{window:g}s"


@dataclass(frozen=True, slots=True)
class Policy:
    """One quota: at most ``limit`` units per ``window`` seconds.

    Args:
        limit: the quota (``q`` in ``RateLimit-Policy``), at least 1.
        window: seconds (sub-second allowed, at least 1 ms); ``None`` for a
            concurrency policy (``unit="concurrent-requests"``).
        name: reported in headers and ``violated-policies``; default derived
            from the numbers (``"10-per-second"``). ``[A-Za-z0-9_.:+/-]{1,64}``.
        burst: GCRA only: how many units may arrive at once (default
            ``limit``); the sustained rate stays ``limit / window``.
        unit: ``"requests"`` or ``"concurrent-requests"``.

    An invalid field raises ``ConfigurationError`` (a ``ValueError``) naming it.
    """

    limit: int
    window: float | None = None
    name: str = field(default="")
    burst: int | None = None
    unit: QuotaUnit = "requests"

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"a policy limit must be an integer >= 1, got {self.limit!r}")
        if self.unit == "concurrent-requests":
            if self.window is not None:
                raise ConfigurationError(
                    "a concurrency policy has no window (leases expire instead)"
                )
            if self.burst is not None:
                raise ConfigurationError("burst applies to rate policies only")
        else:
            if self.window is None:
                raise ConfigurationError(f"policy {self.limit} per ? needs a window in seconds")
            window = as_seconds(self.window, "a policy window", allow_zero=True)
            if window < 0.001:
                raise ConfigurationError(
                    f"a policy window must be at least 0.001 s, got {self.window!r}"
                )
            object.__setattr__(self, "window", window)
            if self.burst is not None and (
                isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
            ):
                raise ConfigurationError(f"burst must be an integer >= 1, got {self.burst!r}")
        if not self.name:
            default = (
                f"{self.limit}-concurrent"
                if self.window is None
                else f"{self.limit}-per-{_window_label(self.window)}"
            )
            object.__setattr__(self, "name", default)
        elif not _NAME.match(self.name):
            raise ConfigurationError(
                f"policy name {self.name!r} must match [A-Za-z0-9_.:+/-]{{1,64}}"
            )

    @classmethod
    def parse(cls, text: str) -> Policy:
        """One policy from text (``"10/second"``, ``"burst=5 per 10 seconds"``, ...)."""
        raw = text.strip()
        match = _RATE.match(raw)
        if match is not None:
            seconds = _unit_seconds(match["unit"])
            if seconds is None:
                raise ConfigurationError(
                    f"unknown time unit {match['unit']!r} in policy {text!r}: use ms, second, "
                    "minute, hour, day or week"
                )
            count = float(match["count"]) if match["count"] else 1.0
            return cls(int(match["limit"]), count * seconds, name=match["name"] or "")
        match = _CONCURRENT.match(raw)
        if match is not None:
            return cls(int(match["limit"]), name=match["name"] or "", unit="concurrent-requests")
        raise ConfigurationError(
            f"cannot parse rate-limit policy {text!r}: expected '<n>/<unit>', "
            "'<n> per <count> <unit>' or '<n> concurrent', optionally prefixed with 'name='"
        )

    @property
    def capacity(self) -> int:
        """The most units one call can ever be granted (``burst`` or ``limit``)."""
        return self.burst or self.limit

    @property
    def window_us(self) -> int:
        """The window in whole microseconds (0 for concurrency policies)."""
        return 0 if self.window is None else round(self.window * 1_000_000)

    @property
    def is_concurrency(self) -> bool:
        return self.unit == "concurrent-requests"

    def __str__(self) -> str:
        if self.window is None:
            return f"{self.name}={self.limit} concurrent"
        return f"{self.name}={self.limit} per {_seconds_text(self.window)} seconds"


def _seconds_text(window: float) -> str:
    """The window as the parser reads it back exactly: no exponent, no lost digits."""
    if window.is_integer():
        return str(int(window))
    text = repr(window)
    return text if "e" not in text else f"{window:.20f}".rstrip("0")


PolicyLike: TypeAlias = "str | Policy | Iterable[str | Policy]"
"""A policy string (possibly several, ``;``-separated), a ``Policy``, or a list of either."""


def parse_policies(text: str) -> tuple[Policy, ...]:
    """Every policy in *text* (``"10/second;1000/day"``).

    Raises ``ConfigurationError`` (a ``ValueError``) if there is none or one is malformed.
    """
    policies = tuple(Policy.parse(part) for part in _SPLIT.split(text) if part.strip())
    if not policies:
        raise ConfigurationError(f"no rate-limit policy in {text!r}")
    return policies


def as_policies(spec: PolicyLike) -> tuple[Policy, ...]:
    """Normalize *spec* to a non-empty tuple of policies with distinct names."""
    if isinstance(spec, Policy):
        policies: tuple[Policy, ...] = (spec,)
    elif isinstance(spec, str):
        policies = parse_policies(spec)
    else:
        items: list[Policy] = []
        for item in spec:
            items.extend(parse_policies(item) if isinstance(item, str) else (item,))
        policies = tuple(items)
    if not policies:
        raise ConfigurationError("at least one rate-limit policy is required")
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ConfigurationError(
            f"policy names must be distinct within one check, {duplicates} repeat: "
            "name them ('burst=10/second;daily=1000/day')"
        )
    return policies
