"""Session ids: ``<family>.<token>``, a 128-bit random token inside a fixed family."""

from __future__ import annotations

import re
import secrets

__all__ = ["is_session_id", "new_session_id", "split_id"]

_ID = re.compile(r"^([A-Za-z0-9_-]{8})\.([A-Za-z0-9_-]{22})$")


def new_session_id(family: str | None = None) -> str:
    """A fresh id ``<family>.<token>``: a 128-bit random token, in a new or given family."""
    return f"{family or secrets.token_urlsafe(6)}.{secrets.token_urlsafe(16)}"


def is_session_id(value: str) -> bool:
    """True when *value* has the shape of an id made by ``new_session_id``."""
    return _ID.match(value) is not None


def split_id(session_id: str) -> tuple[str, str] | None:
    """``(family, token)`` of a well-formed id, else None."""
    match = _ID.match(session_id)
    return (match[1], match[2]) if match else None
