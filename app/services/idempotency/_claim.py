"""What a claim of an idempotency key found: new, in flight, completed or mismatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["OUTCOMES", "STATUS", "Claim", "ClaimStatus"]

ClaimStatus = Literal["new", "in_flight", "completed", "mismatch"]

STATUS: Final[dict[int, ClaimStatus]] = {
    0: "new",
    1: "in_flight",
    2: "completed",
    3: "mismatch",
}
"""The claim script's status code -> the status it means."""

OUTCOMES: Final = {
    "new": "new",
    "completed": "replay",
    "in_flight": "conflict",
    "mismatch": "mismatch",
}
"""A claim's status -> the outcome its telemetry span reports."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` found.

    ``status`` is ``"new"`` (you own the key: do the work, then ``complete`` or
    ``release`` with ``token``), ``"in_flight"`` (someone else is doing it;
    ``lease_remaining`` seconds are left on their lease), ``"completed"``
    (``result`` is what they stored) or ``"mismatch"`` (the key was used with
    another fingerprint).
    """

    status: ClaimStatus
    key: str
    token: str | None = None
    result: Any = None
    lease_remaining: float | None = None

    @property
    def is_new(self) -> bool:
        return self.status == "new"
