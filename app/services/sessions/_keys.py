"""The Redis keys of a store's sessions: record, moved marker, tombstone, subject index.

A session ``<family>.<token>`` lives at ``<prefix>:<namespace>:{<family>}:<token>``;
its moved marker and tombstone sit in sibling namespaces under the same hash
tag, so one script can touch all three on Redis Cluster.
"""

from __future__ import annotations

from app.core.guard import as_text
from app.core.keys import KeySpace, digest
from app.services.sessions._ids import is_session_id

__all__ = ["SessionKeys"]


class SessionKeys:
    """Key names under one key space (the store's namespace); every method is pure string work."""

    __slots__ = ("_gone_root", "_index", "_moved_root", "_record_root", "records", "root")

    def __init__(self, records: KeySpace) -> None:
        namespace = records.service
        self.records = records
        self._index = records.child(f"{namespace}.subject")
        self.root = records.root
        # Ids match _ID, whose alphabet escape() leaves untouched, so these f-string keys are
        # exactly KeySpace.tagged(family, token) without re-escaping on every request.
        self._record_root = self.root + "{"
        self._moved_root = records.child(f"{namespace}.moved").root + "{"
        self._gone_root = records.child(f"{namespace}.gone").root + "{"

    def record(self, family: str, token: str) -> str:
        return f"{self._record_root}{family}}}:{token}"

    def moved(self, family: str, token: str) -> str:
        return f"{self._moved_root}{family}}}:{token}"

    def gone(self, family: str, token: str) -> str:
        return f"{self._gone_root}{family}}}:{token}"

    def index(self, subject: str) -> str:
        return self._index.tagged(digest(subject))

    def id_of(self, key: bytes | str) -> str | None:
        """The session id a record key names, or None for any other key."""
        rest = as_text(key)[len(self.root) :]
        if not rest.startswith("{"):
            return None
        family, _, token = rest[1:].partition("}:")
        session_id = f"{family}.{token}"
        return session_id if is_session_id(session_id) else None
