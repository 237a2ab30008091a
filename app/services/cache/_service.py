"""``CacheService``: the namespaced Redis cache (see the package docstring), and its defaults.

The service is a facade: it validates options, turns keys and TTLs into Redis
keys and milliseconds, and hands the work to its parts (``_reads``,
``_writes``, ``_invalidation``, ``_stampede``, ``_refresh``), which share one
``CacheCore``. Only the plain-hit read of ``get`` stays here: it is the hot
path, and a delegation would cost it a coroutine frame.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Literal, TypeVar, cast, overload

from app.core.codec import Codec, default_codec
from app.core.config import Settings, get_settings
from app.core.errors import CodecError, ConfigurationError, RedisUnavailable
from app.core.guard import Duration, as_seconds, to_ms
from app.core.keys import KeySpace
from app.core.redis import AnyRedis, client_decodes_responses, get_redis, is_cluster
from app.core.telemetry import from_self, hit_or_miss, traced
from app.services.cache import _registry
from app.services.cache._core import CacheCore
from app.services.cache._entries import EntryFormat
from app.services.cache._invalidation import CacheInvalidation
from app.services.cache._keys import KeyLayout
from app.services.cache._local import LocalCache
from app.services.cache._policy import (
    DEFAULT_TTL,
    TTL,
    CachePolicy,
    TagsArg,
    lifetimes,
    make_policy,
    to_seconds,
)
from app.services.cache._reads import CacheReads
from app.services.cache._refresh import Refresher
from app.services.cache._stampede import Flights
from app.services.cache._writes import CacheWrites

__all__ = ["CacheService", "get_cache", "set_default_cache"]

T = TypeVar("T")
D = TypeVar("D")

_NS: Final = {"toolkit.cache.namespace": "namespace"}  # span attribute -> CacheService attribute


def _codec(
    codec: Codec | None, compress_threshold: int | None, decodes: bool, settings: Settings
) -> Codec:
    """The service's codec, always text-safe (binary payloads base64'd) whatever the client,
    so clients with and without decode_responses can share a namespace."""
    if codec is not None and compress_threshold is not None:
        raise ConfigurationError("pass either codec or compress_threshold, not both")
    if codec is None:
        codec = (
            default_codec(decodes)
            if compress_threshold is None
            else Codec(
                compress_threshold=compress_threshold,
                max_payload_bytes=settings.codec_max_payload_bytes,
            )
        )
    return codec.with_text_safe(True)


# Over DESIGN.md's ~400 lines by a few, on purpose: CacheService is the public door of
# the cache, so every verb keeps its behaviour docstring here (158 of its lines); the
# work is done by the collaborators in _reads, _writes, _stampede, _invalidation, ...
class CacheService:
    """A namespaced Redis cache with stampede control, tags and an optional local tier.

    Args:
        redis: any ``redis.asyncio`` client (standalone, Sentinel, Cluster) or
            fakeredis, with ``decode_responses`` True or False.
        namespace: keys live under ``<REDIS_KEY_PREFIX>:<namespace>:``; ``clear``
            and ``invalidate`` never leave it.
        default_ttl: lifetime when a call passes ``ttl=None`` (default 1 hour).
        codec: serializer (default: the settings' JSON codec). Always made
            text-safe (binary payloads base64'd), so clients with and without
            ``decode_responses`` can read each other's entries.
        compress_threshold: compress payloads above this many bytes (a new JSON
            codec; exclusive with ``codec``).
        local: a ``LocalCache`` to put in front of Redis (kept coherent over pub/sub).
        failure_mode: ``"open"`` or ``"closed"``; default ``cache_failure_mode``.
        broadcast: publish invalidations for other processes' local tiers (on by
            default; every writer of a namespace read through local tiers must keep it on).
        shards: how many hash-tag shards (Cluster slots) the namespace spreads
            over: default 1 on standalone and Sentinel (every tag invalidation is
            then one atomic script), 16 on Cluster.
        lease: seconds a computing caller holds its lease (extended while it runs).
        wait_timeout: seconds a caller waits for another's computation before
            computing itself (0: never waits).

    Durations are seconds or a ``timedelta``; a bad one (zero, negative, NaN,
    not a number) raises ``ConfigurationError`` here, not on the first call.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        namespace: str = "cache",
        default_ttl: TTL | None = None,
        codec: Codec | None = None,
        compress_threshold: int | None = None,
        local: LocalCache | None = None,
        failure_mode: Literal["open", "closed"] | None = None,
        broadcast: bool = True,
        shards: int | None = None,
        lease: Duration = 10.0,
        wait_timeout: Duration = 10.0,
    ) -> None:
        settings = get_settings()
        self.redis = redis
        self._redis: Any = redis
        self.keys = KeySpace.of(namespace)
        self.namespace = namespace
        decodes = client_decodes_responses(redis)
        self.codec = _codec(codec, compress_threshold, decodes, settings)
        self.default_ttl = (
            DEFAULT_TTL if default_ttl is None else to_seconds(default_ttl, "default_ttl")
        )
        mode = failure_mode or settings.cache_failure_mode
        if mode not in ("open", "closed"):
            raise ConfigurationError(f"failure_mode must be 'open' or 'closed', got {mode!r}")
        self.failure_mode = mode
        cluster = is_cluster(redis)
        root = self.keys.root
        layout = KeyLayout(root, namespace, (16 if cluster else 1) if shards is None else shards)
        self._lease_ms = to_ms(as_seconds(lease, "lease"))
        self.wait_timeout = as_seconds(wait_timeout, "wait_timeout", allow_zero=True)
        self._policies: dict[tuple[Any, ...], CachePolicy] = {}
        self.local = local
        if local is not None and not broadcast:
            raise ConfigurationError("a local tier needs broadcast=True to stay coherent")
        entries = EntryFormat(self.codec, decodes)
        core = self._core = CacheCore(
            redis,
            namespace=namespace,
            layout=layout,
            entries=entries,
            fail_open=mode == "open",
            cluster=cluster,
            channel=f"{root}invalidations" if broadcast else "",
            sender=os.urandom(6).hex(),
            local=local,
        )
        self._listener = core.listener
        # The plain-hit path (``get`` and ``@cached``) reads these without a detour.
        self._guard = core.guard
        self._stats = core.stats
        self._memo = layout.memo
        self._marker = entries.marker
        self._decode = entries.decode
        self._reads = CacheReads(core)
        self._writes = CacheWrites(core)
        self._invalidation = CacheInvalidation(core)
        self._refresher = Refresher(core, self._writes)
        self._flights = Flights(core, self._writes, self._refresher)

    def __repr__(self) -> str:
        return f"CacheService(namespace={self.namespace!r}, local={self.local is not None})"

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, timeout: float = 5.0) -> bool:
        """Subscribe the local tier's invalidation listener and wait until it serves.

        Optional: the first call that needs the local tier starts it, and until
        the subscription is confirmed reads go to Redis. Returns False when the
        subscription was not confirmed within *timeout* (Redis down): the
        service still works, without its local tier, and keeps retrying.
        """
        if self._listener is None:
            return True
        return await self._listener.wait_active(timeout)

    async def aclose(self) -> None:
        """Stop the listener and cancel background refreshes (the client stays open)."""
        if self._listener is not None:
            await self._listener.aclose()
        await self._refresher.cancel_all()
        _registry.forget(self.redis, self.namespace, self)

    async def __aenter__(self) -> CacheService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_idle(self) -> None:
        """Wait until every background refresh started so far has finished."""
        await self._refresher.wait_idle()

    # -- keys and policies ---------------------------------------------------------

    def redis_key(self, key: str) -> str:
        """The Redis key that holds *key* (escaped, namespaced, sharded)."""
        return self._core.layout.redis_key(key)

    @staticmethod
    def literal(text: str) -> str:
        """*text* with ``\\`` and ``*`` escaped, to embed user input in an ``invalidate`` pattern."""
        return text.replace("\\", "\\\\").replace("*", "\\*")

    def policy(
        self,
        ttl: TTL | None = None,
        *,
        stale_ttl: TTL | None = None,
        early_refresh: float = 0.0,
        lease: Duration | None = None,
        wait_timeout: Duration | None = None,
    ) -> CachePolicy:
        """The precomputed policy for these options (cached per distinct options)."""
        memo_key = (ttl, stale_ttl, early_refresh, lease, wait_timeout)
        found = self._policies.get(memo_key)
        if found is not None:
            return found
        defaults = (self.default_ttl, self._lease_ms, self.wait_timeout)
        made = make_policy(*defaults, ttl, stale_ttl, early_refresh, lease, wait_timeout)
        if len(self._policies) < 256:
            self._policies[memo_key] = made
        return made

    # -- reads ---------------------------------------------------------------------

    @overload
    async def get(self, key: str) -> Any: ...

    @overload
    async def get(
        self, key: str, default: D, *, type_: type[T], allow_stale: bool = False
    ) -> T | D: ...

    @overload
    async def get(
        self, key: str, default: Any = None, *, type_: Any = None, allow_stale: bool = False
    ) -> Any: ...

    @traced("cache.get", attrs=from_self(_NS), result=hit_or_miss)
    async def get(
        self, key: str, default: Any = None, *, type_: Any = None, allow_stale: bool = False
    ) -> Any:
        """The value stored under *key*, or *default* (None) on a miss.

        Pass ``MISSING`` as *default* to tell a miss from a stored ``None``;
        pass ``type_`` to validate and decode into that type (pydantic models
        come back as models). A stale entry (past ``ttl`` within ``stale_ttl``)
        is a miss unless ``allow_stale=True``. One ``GET`` (served from the
        local tier when there is one and the entry is in it). An entry that
        cannot be decoded is a miss. Redis down: *default* (fail-open), or
        ``RedisUnavailable`` in closed mode. A read: cancelling it leaves nothing behind.
        """
        rkey = self._memo.get(key) or self.redis_key(key)
        if self.local is not None:
            return await self._reads.get_local(rkey, default, type_, allow_stale)
        try:
            with self._guard:
                data = await self._redis.get(rkey)
        except RedisUnavailable as exc:
            self._core.failed(exc)
            return default
        if data is None:
            self._stats.misses += 1
            return default
        if data[:1] == self._marker:
            return await self._reads.get_entry(rkey, data, default, type_, allow_stale)
        try:
            value = self._decode(data, type_)
        except CodecError:
            self._stats.decode_errors += 1
            self._stats.misses += 1
            return default
        self._stats.hits += 1
        return value

    async def get_many(self, keys: Iterable[str], *, type_: Any = None) -> dict[str, Any]:
        """The stored values of *keys* that exist and are fresh, as ``{key: value}``.

        A key absent from the result missed (a stored ``None`` is present as
        ``None``). One ``MGET`` per shard (pipelined; concurrent on Cluster) for
        the keys the local tier does not hold. Redis down: only local-tier
        hits (fail-open).
        """
        return await self._reads.get_many(keys, type_)

    async def exists(self, key: str) -> bool:
        """Whether *key* is stored (fresh or stale). Redis down: False (fail-open)."""
        return await self._reads.exists(key)

    async def ttl(self, key: str) -> float | None:
        """Seconds *key* stays fresh: ``None`` if missing, ``NO_EXPIRY`` if persistent.

        A stale entry reports 0.0. Redis down: None (fail-open).
        """
        return await self._reads.ttl(key)

    # -- writes --------------------------------------------------------------------

    @traced("cache.set", attrs=from_self(_NS))
    async def set(
        self,
        key: str,
        value: Any,
        ttl: TTL | None = None,
        *,
        tags: Iterable[str] = (),
        stale_ttl: TTL | None = None,
    ) -> bool:
        """Store *value* under *key* for *ttl* seconds (``None``: ``default_ttl``).

        The value, its tag memberships and the invalidation message for other
        processes' local tiers are written by one Lua script (atomic; one round
        trip). With ``stale_ttl`` the entry is kept, stale, until then (see the
        module docstring). Wakes callers waiting in ``get_or_set`` for this key.
        Returns True when stored; False when Redis is down (fail-open: the
        write is skipped), ``RedisUnavailable`` in closed mode. Raises
        ``CodecError`` if the value cannot be encoded. Cancelled mid-call, the
        script has either run completely or not at all.
        """
        rkey = self.redis_key(key)
        life_ms, stale_ms = lifetimes(self.default_ttl, ttl, stale_ttl)
        return await self._writes.set(rkey, value, life_ms, stale_ms, tags)

    async def set_many(
        self,
        items: Mapping[str, Any],
        ttl: TTL | None = None,
        *,
        tags: Iterable[str] = (),
        stale_ttl: TTL | None = None,
    ) -> bool:
        """Store every item with the same TTL and tags (one pipelined round trip).

        Each item is written atomically with its tags (one script call per
        item); the batch as a whole is not atomic. Returns False when Redis is
        down (fail-open), ``RedisUnavailable`` in closed mode.
        """
        if not items:
            return True
        life_ms, stale_ms = lifetimes(self.default_ttl, ttl, stale_ttl)
        return await self._writes.set_many(items, life_ms, stale_ms, tags)

    async def delete(self, key: str, *keys: str) -> int:
        """Remove keys; returns how many existed. Evicts them from every local tier.

        One script per shard involved (atomic per shard; a cancelled call has
        removed whole shards' keys or none). Redis down: 0 (fail-open).
        """
        return await self._writes.delete((key, *keys))

    async def expire(self, key: str, ttl: TTL) -> bool:
        """Give *key* a new fresh lifetime (``NO_EXPIRY``: persist); False if missing.

        Its stale window (if any) is kept on top, and its tag sets are made to
        live at least as long, so a TTL change never orphans the key from its
        tags. Redis down: False (fail-open).
        """
        rkey = self.redis_key(key)
        return await self._writes.expire(rkey, to_seconds(ttl))

    # -- invalidation ----------------------------------------------------------------

    async def invalidate_tags(self, *tags: str) -> int:
        """Remove every entry carrying any of *tags*; returns how many were removed.

        One drain script per shard, all shards concurrently. With one shard
        (the default on standalone and Sentinel) the invalidation of all the
        given tags is one atomic script for up to 5,000 entries; larger tags
        drain in further calls so Redis is never blocked long. On Cluster (16
        shards) it is atomic per shard. Once this returns, no entry written
        before the call carries the tags any more. Local tiers of every process
        drop the tags' entries. Redis down: 0 (fail-open), entries expire by TTL.
        """
        return await self._invalidation.invalidate_tags(tags)

    async def invalidate(self, pattern: str) -> int:
        """Remove every entry of this namespace whose key matches *pattern*.

        ``*`` matches any run of characters and is the only wildcard; ``\\*``
        and ``\\\\`` are a literal star and backslash (``CacheService.literal``
        escapes user input for you). Everything else is literal and escaped
        like keys, so a pattern can neither leave the namespace nor glob
        outside the key part. Runs of ``*`` count as one; more than
        ``MAX_PATTERN_WILDCARDS`` (4) raise ``PatternTooComplex`` before Redis
        is called, and matching costs linear time per key whatever the pattern.
        ``SCAN`` + ``UNLINK`` over every primary (never ``KEYS``); not atomic:
        entries written during the walk may survive. Local tiers of every
        process drop matching entries. Returns how many entries were removed.
        Redis down: 0 (fail-open).
        """
        return await self._invalidation.invalidate(pattern)

    async def clear(self) -> int:
        """Remove every key of this namespace (entries, tags, leases); returns the count.

        ``SCAN`` + ``UNLINK`` over every primary, confined to
        ``<prefix>:<namespace>:``; other namespaces and services are untouched.
        Local tiers of every process are flushed. Redis down: 0 (fail-open).
        """
        return await self._invalidation.clear()

    # -- get_or_set ------------------------------------------------------------------

    @traced("cache.get_or_set", attrs=from_self(_NS), result=lambda _: "hit")
    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[T]],
        ttl: TTL | None = None,
        *,
        stale_ttl: TTL | None = None,
        early_refresh: float = 0.0,
        tags: TagsArg = (),
        type_: Any = None,
        lease: Duration | None = None,
        wait_timeout: Duration | None = None,
    ) -> T:
        """The cached value of *key*, computing it with ``await factory()`` on a miss.

        * Fresh hit: returned (one ``GET``; one script call when ``stale_ttl``
          or ``early_refresh`` needs the remaining lifetime).
        * Miss: one caller per process computes; across processes one caller
          holds a lease while the others wait, woken by the write (``BLPOP``),
          for at most ``wait_timeout`` seconds, then compute themselves. The
          lease (``lease`` seconds) is extended while the factory runs.
        * Stale hit (``stale_ttl``): the stale value is returned at once and one
          caller across all processes refreshes it in the background under the
          lease; while refreshes fail the stale value keeps being served.
        * ``early_refresh`` (XFetch beta, 1.0 is typical): a fresh hit may
          trigger that background refresh before expiry, the more likely the
          closer the expiry and the slower the factory was.
        * The factory's exception propagates to the callers that waited for it;
          nothing is cached.
        * Cancellation: a cancelled computing caller releases its lease and
          wakes the waiters, one of which takes over.
        * Redis down: the factory runs (per-process coalescing still applies);
          if it fails and the local tier holds a stale copy, that is served.
          ``RedisUnavailable`` in closed mode.

        Background refreshes run the factory in a task of their own, after the
        caller got its answer: it must not rely on request-scoped resources
        (a request's DB session) that close when the request ends.
        ``tags`` may be a callable, evaluated only when a value is written.
        ``type_`` decodes hits into that type (pydantic models come back as models).
        """
        policy = self.policy(
            ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
            lease=lease,
            wait_timeout=wait_timeout,
        )
        rkey = self._memo.get(key) or self.redis_key(key)
        return cast(T, await self._flights.get_or_set(rkey, factory, policy, tags, type_))

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of this service in this process, plus local tier and breaker state.

        ``hits`` (Redis), ``local_hits``, ``stale_hits`` (served stale),
        ``misses``, ``errors`` (failed Redis calls), ``fail_open`` (factory run
        without Redis), ``stampede_waits`` (calls that waited for another
        process's computation), ``wakeups`` (waits ended by the writer's
        wake-up push rather than a timeout slice), ``coalesced`` (calls that joined this process's
        computation), ``factory_calls``, ``refreshes``, ``refresh_errors``,
        ``early_refreshes``, ``wait_timeouts``, ``stale_if_error``, ``sets``,
        ``invalidations``, ``decode_errors``.
        """
        return self._core.snapshot()

    def reset_stats(self) -> None:
        self._core.reset_stats()


# -- default services ------------------------------------------------------------------


def get_cache(namespace: str = "cache", *, redis: AnyRedis | None = None) -> CacheService:
    """The default ``CacheService`` of *namespace* on *redis* (default: ``get_redis()``).

    Created on first use (no local tier) unless one was registered with
    ``set_default_cache``. ``@cached`` and ``CacheDep`` resolve their service here.
    """
    client = redis if redis is not None else get_redis()
    services = cast(dict[str, CacheService], _registry.services(client, create=True))
    service = services.get(namespace)
    if service is None:
        service = services[namespace] = CacheService(client, namespace=namespace)
    return service


def set_default_cache(service: CacheService) -> None:
    """Make *service* the one ``get_cache`` (and so ``@cached``) uses for its namespace."""
    _registry.register(service.redis, service.namespace, service)
