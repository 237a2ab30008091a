"""What the store hands back: a session's record, or the outcome of a write."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["SessionRecord", "WriteResult", "pairs", "time_of"]


def pairs(flat: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
    return zip(flat[::2], flat[1::2], strict=True)


def time_of(ms: Any) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC)


class SessionRecord(BaseModel):
    """One stored session, as web2py's ``redis_session`` keeps it (plus version and deadline).

    ``unique_key`` is a random secret of the record (new on every regeneration),
    usable as a per-session CSRF seed. ``locked`` is an application flag the
    store keeps but does not interpret. Times are UTC, from the Redis clock.
    """

    id: str
    unique_key: str
    client_ip: str | None = None
    locked: bool = False
    created_at: dt.datetime
    modified_at: dt.datetime
    expires_at: dt.datetime = Field(description="Absolute deadline (creation + absolute_ttl).")
    version: int = Field(description="Bumped by every write that changes the record.")
    subject: str | None = Field(default=None, description="Value of the store's subject_key.")
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a write: the session's id (new after a regeneration) and version."""

    id: str
    version: int
    modified_at: dt.datetime
