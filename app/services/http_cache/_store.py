"""``HttpResponseCache``: stored responses in Redis, looked up, stored and invalidated by Lua."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.core.errors import CodecError, RedisUnavailable
from app.core.guard import (
    REFUSED_FOR_NOW,
    Duration,
    FailOpen,
    Guard,
    as_seconds,
    as_text,
    to_ms,
)
from app.core.keys import KeySpace
from app.core.redis import AnyRedis, client_decodes_responses, unlink_matching
from app.core.scripts import Script, ScriptArg
from app.services.http_cache._entry import (
    BLOB_MAGIC,
    DEFAULT_MAX_BODY_SIZE,
    StoredResponse,
    decode_entry,
    encode_entry,
)
from app.services.http_cache._urls import url_digest_for

__all__ = ["HttpCacheStats", "HttpResponseCache", "Lookup", "StoreResult"]

log = logging.getLogger("app.http_cache")

_LOOKUP = Script.from_package("app.services.http_cache", "lua/http_cache_lookup.lua")
_STORE = Script.from_package("app.services.http_cache", "lua/http_cache_store.lua")
_INVALIDATE = Script.from_package("app.services.http_cache", "lua/http_cache_invalidate.lua")


@dataclass
class HttpCacheStats:
    """Counters of one cache (shared by the middleware instances given the same object)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    not_modified: int = 0
    stores: int = 0
    uncacheable: int = 0
    refused: int = 0
    refreshes: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the lookup found: Redis time, the URL's generation and Vary spec, the entry.

    ``generation`` is "" when nothing was stored for the URL; ``variant`` is the
    variant digest for ``spec``; ``leased`` says this caller must refresh the
    (stale) entry in the background.
    """

    now_ms: int
    generation: str
    spec: str
    variant: str
    entry: StoredResponse | None = None
    leased: bool = False


@dataclass(frozen=True, slots=True)
class StoreResult:
    """``stored`` is False when the URL was invalidated after the lookup (nothing written)."""

    stored: bool
    stored_at_ms: int
    last_modified: int


class HttpResponseCache:
    """Stored HTTP responses in Redis: lookup, store, invalidate (see the package docstring).

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` True or False;
            with True the blob is stored base64-encoded so values stay UTF-8).
        namespace: the key space service name (``<prefix>:<namespace>:...``).
        timeout: seconds (or a ``timedelta``) a lookup, store or invalidation
            may take before it counts as a Redis failure (None: the client's
            socket timeout bounds it; a tighter budget costs an event-loop
            timer per call).
        compress_threshold: zlib bodies larger than this (0: never).
        max_body_size: largest body stored and inflated.
        invalidation_window: seconds an invalidation is remembered at least, so
            a response computed before it (by a request slower than this at
            most) cannot be stored after it.
        stats: counters to update (shared between instances if given).

    A bad duration raises ``ConfigurationError`` here. Every Redis call goes
    through one ``Guard`` (the client's breaker): ``lookup`` and ``store``
    fail open, ``invalidate`` and ``clear`` raise (``RedisUnavailable``, or
    ``RedisCommandError`` when Redis refuses the command).
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        namespace: str = "httpcache",
        timeout: Duration | None = None,
        compress_threshold: int = 8192,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        invalidation_window: Duration = 60.0,
        stats: HttpCacheStats | None = None,
    ) -> None:
        self.redis = redis
        self.keys = KeySpace.of(namespace)
        self.timeout = None if timeout is None else as_seconds(timeout, "timeout")
        self.compress_threshold = compress_threshold
        self.max_body_size = max_body_size
        self.stats = stats if stats is not None else HttpCacheStats()
        self._root = self.keys.root
        self._text = client_decodes_responses(redis)
        window = as_seconds(invalidation_window, "invalidation_window", allow_zero=True)
        self._window_ms = max(1, to_ms(window))
        self._guard = Guard(redis, f"http cache {namespace!r}")
        # Logs a refused command or an unusable reply once per change (an outage is the
        # breaker's to log: see _run); never raises (fail-open, lookup and store only).
        self._fail_open = FailOpen(
            self._guard, log, fallback="serving without the cache", catch=(Exception,)
        )

    def _meta(self, url: str) -> str:
        return f"{self._root}{{{url}}}:m"

    def _entry(self, url: str, variant: str) -> str:
        return f"{self._root}{{{url}}}:e:{variant}"

    def _lease(self, url: str, variant: str) -> str:
        return f"{self._root}{{{url}}}:r:{variant}"

    async def _run(self, script: Script, keys: list[str], args: list[ScriptArg]) -> Any:
        """Run *script* under the guard and the timeout; None when it failed (fail-open)."""
        try:
            with self._guard:
                if self.timeout is None:
                    return await script(self.redis, keys, args)
                async with asyncio.timeout(self.timeout):
                    return await script(self.redis, keys, args)
        except RedisUnavailable as exc:
            self.stats.errors += 1
            # An outage is counted, not logged: the breaker logs it once per transition
            # (and the middleware's tests pin no line of ours). A refusal for now (OOM,
            # READONLY) leaves the breaker closed and silent, so it is ours to log.
            if isinstance(exc.__cause__, REFUSED_FOR_NOW):
                self._fail_open.failed(exc)
        except Exception as exc:  # refused (RedisCommandError), or an unreadable reply
            self.stats.errors += 1
            self._fail_open.failed(exc)
        return None

    async def lookup(
        self,
        url: str,
        variant_for: Callable[[str], str],
        spec_hint: str = "",
        *,
        lease_ms: int = 0,
    ) -> Lookup | None:
        """Find the stored response for a request: one round trip unless the URL's Vary changed.

        *url* is the ``url_digest``; ``variant_for(spec)`` gives the request's
        variant digest for a Vary spec; *spec_hint* is the spec to try first.
        With *lease_ms* > 0, a caller that finds the entry stale within its
        stale-while-revalidate window takes the refresh lease (``leased``) when
        no one holds it (the lease expires after *lease_ms*, so a caller
        cancelled after taking it only delays the next refresh). Read-only
        otherwise. Returns ``None`` when Redis is unavailable (fail-open); a
        corrupt entry reads as a miss.
        """
        spec = spec_hint
        variant = variant_for(spec)
        reply: Any = None
        for _ in range(2):
            reply = await self._run(
                _LOOKUP,
                [self._meta(url), self._entry(url, variant), self._lease(url, variant)],
                [spec, lease_ms],
            )
            if reply is None:
                return None
            if len(reply) == 1:
                return Lookup(int(reply[0]), "", spec, variant)
            found_spec = as_text(reply[1])
            if found_spec == spec:
                break
            spec = found_spec
            variant = variant_for(spec)
        else:  # the URL's Vary changed again between the two lookups: a miss
            return Lookup(int(reply[0]), as_text(reply[2]), spec, variant)
        now, generation = int(reply[0]), as_text(reply[2])
        if len(reply) < 11:
            return Lookup(now, generation, spec, variant)
        try:
            entry = self._decode(reply)
        except CodecError as exc:  # a miss: the next store replaces the entry
            self.stats.errors += 1
            self._fail_open.failed(exc)
            return Lookup(now, generation, spec, variant)
        return Lookup(now, generation, spec, variant, entry, bool(int(reply[10])))

    def _decode(self, reply: Sequence[Any]) -> StoredResponse:
        blob = reply[3]
        try:
            # Entries written through a decode_responses=True client are base64 text.
            if isinstance(blob, str) or not blob.startswith(BLOB_MAGIC):
                blob = base64.b64decode(blob, validate=True)
            status, headers, body, synthesized = decode_entry(
                blob, max_body_size=self.max_body_size
            )
            return StoredResponse(
                status=status,
                headers=headers,
                body=body,
                etag=as_text(reply[4]),
                last_modified=int(reply[5]),
                synthesized_lm=synthesized,
                stored_at_ms=int(reply[6]),
                fresh_ms=int(reply[7]),
                swr_ms=int(reply[8]),
                sie_ms=int(reply[9]),
            )
        except (binascii.Error, ValueError, TypeError) as exc:
            raise CodecError(f"stored HTTP response is malformed: {exc}") from exc

    async def store(
        self,
        url: str,
        variant: str,
        *,
        spec: str,
        generation: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        etag: str,
        last_modified: int | None,
        fresh_ms: int,
        swr_ms: int = 0,
        sie_ms: int = 0,
    ) -> StoreResult | None:
        """Store a response for one variant of *url*, atomically with the URL's meta.

        *generation* is the one the caller's lookup saw: when the URL was
        invalidated since, nothing is written (``stored=False``). The entry
        lives ``fresh_ms`` plus the longer stale window; the stored-at time is
        the Redis clock's. *last_modified* (epoch s) is the origin's, ``0`` for
        none, ``None`` to synthesize one (see ``http_cache_store.lua``). The
        refresh lease of the variant is released. Atomic: entry and meta are
        written by one script, so a cancelled call stored all or nothing.
        Returns ``None`` when Redis is unavailable or the response cannot be
        encoded (nothing stored).
        """
        try:
            blob = encode_entry(
                status,
                headers,
                body,
                synthesized_lm=last_modified is None,
                compress_threshold=self.compress_threshold,
            )
        except CodecError as exc:
            self.stats.uncacheable += 1
            log.debug("HTTP cache: response not stored: %s", exc)
            return None
        payload: bytes | str = base64.b64encode(blob).decode("ascii") if self._text else blob
        reply = await self._run(
            _STORE,
            [self._meta(url), self._entry(url, variant), self._lease(url, variant)],
            [
                spec,
                generation,
                secrets.token_hex(8),
                payload,
                etag,
                -1 if last_modified is None else last_modified,
                max(0, fresh_ms),
                max(0, swr_ms),
                max(0, sie_ms),
                self._window_ms,
            ],
        )
        if reply is None:
            return None
        result = StoreResult(bool(int(reply[0])), int(reply[1]), int(reply[2]))
        if result.stored:
            self.stats.stores += 1
        else:
            self.stats.refused += 1
        return result

    async def invalidate(self, url: str) -> bool:
        """Drop every stored variant of an absolute URL (all callers' entries), atomically.

        ``await cache.invalidate(str(request.url_for("get_item", item_id=1)))``.
        Query order does not matter; HEAD shares the GET entry. One script: a
        cancelled call invalidated everything or nothing. The invalidation is
        remembered for ``invalidation_window`` seconds at least (the meta hash's
        TTL). Returns whether a response had been stored since the last
        invalidation. Raises ``RedisUnavailable`` when Redis cannot be reached
        (``RedisCommandError`` when it refuses the script): the caller must know
        the old response may still be served.
        """
        return await self.invalidate_digest(url_digest_for(url))

    async def invalidate_digest(self, url: str) -> bool:
        """``invalidate`` for a ``url_digest`` the caller computed."""
        keys: list[str] = [self._meta(url)]
        args: list[ScriptArg] = [secrets.token_hex(8), self._window_ms]
        with self._guard:
            if self.timeout is None:
                reply = await _INVALIDATE(self.redis, keys, args)
            else:
                async with asyncio.timeout(self.timeout):
                    reply = await _INVALIDATE(self.redis, keys, args)
        return bool(int(reply))

    async def clear(self) -> int:
        """Delete every key of this namespace (SCAN + UNLINK on every primary); returns the count.

        Not atomic: responses stored during the walk may survive it. Raises
        ``RedisUnavailable`` when Redis cannot be reached (``RedisCommandError``
        when it refuses a command).
        """
        with self._guard:
            return await unlink_matching(self.redis, self.keys.pattern("*"))
