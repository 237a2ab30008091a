"""What the store hands back: a session's record, or the outcome of a write."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, Field

from app.core.memo import BoundedMemo

__all__ = ["SessionRecord", "WriteResult", "hash_of", "new_record", "time_of"]


def hash_of(flat: Sequence[Any]) -> dict[Any, Any]:
    """The fields of a hash from a flat ``[name, value, ...]`` reply (ValueError when odd)."""
    items = iter(flat)
    return dict(zip(items, items, strict=True))


_TIMES: BoundedMemo[Any, dt.datetime] = BoundedMemo(4096)
_times = _TIMES.get


def time_of(ms: Any) -> dt.datetime:
    """The UTC datetime of a millisecond timestamp (int, or the digits as bytes or text)."""
    # Every load turns the same few stored timestamps (a session's created_at and
    # expires_at never change) into datetimes; datetimes are immutable, so they are shared.
    found = _times(ms)
    if found is None:
        found = _TIMES.put(ms, dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC))
    return found


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


_FIELDS: Final = tuple(SessionRecord.model_fields)
_set = object.__setattr__


def new_record(
    session_id: str,
    unique_key: str,
    client_ip: str | None,
    locked: bool,
    created_at: dt.datetime,
    modified_at: dt.datetime,
    expires_at: dt.datetime,
    version: int,
    subject: str | None,
    data: dict[str, Any],
) -> SessionRecord:
    """``SessionRecord.model_construct`` with every field given (trusted values), at a fifth of its cost.

    The same instance: the fields in declaration order, every one marked as set,
    no extra or private state. Every load builds one, so the generic loop over
    the fields' aliases and defaults is skipped.
    """
    record = SessionRecord.__new__(SessionRecord)
    _set(
        record,
        "__dict__",
        {
            "id": session_id,
            "unique_key": unique_key,
            "client_ip": client_ip,
            "locked": locked,
            "created_at": created_at,
            "modified_at": modified_at,
            "expires_at": expires_at,
            "version": version,
            "subject": subject,
            "data": data,
        },
    )
    _set(record, "__pydantic_fields_set__", set(_FIELDS))
    _set(record, "__pydantic_extra__", None)
    _set(record, "__pydantic_private__", None)
    return record


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a write: the session's id (new after a regeneration) and version."""

    id: str
    version: int
    modified_at: dt.datetime
