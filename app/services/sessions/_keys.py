"""The Redis keys of a store's sessions: record, moved marker, tombstone, subject index.

A session ``<family>.<token>`` lives at ``<prefix>:<namespace>:{<family>}:<token>``;
its moved marker and tombstone sit in sibling namespaces under the same hash
tag, so one script can touch all three on Redis Cluster.
"""

from __future__ import annotations

from app.core.keys import KeySpace, digest
from app.services.sessions._ids import is_session_id
from app.services.sessions._record import text

__all__ = ["SessionKeys"]


class SessionKeys:
    """Key names for one ``(prefix, namespace)``; every method is pure string work."""

    __slots__ = ("_gone_root", "_index", "_moved_root", "_record_root", "records", "root")

    def __init__(self, prefix: str, namespace: str) -> None:
        self.records = KeySpace(prefix, namespace)
        self._index = KeySpace(prefix, f"{namespace}.subject")
        self.root = self.records.root
        # Ids match _ID, whose alphabet escape() leaves untouched, so these f-string keys are
        # exactly KeySpace.tagged(family, token) without re-escaping on every request.
        self._record_root = self.root + "{"
        self._moved_root = KeySpace(prefix, f"{namespace}.moved").root + "{"
        self._gone_root = KeySpace(prefix, f"{namespace}.gone").root + "{"

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
        rest = text(key)[len(self.root) :]
        if not rest.startswith("{"):
            return None
        family, _, token = rest[1:].partition("}:")
        session_id = f"{family}.{token}"
        return session_id if is_session_id(session_id) else None
