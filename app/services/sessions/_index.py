"""The per-subject index of sessions: a set of ids, so a user's sessions can be revoked.

It is written *before* a record names its subject, so it may hold extra ids
(skipped and pruned by its readers) but never misses one. Its TTL is the
absolute session lifetime plus a margin, refreshed on each add.
"""

from __future__ import annotations

import logging

from app.core.errors import ToolkitError
from app.core.guard import Guard, as_text
from app.core.redis import AnyRedis
from app.services.sessions._keys import SessionKeys

__all__ = ["SubjectIndex"]

log = logging.getLogger("app.sessions")

_INDEX_MARGIN_MS = 60_000


class SubjectIndex:
    """Adds, drops and lists the session ids of a subject (one round trip each)."""

    __slots__ = ("_guard", "_keys", "_ttl_ms", "redis")

    def __init__(self, redis: AnyRedis, keys: SessionKeys, guard: Guard, absolute_ms: int) -> None:
        self.redis = redis
        self._keys = keys
        self._guard = guard
        self._ttl_ms = absolute_ms + _INDEX_MARGIN_MS

    async def add(self, subject: str, session_id: str) -> None:
        key = self._keys.index(subject)
        with self._guard:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(key, session_id)
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()

    async def drop(self, subject: str, session_id: str) -> None:
        # Best effort after a successful write: a stale member is harmless (pruned later,
        # and the index expires), so a failure here must not turn success into an error.
        try:
            with self._guard:
                await self.redis.srem(self._keys.index(subject), session_id)
        except ToolkitError as exc:
            log.debug("could not prune session index of %r: %s", subject, exc)

    async def members(self, subject: str) -> list[str]:
        """The ids indexed under *subject* (live or not), in no particular order."""
        with self._guard:
            members = await self.redis.smembers(self._keys.index(subject))
        return [as_text(m) for m in members]

    async def remove(self, subject: str, ids: list[str]) -> None:
        """Take *ids* (at least one) out of *subject*'s index."""
        with self._guard:
            await self.redis.srem(self._keys.index(subject), *ids)
