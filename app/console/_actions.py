"""What the console's POST actions do to Redis (each one bounded: one script or a few calls).

Every function returns a short outcome text for the operator and the audit
stream; none returns Redis error text. Redis failures propagate
(``RedisUnavailable`` / ``RedisError``) and become a 503 page.
"""

from __future__ import annotations

from typing import Any

from app.console._scan import text
from app.core.keys import KeySpace
from app.core.redis import AnyRedis
from app.core.scripts import Script
from app.services.cache import CacheService
from app.services.rate_limit import ConcurrencyLimiter, RateLimiter
from app.services.sessions import SessionStore
from app.services.streams import stream_keys, trim_stream

__all__ = [
    "delete_cache_key",
    "delete_dead_letter",
    "force_release_lock",
    "invalidate_cache_tag",
    "replay_dead_letter",
    "reset_rate_limit",
    "revoke_session",
    "revoke_user_sessions",
    "trim",
]

_REPLAY = Script.from_package("app.console", "lua/console_replay.lua")
# The lock's own release script (compare-and-delete, then wake one waiter), called with the
# holder's token the operator confirmed and without the release receipt (KEYS[5]): the
# evicted holder's own release() must still report that it no longer owned the lock.
_RELEASE = Script.from_package("app.services.locks", "lua/lock_release.lua")
_WAKE_TTL_MS = 10_000


async def replay_dead_letter(client: AnyRedis, stream: str, dead_id: str) -> str:
    """Move dead letter *dead_id* back into *stream* as a new entry (atomic, one script)."""
    keys = stream_keys(stream)
    status, new_id = await _REPLAY(client, keys=[keys.stream, keys.dead_letter], args=[dead_id])
    if int(status) != 1:
        return f"dead letter {dead_id} not found (already replayed or deleted)"
    return f"dead letter {dead_id} replayed as {text(new_id)}"


async def delete_dead_letter(client: AnyRedis, stream: str, dead_id: str) -> str:
    """Delete dead letter *dead_id* (one ``XDEL``)."""
    removed = int(await client.xdel(stream_keys(stream).dead_letter, dead_id))
    return f"dead letter {dead_id} deleted" if removed else f"dead letter {dead_id} not found"


async def trim(client: AnyRedis, stream: str, maxlen: int) -> str:
    """Trim *stream* to *maxlen* entries, never past what a consumer group still needs."""
    removed = await trim_stream(client, stream, maxlen=maxlen, keep_unacknowledged=True)
    return f"stream {stream!r} trimmed: {removed} entries removed"


async def force_release_lock(client: AnyRedis, prefix: str, name: str, token: str) -> str:
    """Release lock *name* if it is still held with *token* (the holder the operator saw).

    Compare-and-delete: if the lock changed hands since the page was shown,
    nothing is released. The release wakes one waiter, as a normal release does.
    """
    key = KeySpace(prefix, "lock").tagged(name)
    keys = (key, key + ":wake", key + ":queue", key + ":queue-heartbeats")
    released = int(await _RELEASE(client, keys=keys, args=(token, _WAKE_TTL_MS, 0)))
    if released:
        return f"lock {name!r} force-released"
    return f"lock {name!r} was not held by that owner any more: nothing released"


async def reset_rate_limit(limiter: RateLimiter | ConcurrencyLimiter, identity: str) -> str:
    """Forget everything counted for *identity* by *limiter* (one ``UNLINK``)."""
    await limiter.reset(identity)
    return f"rate limit state of {identity!r} reset"


async def invalidate_cache_tag(service: CacheService, tag: str) -> str:
    """Remove every entry carrying *tag* (``CacheService.invalidate_tags``)."""
    removed = await service.invalidate_tags(tag)
    return f"tag {tag!r} invalidated: {removed} entries removed"


async def delete_cache_key(service: CacheService, key: str) -> str:
    """Delete cache entry *key* (``CacheService.delete``)."""
    removed = await service.delete(key)
    return f"key {key!r} deleted" if removed else f"key {key!r} not found"


async def revoke_session(store: SessionStore, session_id: str) -> str:
    """Delete one session (its cookie is refused from now on)."""
    deleted = await store.delete(session_id)
    return "session revoked" if deleted else "session not found"


async def revoke_user_sessions(store: SessionStore, user: str) -> str:
    """Delete every session of *user* (``SessionStore.delete_all_for``)."""
    count = await store.delete_all_for(user)
    return f"{count} sessions of {user!r} revoked"


def describe(value: Any) -> str:
    """A short, single-line rendering of *value* for pages and the audit stream."""
    shown = text(value).replace("\n", " ")
    return shown if len(shown) <= 200 else shown[:199] + "…"
