"""``CacheService``: the namespaced Redis cache (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast, overload

import orjson
from pydantic import TypeAdapter, ValidationError
from pydantic_core import SchemaValidator
from redis.exceptions import NoScriptError, RedisError

from app.core.codec import Codec, default_codec
from app.core.config import get_settings
from app.core.errors import CodecError, InvalidKey, RedisUnavailable
from app.core.keys import KeySpace, bound_pattern, escape, escape_glob
from app.core.redis import (
    AnyRedis,
    breaker_for,
    client_decodes_responses,
    get_redis,
    is_cluster,
    scan_keys,
)
from app.core.scripts import Script
from app.core.telemetry import from_self, hit_or_miss, outcome, traced
from app.services.cache._local import (
    InvalidationListener,
    LocalCache,
    cancel_and_wait,
    encode_message,
    pattern_predicate,
)

__all__ = [
    "MISSING",
    "NO_EXPIRY",
    "TTL",
    "CachePolicy",
    "CacheService",
    "CacheStats",
    "LocalCache",
    "get_cache",
    "set_default_cache",
]

log = logging.getLogger("app.cache")

T = TypeVar("T")
D = TypeVar("D")

TTL: TypeAlias = "int | float | timedelta"
"""Seconds (int or float) or a ``timedelta``."""

NO_EXPIRY: Final[float] = math.inf
"""Pass as ``ttl`` to store an entry that never expires (the only way to get one)."""

DEFAULT_TTL: Final = 3600.0


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""Default for ``get(key, MISSING)``: tells a miss from a stored ``None``."""

_ERRORS: Final = (RedisUnavailable, RedisError)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~@+=,;!$&'()/:-]+").fullmatch
_TAG_BUDGET: Final = 5000
_KEY_MEMO_SIZE: Final = 4096

_S_SET = Script.from_package("app.services.cache", "lua/cache_set.lua")
_S_READ = Script.from_package("app.services.cache", "lua/cache_read.lua")
_S_LOCK = Script.from_package("app.services.cache", "lua/cache_lock.lua")
_S_RELEASE = Script.from_package("app.services.cache", "lua/cache_release.lua")
_S_DELETE = Script.from_package("app.services.cache", "lua/cache_delete.lua")
_S_EXPIRE = Script.from_package("app.services.cache", "lua/cache_expire.lua")
_S_TAGS = Script.from_package("app.services.cache", "lua/cache_invalidate_tags.lua")
_S_TTL = Script.from_package("app.services.cache", "lua/cache_ttl.lua")

_HIT, _LOCKED, _WAIT = 0, 1, 2


def _escape_key(key: str) -> str:
    """Escape a user key, keeping ``:`` (injective: escape() never emits ``:``)."""
    if not isinstance(key, str):
        raise InvalidKey(f"cache keys are str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("a cache key must not be empty")
    if _PLAIN_KEY(key):
        return key
    return ":".join(escape(part) if part else "" for part in key.split(":"))


def _glob_to_escaped(pattern: str) -> str:
    """A user pattern (``*`` wildcard, ``\\`` escapes) as a glob over escaped keys."""
    pieces: list[str] = []
    current: list[str] = []
    chars = iter(pattern)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == "*":
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    return "*".join(_escape_key(p) if p else "" for p in pieces)


def _to_seconds(ttl: TTL) -> float:
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"a cache TTL must be positive seconds or NO_EXPIRY, got {ttl!r}")
    return seconds


def _ms(seconds: float) -> int:
    return 0 if math.isinf(seconds) else max(1, math.ceil(seconds * 1000))


_NS = {"toolkit.cache.namespace": "namespace"}  # span attribute -> CacheService attribute


@dataclass(slots=True)
class CacheStats:
    """Counters of one ``CacheService`` in this process (see ``CacheService.stats``)."""

    hits: int = 0
    local_hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    errors: int = 0
    fail_open: int = 0
    stampede_waits: int = 0
    wakeups: int = 0
    coalesced: int = 0
    factory_calls: int = 0
    refreshes: int = 0
    refresh_errors: int = 0
    early_refreshes: int = 0
    wait_timeouts: int = 0
    stale_if_error: int = 0
    sets: int = 0
    invalidations: int = 0
    decode_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CachePolicy:
    """Precomputed lifetimes of ``get_or_set`` calls (from ``CacheService.policy``)."""

    __slots__ = ("beta", "lease_ms", "life_ms", "simple", "stale_ms", "wait_timeout")

    def __init__(
        self, life_ms: int, stale_ms: int, beta: float, lease_ms: int, wait_timeout: float
    ) -> None:
        self.life_ms = life_ms
        self.stale_ms = stale_ms
        self.beta = beta
        self.lease_ms = lease_ms
        self.wait_timeout = wait_timeout
        self.simple = not stale_ms and not beta


class _LeaderGone(Exception):
    """The in-process caller computing a value was cancelled: followers retry."""


class _Entry:
    """A stored entry split into its header fields and codec payload."""

    __slots__ = ("delta_ms", "payload", "stale_ms", "tags")

    def __init__(
        self, payload: bytes | str, stale_ms: int, delta_ms: int, tags: tuple[str, ...]
    ) -> None:
        self.payload = payload
        self.stale_ms = stale_ms
        self.delta_ms = delta_ms
        self.tags = tags


TagsArg: TypeAlias = "Iterable[str] | Callable[[], Iterable[str]]"


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
            computing itself.
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
        lease: float = 10.0,
        wait_timeout: float = 10.0,
    ) -> None:
        settings = get_settings()
        self.redis = redis
        self._redis: Any = redis
        self.keys = KeySpace(settings.redis_key_prefix, namespace)
        self.namespace = namespace
        self._decodes = client_decodes_responses(redis)
        if codec is not None and compress_threshold is not None:
            raise ValueError("pass either codec or compress_threshold, not both")
        if codec is None:
            codec = (
                default_codec(self._decodes)
                if compress_threshold is None
                else Codec(
                    compress_threshold=compress_threshold,
                    max_payload_bytes=settings.codec_max_payload_bytes,
                )
            )
        # Text-safe entries (binary payloads base64'd) whatever the client, so clients
        # with and without decode_responses can share a namespace.
        self.codec = codec.with_text_safe(True)
        self.default_ttl = DEFAULT_TTL if default_ttl is None else _to_seconds(default_ttl)
        mode = failure_mode or settings.cache_failure_mode
        if mode not in ("open", "closed"):
            raise ValueError(f"failure_mode must be 'open' or 'closed', got {mode!r}")
        self.failure_mode = mode
        self._fail_open = mode == "open"
        self._cluster = is_cluster(redis)
        if shards is None:
            shards = 16 if self._cluster else 1
        if not 1 <= shards <= 1024:
            raise ValueError("shards must be between 1 and 1024")
        self._shards = shards
        root = self.keys.root
        self._shard_roots = [f"{root}{{{namespace}.{i}}}" for i in range(shards)]
        self._channel = f"{root}invalidations" if broadcast else ""
        self._sender = os.urandom(6).hex()
        self._lease_ms = _ms(_to_seconds(lease))
        self.wait_timeout = float(wait_timeout)
        self._max_block = _max_block(redis)
        self._breaker = breaker_for(redis)
        self._marker: bytes | str = "\x02" if self._decodes else b"\x02"
        self._json_prefix: bytes | str = "\x01j-" if self._decodes else b"\x01j-"
        self._max_stored = self.codec.max_payload_bytes
        self._validators: dict[Any, Callable[[bytes | str], Any]] = {}
        self._sep: bytes | str = "|" if self._decodes else b"|"
        self._memo: dict[str, str] = {}
        self._stats = CacheStats()
        self._logged_transition = -1
        self._inflight: dict[str, asyncio.Future[tuple[bytes | None, Any]]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._policies: dict[tuple[Any, ...], CachePolicy] = {}
        self.local = local
        self._listener: InvalidationListener | None = None
        if local is not None:
            if not broadcast:
                raise ValueError("a local tier needs broadcast=True to stay coherent")
            self._listener = InvalidationListener(redis, self._channel, local, sender=self._sender)

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
        await asyncio.gather(*[cancel_and_wait(task) for task in list(self._background)])
        global _registry_version
        registry = _registry(self.redis, create=False)
        if registry is not None and registry.get(self.namespace) is self:
            del registry[self.namespace]
            _registry_version += 1

    async def __aenter__(self) -> CacheService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_idle(self) -> None:
        """Wait until every background refresh started so far has finished."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- keys --------------------------------------------------------------------

    def redis_key(self, key: str) -> str:
        """The Redis key that holds *key* (escaped, namespaced, sharded)."""
        rkey = self._memo.get(key)
        if rkey is None:
            ekey = _escape_key(key)
            shard = zlib.crc32(ekey.encode()) % self._shards
            rkey = f"{self._shard_roots[shard]}:{ekey}"
            if len(self._memo) >= _KEY_MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = rkey
        return rkey

    @staticmethod
    def literal(text: str) -> str:
        """*text* with ``\\`` and ``*`` escaped, to embed user input in an ``invalidate`` pattern."""
        return text.replace("\\", "\\\\").replace("*", "\\*")

    def _tag_key(self, shard_root: str, etag: str) -> str:
        return f"{shard_root}|tag|{etag}"

    # -- policies ----------------------------------------------------------------

    def _lifetimes(self, ttl: TTL | None, stale_ttl: TTL | None) -> tuple[int, int]:
        """(physical lifetime ms (0: persistent), stale window ms)."""
        fresh = self.default_ttl if ttl is None else _to_seconds(ttl)
        if stale_ttl is None:
            return _ms(fresh), 0
        total = _to_seconds(stale_ttl)
        if total < fresh:
            raise ValueError(f"stale_ttl ({total}s) must be >= ttl ({fresh}s)")
        if math.isinf(total):
            raise ValueError("stale_ttl must be finite (use ttl=NO_EXPIRY for a persistent entry)")
        return _ms(total), _ms(total) - _ms(fresh)

    def policy(
        self,
        ttl: TTL | None = None,
        *,
        stale_ttl: TTL | None = None,
        early_refresh: float = 0.0,
        lease: float | None = None,
        wait_timeout: float | None = None,
    ) -> CachePolicy:
        """The precomputed policy for these options (cached per distinct options)."""
        memo_key = (ttl, stale_ttl, early_refresh, lease, wait_timeout)
        found = self._policies.get(memo_key)
        if found is not None:
            return found
        if early_refresh < 0:
            raise ValueError("early_refresh (XFetch beta) must be >= 0")
        life_ms, stale_ms = self._lifetimes(ttl, stale_ttl)
        made = CachePolicy(
            life_ms,
            stale_ms,
            float(early_refresh),
            self._lease_ms if lease is None else _ms(_to_seconds(lease)),
            self.wait_timeout if wait_timeout is None else float(wait_timeout),
        )
        if len(self._policies) < 256:
            self._policies[memo_key] = made
        return made

    # -- entries -----------------------------------------------------------------

    def _wrap(self, payload: bytes, stale_ms: int, delta_ms: int, etags: Sequence[str]) -> bytes:
        if not (stale_ms or delta_ms or etags):
            return payload
        tags = " ".join(etags).encode()
        return b"\x02%d|%d|%s|" % (stale_ms, delta_ms, tags) + payload

    def _split(self, data: bytes | str) -> _Entry:
        if data[:1] != self._marker:
            return _Entry(data, 0, 0, ())
        fields = data[1:].split(self._sep, 3)  # type: ignore[arg-type]
        if len(fields) != 4:
            raise CodecError("stored cache entry has a truncated header")
        stale, delta, tags, payload = fields
        try:
            stale_ms, delta_ms = int(stale), int(delta)
        except ValueError as exc:
            raise CodecError("stored cache entry has a corrupted header") from exc
        text = tags.decode() if isinstance(tags, bytes) else tags
        return _Entry(payload, stale_ms, delta_ms, tuple(text.split(" ")) if text else ())

    def _decode(self, payload: bytes | str, type_: Any) -> Any:
        """Decode a codec payload; plain JSON envelopes skip the codec's generic path.

        Same result and errors as ``codec.decode`` (the JSON envelope is
        ``\\x01j-<json>``); every other format goes through the codec.
        """
        if payload[:3] != self._json_prefix or len(payload) > self._max_stored:
            return self.codec.decode(payload, type_)
        try:
            if type_ is None:
                return orjson.loads(payload[3:])
            validate = self._validators.get(type_)
            if validate is None:
                validate = self._validators[type_] = _json_validator(type_)
            return validate(payload[3:])
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"corrupted JSON payload: {exc}") from exc
        except ValidationError as exc:
            raise CodecError(f"stored value does not match {type_!r}: {exc}") from exc
        except TypeError:  # an unhashable type expression: the codec copes
            return self.codec.decode(payload, type_)

    # -- failure handling ------------------------------------------------------------

    def _redis_failed(self, exc: BaseException) -> None:
        """Count an error; log the first one after each breaker transition; raise if closed."""
        self._stats.errors += 1
        outcome("unavailable", exc)
        transition = self._breaker.transitions
        if transition != self._logged_transition:
            self._logged_transition = transition
            log.warning(
                "cache %r: Redis call failed (%s); %s until Redis answers again",
                self.namespace,
                exc,
                "failing open (misses, skipped writes)" if self._fail_open else "raising 503",
            )
        if not self._fail_open:
            if isinstance(exc, RedisUnavailable):
                raise exc
            raise RedisUnavailable(f"cache {self.namespace!r}: Redis call failed: {exc}") from exc

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
            return await self._get_local(rkey, default, type_, allow_stale)
        try:
            with self._breaker:
                data = await self._redis.get(rkey)
        except _ERRORS as exc:
            self._redis_failed(exc)
            return default
        if data is None:
            self._stats.misses += 1
            return default
        if data[:1] == self._marker:
            return await self._get_entry(rkey, data, default, type_, allow_stale)
        try:
            value = self._decode(data, type_)
        except CodecError:
            self._stats.decode_errors += 1
            self._stats.misses += 1
            return default
        self._stats.hits += 1
        return value

    async def _get_entry(
        self, rkey: str, data: bytes | str, default: Any, type_: Any, allow_stale: bool
    ) -> Any:
        try:
            entry = self._split(data)
            if entry.stale_ms and not allow_stale:
                with self._breaker:
                    pttl = int(await self._redis.pttl(rkey))
                if 0 <= pttl <= entry.stale_ms:
                    self._stats.misses += 1
                    return default
            value = self._decode(entry.payload, type_)
        except CodecError:
            self._stats.decode_errors += 1
            self._stats.misses += 1
            return default
        except _ERRORS as exc:
            self._redis_failed(exc)
            return default
        self._stats.hits += 1
        return value

    async def _get_local(self, rkey: str, default: Any, type_: Any, allow_stale: bool) -> Any:
        local = cast(LocalCache, self.local)
        if not local.active:
            self._ensure_listener()
        found = local.get(rkey)
        if found is not None:
            try:
                value = self._decode(found.payload, type_)
            except CodecError:
                local.invalidate_keys((rkey,))
            else:
                self._stats.local_hits += 1
                return value
        epoch = local.epoch
        try:
            with self._breaker:
                data, pttl = await _S_READ(self._redis, (rkey,))
        except _ERRORS as exc:
            self._redis_failed(exc)
            return default
        if data is None:
            self._stats.misses += 1
            return default
        try:
            entry = self._split(data)
            value = self._decode(entry.payload, type_)
        except CodecError:
            self._stats.decode_errors += 1
            self._stats.misses += 1
            return default
        fresh_ms = _fresh_ms(int(pttl), entry.stale_ms)
        if fresh_ms <= 0 and not allow_stale:
            self._stats.misses += 1
            return default
        self._stats.hits += 1
        self._local_put(rkey, entry, int(pttl), fresh_ms, epoch)
        return value

    def _local_put(self, rkey: str, entry: _Entry, pttl: int, fresh_ms: float, epoch: int) -> None:
        local = self.local
        if local is None or fresh_ms <= 0:
            return
        local.put(
            rkey,
            entry.payload,
            ttl=None if math.isinf(fresh_ms) else fresh_ms / 1000,
            hard_ttl=pttl / 1000 if pttl > 0 else None,
            tags=entry.tags,
            epoch=epoch,
        )

    def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.running:
            self._listener.start()

    async def get_many(self, keys: Iterable[str], *, type_: Any = None) -> dict[str, Any]:
        """The stored values of *keys* that exist and are fresh, as ``{key: value}``.

        A key absent from the result missed (a stored ``None`` is present as
        ``None``). One ``MGET`` per shard (pipelined; concurrent on Cluster) for
        the keys the local tier does not hold. Redis down: only local-tier
        hits (fail-open).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        pending: list[tuple[str, str]] = []
        local = self.local
        if local is not None and not local.active:
            self._ensure_listener()
        for key in wanted:
            rkey = self.redis_key(key)
            hit = local.get(rkey) if local is not None else None
            if hit is not None:
                with contextlib.suppress(CodecError):
                    found[key] = self._decode(hit.payload, type_)
                    self._stats.local_hits += 1
                    continue
            pending.append((key, rkey))
        if not pending:
            return found
        by_shard: dict[str, list[str]] = {}
        for _, rkey in pending:
            by_shard.setdefault(rkey[: rkey.index("}:") + 1], []).append(rkey)
        fetched: dict[str, Any] = {}
        try:
            with self._breaker:
                if len(by_shard) == 1:
                    (rkeys,) = by_shard.values()
                    fetched.update(zip(rkeys, await self._redis.mget(rkeys), strict=True))
                elif self._cluster:  # one MGET per slot, concurrently
                    groups = list(by_shard.values())
                    replies = await asyncio.gather(*[self._redis.mget(g) for g in groups])
                    for rkeys, reply in zip(groups, replies, strict=True):
                        fetched.update(zip(rkeys, reply, strict=True))
                else:  # one MGET per slot, one round trip
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for rkeys in by_shard.values():
                            pipe.mget(rkeys)
                        replies = await pipe.execute()
                    for rkeys, reply in zip(by_shard.values(), replies, strict=True):
                        fetched.update(zip(rkeys, reply, strict=True))
        except _ERRORS as exc:
            self._redis_failed(exc)
            return found
        for key, rkey in pending:
            data = fetched[rkey]
            if data is None:
                self._stats.misses += 1
                continue
            value = await self._get_entry(rkey, data, MISSING, type_, False)
            if value is not MISSING:
                found[key] = value
        return found

    async def exists(self, key: str) -> bool:
        """Whether *key* is stored (fresh or stale). Redis down: False (fail-open)."""
        try:
            with self._breaker:
                return bool(await self._redis.exists(self.redis_key(key)))
        except _ERRORS as exc:
            self._redis_failed(exc)
            return False

    async def ttl(self, key: str) -> float | None:
        """Seconds *key* stays fresh: ``None`` if missing, ``NO_EXPIRY`` if persistent.

        A stale entry reports 0.0. Redis down: None (fail-open).
        """
        try:
            with self._breaker:
                pttl, stale_ms = await _S_TTL(self._redis, (self.redis_key(key),))
        except _ERRORS as exc:
            self._redis_failed(exc)
            return None
        pttl = int(pttl)
        if pttl == -2:
            return None
        if pttl == -1:
            return NO_EXPIRY
        return max(0.0, (pttl - int(stale_ms)) / 1000)

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
        life_ms, stale_ms = self._lifetimes(ttl, stale_ttl)
        etags = tuple(escape(t) for t in tags)
        stored = self._wrap(self.codec.encode(value), stale_ms, 0, etags)
        try:
            await self._write(rkey, stored, life_ms, etags, "")
        except _ERRORS as exc:
            self._redis_failed(exc)
            return False
        return True

    async def _write(
        self, rkey: str, stored: bytes, life_ms: int, etags: Sequence[str], token: str
    ) -> None:
        """Run cache_set for one entry, then evict it from this process's local tier."""
        cut = rkey.index("}:") + 1
        shard_root = rkey[:cut]
        keys = [rkey, rkey + "|lock", rkey + "|wait", rkey + "|wake"]
        keys.extend(self._tag_key(shard_root, t) for t in etags)
        message = encode_message(self._sender, "k", (rkey,)) if self._channel else ""
        with self._breaker:
            await _S_SET(
                self._redis,
                keys,
                (stored, life_ms, token, rkey[cut + 1 :], shard_root, self._channel, message),
            )
        self._stats.sets += 1
        if self.local is not None:
            self.local.invalidate_keys((rkey,))

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
        life_ms, stale_ms = self._lifetimes(ttl, stale_ttl)
        etags = tuple(escape(t) for t in tags)
        calls: list[tuple[list[str], tuple[Any, ...]]] = []
        rkeys: list[str] = []
        for key, value in items.items():
            rkey = self.redis_key(key)
            cut = rkey.index("}:") + 1
            shard_root = rkey[:cut]
            keys = [rkey, rkey + "|lock", rkey + "|wait", rkey + "|wake"]
            keys.extend(self._tag_key(shard_root, t) for t in etags)
            stored = self._wrap(self.codec.encode(value), stale_ms, 0, etags)
            message = encode_message(self._sender, "k", (rkey,)) if self._channel else ""
            args = (stored, life_ms, "", rkey[cut + 1 :], shard_root, self._channel, message)
            calls.append((keys, args))
            rkeys.append(rkey)
        try:
            with self._breaker:
                if self._cluster:  # cluster pipelines refuse EVALSHA: concurrent calls per node
                    await asyncio.gather(*[_S_SET(self._redis, k, a) for k, a in calls])
                else:
                    await self._pipelined_sets(calls)
        except _ERRORS as exc:
            self._redis_failed(exc)
            return False
        self._stats.sets += len(calls)
        if self.local is not None:
            self.local.invalidate_keys(rkeys)
        return True

    async def _pipelined_sets(self, calls: Sequence[tuple[list[str], tuple[Any, ...]]]) -> None:
        for attempt in (1, 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(_S_SET.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results) or attempt == 2:
                break
            await _S_SET.load(self._redis)  # the server lost its scripts (restart, failover)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def delete(self, key: str, *keys: str) -> int:
        """Remove keys; returns how many existed. Evicts them from every local tier.

        One script per shard involved (atomic per shard; a cancelled call has
        removed whole shards' keys or none). Redis down: 0 (fail-open).
        """
        by_shard: dict[str, list[str]] = {}
        for k in (key, *keys):
            rkey = self.redis_key(k)
            by_shard.setdefault(rkey[: rkey.index("}:") + 1], []).append(rkey)
        removed = 0
        try:
            for rkeys in by_shard.values():
                message = encode_message(self._sender, "k", rkeys) if self._channel else ""
                with self._breaker:
                    removed += int(await _S_DELETE(self._redis, rkeys, (self._channel, message)))
                if self.local is not None:
                    self.local.invalidate_keys(rkeys)
        except _ERRORS as exc:
            self._redis_failed(exc)
        return removed

    async def expire(self, key: str, ttl: TTL) -> bool:
        """Give *key* a new fresh lifetime (``NO_EXPIRY``: persist); False if missing.

        Its stale window (if any) is kept on top, and its tag sets are made to
        live at least as long, so a TTL change never orphans the key from its
        tags. Redis down: False (fail-open).
        """
        rkey = self.redis_key(key)
        fresh = _to_seconds(ttl)
        cut = rkey.index("}:") + 1
        shard_root, member = rkey[:cut], rkey[cut + 1 :]
        message = encode_message(self._sender, "k", (rkey,)) if self._channel else ""
        expected = ""
        try:
            for _ in range(3):
                keys = [rkey]
                if expected:
                    keys.extend(self._tag_key(shard_root, t) for t in expected.split(" "))
                with self._breaker:
                    reply = await _S_EXPIRE(
                        self._redis, keys, (_ms(fresh), expected, self._channel, message, member)
                    )
                if int(reply[0]) != 2:
                    break
                found = reply[1]
                expected = found.decode() if isinstance(found, bytes) else str(found)
        except _ERRORS as exc:
            self._redis_failed(exc)
            return False
        if self.local is not None:
            self.local.invalidate_keys((rkey,))
        return int(reply[0]) == 1

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
        etags = [escape(t) for t in tags]
        if not etags:
            return 0

        async def drain(root: str) -> int:
            keys = [self._tag_key(root, t) for t in etags]
            removed = 0
            while True:
                with self._breaker:
                    done, left = await _S_TAGS(
                        self._redis, keys, (_TAG_BUDGET, *[root] * len(keys))
                    )
                removed += int(done)
                if not int(left):
                    return removed

        removed = 0
        try:
            counts = await asyncio.gather(*[drain(root) for root in self._shard_roots])
            removed = sum(counts)
            await self._broadcast("t", etags)
        except _ERRORS as exc:
            self._redis_failed(exc)
        if self.local is not None:
            self.local.invalidate_tags(etags)
        self._stats.invalidations += 1
        return removed

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
        glob = _glob_to_escaped(bound_pattern(pattern, what="cache pattern"))
        keep = pattern_predicate(glob)
        # The server matches at most one star of the caller's (its matcher backtracks:
        # exponential on the embedded store and on Redis before 7.0.9); keep() checks the rest.
        first_star = glob.find("*")
        server_glob = glob if glob.count("*") <= 1 else glob[: first_star + 1]
        match = f"{escape_glob(self.keys.root)}{{*}}:{server_glob}"
        removed = 0
        try:
            with self._breaker:
                removed = await self._unlink_scanned(match, entries_only=True, keep=keep)
            await self._broadcast("p", (glob,))
        except _ERRORS as exc:
            self._redis_failed(exc)
        if self.local is not None:
            self.local.invalidate_matching(pattern_predicate(glob))
        self._stats.invalidations += 1
        return removed

    async def _unlink_scanned(
        self, match: str, *, entries_only: bool, keep: Callable[[str], bool] | None = None
    ) -> int:
        """SCAN every primary for *match*; UNLINK in batches of one hash tag (one slot) each.

        With *keep*, only the keys it accepts are removed.
        """
        removed = 0
        batch: dict[str, list[bytes | str]] = {}
        pending = 0
        async for found in scan_keys(self._redis, match):
            name = found.decode() if isinstance(found, bytes) else found
            cut = name.find("}")
            if cut < 0:
                continue  # not a key this service wrote
            if entries_only and "|" in name[cut:]:
                continue  # lease, waiter or tag bookkeeping, not an entry
            if keep is not None and not keep(name):
                continue
            batch.setdefault(name[: cut + 1], []).append(found)
            pending += 1
            if pending >= 500:
                removed += await self._unlink_groups(batch)
                batch, pending = {}, 0
        return removed + await self._unlink_groups(batch)

    async def _unlink_groups(self, groups: Mapping[str, list[bytes | str]]) -> int:
        removed = 0
        for names in groups.values():  # one slot per group: valid on Cluster
            if names:
                removed += int(await self._redis.unlink(*names))
        return removed

    async def clear(self) -> int:
        """Remove every key of this namespace (entries, tags, leases); returns the count.

        ``SCAN`` + ``UNLINK`` over every primary, confined to
        ``<prefix>:<namespace>:``; other namespaces and services are untouched.
        Local tiers of every process are flushed. Redis down: 0 (fail-open).
        """
        removed = 0
        try:
            with self._breaker:
                removed = await self._unlink_scanned(
                    escape_glob(self.keys.root) + "*", entries_only=False
                )
            await self._broadcast("f", ())
        except _ERRORS as exc:
            self._redis_failed(exc)
        if self.local is not None:
            self.local.flush()
        self._stats.invalidations += 1
        return removed

    async def _broadcast(self, op: str, items: Iterable[str]) -> None:
        if self._channel:
            with self._breaker:
                await self._redis.publish(self._channel, encode_message(self._sender, op, items))

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
        lease: float | None = None,
        wait_timeout: float | None = None,
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
        return cast(T, await self._get_or_set(rkey, factory, policy, tags, type_))

    async def _get_or_set(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
    ) -> Any:
        local = self.local
        if local is None and policy.simple:
            try:
                with self._breaker:
                    data = await self._redis.get(rkey)
            except _ERRORS as exc:
                return await self._single_flight(rkey, factory, policy, tags, type_, exc)
            if data is not None and data[:1] != self._marker:
                try:
                    value = self._decode(data, type_)
                except CodecError:
                    self._stats.decode_errors += 1
                else:
                    self._stats.hits += 1
                    return value
            return await self._after_read(rkey, data, factory, policy, tags, type_)
        else:
            if local is not None:
                if not local.active:
                    self._ensure_listener()
                hit = local.get(rkey)
                if hit is not None:
                    try:
                        value = self._decode(hit.payload, type_)
                    except CodecError:
                        local.invalidate_keys((rkey,))
                    else:
                        self._stats.local_hits += 1
                        return value
            epoch = local.epoch if local is not None else 0
            try:
                with self._breaker:
                    data, pttl = await _S_READ(self._redis, (rkey,))
            except _ERRORS as exc:
                return await self._single_flight(rkey, factory, policy, tags, type_, exc)
            if data is not None:
                found = await self._entry_hit(
                    rkey, data, int(pttl), factory, policy, tags, type_, epoch
                )
                if found is not MISSING:
                    return found
        self._stats.misses += 1
        return await self._single_flight(rkey, factory, policy, tags, type_, None)

    async def _after_read(
        self,
        rkey: str,
        data: bytes | str | None,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
    ) -> Any:
        """A simple-policy read that was not a plain hit: a header entry, or a miss."""
        if data is not None and data[:1] == self._marker:
            found = await self._entry_hit(rkey, data, None, factory, policy, tags, type_)
            if found is not MISSING:
                return found
        self._stats.misses += 1
        return await self._single_flight(rkey, factory, policy, tags, type_, None)

    async def _entry_hit(
        self,
        rkey: str,
        data: bytes | str,
        pttl: int | None,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
        epoch: int = -1,
    ) -> Any:
        """Serve a stored entry (fresh, stale, early refresh); MISSING if unusable."""
        try:
            entry = self._split(data)
            value = self._decode(entry.payload, type_)
        except CodecError:
            self._stats.decode_errors += 1
            return MISSING
        if entry.stale_ms or policy.beta:
            if pttl is None:
                try:
                    with self._breaker:
                        pttl = int(await self._redis.pttl(rkey))
                except _ERRORS as exc:
                    self._redis_failed(exc)
                    pttl = -1
            fresh_ms = _fresh_ms(pttl, entry.stale_ms)
            if fresh_ms <= 0:
                self._stats.stale_hits += 1
                outcome("stale")
                self._refresh_later(rkey, factory, policy, tags)
                return value
            if (
                policy.beta
                and entry.delta_ms
                and entry.delta_ms * policy.beta * -math.log(1.0 - random.random()) >= fresh_ms
            ):
                self._stats.early_refreshes += 1
                self._refresh_later(rkey, factory, policy, tags)
            if epoch >= 0 and pttl is not None:
                self._local_put(rkey, entry, pttl, fresh_ms, epoch)
        elif epoch >= 0 and pttl is not None:
            self._local_put(rkey, entry, pttl, _fresh_ms(pttl, 0), epoch)
        self._stats.hits += 1
        return value

    async def _single_flight(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
        redis_error: BaseException | None,
    ) -> Any:
        """One computation per key per process; the others share its result."""
        while True:
            shared = self._inflight.get(rkey)
            if shared is None:
                break
            self._stats.coalesced += 1
            outcome("coalesced")
            try:
                payload, value = await asyncio.shield(shared)
            except _LeaderGone:
                continue
            if payload is None:
                return value
            return self._decode(payload, type_)
        future: asyncio.Future[tuple[bytes | None, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[rkey] = future
        try:
            if redis_error is not None:
                payload, value = await self._compute_offline(rkey, factory, type_, redis_error)
            else:
                payload, value = await self._fill(rkey, factory, policy, tags, type_)
        except asyncio.CancelledError:
            future.set_exception(_LeaderGone())
            future.exception()  # retrieved: no "never retrieved" noise without followers
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        else:
            future.set_result((payload, value))
        finally:
            del self._inflight[rkey]
        return value

    async def _compute_offline(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        type_: Any,
        redis_error: BaseException,
    ) -> tuple[bytes | None, Any]:
        """Redis is down: run the factory (fail-open); stale local copy if it fails too."""
        self._redis_failed(redis_error)
        self._stats.fail_open += 1
        self._stats.factory_calls += 1
        try:
            value = await factory()
        except Exception:
            stale = self.local.peek_stale(rkey) if self.local is not None else None
            if stale is None:
                raise
            self._stats.stale_if_error += 1
            return None, self._decode(stale.payload, type_)
        return None, value

    async def _fill(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
    ) -> tuple[bytes | None, Any]:
        """The cross-process part of a miss: lease, or wait to be woken, or time out."""
        loop = asyncio.get_running_loop()
        token = os.urandom(8).hex()
        keys = (rkey, rkey + "|lock", rkey + "|wait", rkey + "|wake")
        deadline = loop.time() + policy.wait_timeout
        waited = False
        while True:
            try:
                with self._breaker:
                    reply = await _S_LOCK(self._redis, keys, (token, policy.lease_ms, "1"))
            except _ERRORS as exc:
                return await self._compute_offline(rkey, factory, type_, exc)
            status = int(reply[0])
            if status == _HIT:
                try:
                    entry = self._split(reply[1])
                    value = self._decode(entry.payload, type_)
                except CodecError:
                    self._stats.decode_errors += 1
                    return await self._compute_and_store(rkey, factory, policy, tags, None)
                self._stats.hits += 1
                return (
                    entry.payload if isinstance(entry.payload, bytes) else entry.payload.encode()
                ), value
            if status == _LOCKED:
                return await self._compute_and_store(rkey, factory, policy, tags, token)
            if not waited:
                waited = True
                self._stats.stampede_waits += 1
                outcome("waited")
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._stats.wait_timeouts += 1
                return await self._compute_and_store(rkey, factory, policy, tags, None)
            lease_left = max(int(reply[1]), 10) / 1000
            block = max(0.01, min(remaining, lease_left + 0.01, self._max_block))
            try:
                with self._breaker:
                    woken = await self._redis.blpop([keys[3]], timeout=block)
            except _ERRORS as exc:
                return await self._compute_offline(rkey, factory, type_, exc)
            if woken is not None:
                self._stats.wakeups += 1

    async def _compute_and_store(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        token: str | None,
    ) -> tuple[bytes | None, Any]:
        """Run the factory (holding the lease when *token*), store the value, wake waiters."""
        keeper = self._keep_lease(rkey, token, policy.lease_ms) if token else None
        self._stats.factory_calls += 1
        outcome("computed")
        started = time.perf_counter()
        try:
            value = await factory()
        except BaseException:
            if keeper is not None:
                keeper.cancel()
            if token:
                await self._release(rkey, token, 0)
            raise
        if keeper is not None:
            keeper.cancel()
        delta_ms = max(1, round((time.perf_counter() - started) * 1000)) if policy.beta else 0
        try:
            payload = self.codec.encode(value)
        except CodecError as exc:
            log.warning("cache %r: value for %s not cached: %s", self.namespace, rkey, exc)
            if token:
                await self._release(rkey, token, 0)
            return None, value
        etags = tuple(escape(t) for t in (tags() if callable(tags) else tags))
        stored = self._wrap(payload, policy.stale_ms, delta_ms, etags)
        try:
            await self._write(rkey, stored, policy.life_ms, etags, token or "")
        except _ERRORS as exc:
            self._redis_failed(exc)
        return payload, value

    def _keep_lease(self, rkey: str, token: str, lease_ms: int) -> asyncio.Task[None]:
        async def extend() -> None:
            while True:
                await asyncio.sleep(lease_ms / 3000)
                with contextlib.suppress(*_ERRORS):
                    with self._breaker:
                        owned = await _S_RELEASE(
                            self._redis,
                            (rkey + "|lock", rkey + "|wait", rkey + "|wake"),
                            (token, lease_ms),
                        )
                    if not int(owned):
                        return

        return asyncio.get_running_loop().create_task(extend())

    async def _release(self, rkey: str, token: str, keep_ms: int) -> None:
        with contextlib.suppress(*_ERRORS), self._breaker:
            await asyncio.shield(
                _S_RELEASE(
                    self._redis,
                    (rkey + "|lock", rkey + "|wait", rkey + "|wake"),
                    (token, keep_ms),
                )
            )

    def _refresh_later(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
    ) -> None:
        """Start one background refresh of *rkey* in this process (if none is running)."""
        if rkey in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(rkey, factory, policy, tags))
        self._refreshing[rkey] = task
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if self._refreshing.get(rkey) is t:
                del self._refreshing[rkey]

        task.add_done_callback(done)

    async def _refresh(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
    ) -> None:
        token = os.urandom(8).hex()
        keys = (rkey, rkey + "|lock", rkey + "|wait", rkey + "|wake")
        try:
            with self._breaker:
                reply = await _S_LOCK(self._redis, keys, (token, policy.lease_ms, "0"))
        except _ERRORS as exc:
            self._redis_failed(exc)
            return
        if int(reply[0]) != _LOCKED:
            return  # another caller (maybe in another process) is refreshing
        self._stats.refreshes += 1
        try:
            await self._compute_and_store_refresh(rkey, factory, policy, tags, token)
        except Exception as exc:
            self._stats.refresh_errors += 1
            log.warning(
                "cache %r: background refresh of %s failed (%s: %s); serving the stale "
                "value, next attempt in %.1fs",
                self.namespace,
                rkey,
                type(exc).__name__,
                exc,
                min(policy.lease_ms, 1000) / 1000,
            )

    async def _compute_and_store_refresh(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        token: str,
    ) -> None:
        keeper = self._keep_lease(rkey, token, policy.lease_ms)
        self._stats.factory_calls += 1
        started = time.perf_counter()
        try:
            value = await factory()
        except BaseException:
            keeper.cancel()
            # Hold the lease a little: a failing origin is retried once a second, not per hit.
            await self._release(rkey, token, min(policy.lease_ms, 1000))
            raise
        keeper.cancel()
        delta_ms = max(1, round((time.perf_counter() - started) * 1000)) if policy.beta else 0
        etags = tuple(escape(t) for t in (tags() if callable(tags) else tags))
        stored = self._wrap(self.codec.encode(value), policy.stale_ms, delta_ms, etags)
        try:
            await self._write(rkey, stored, policy.life_ms, etags, token)
        except _ERRORS as exc:
            self._redis_failed(exc)

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
        out: dict[str, Any] = {"namespace": self.namespace, **self._stats.as_dict()}
        lookups = out["hits"] + out["local_hits"] + out["stale_hits"] + out["misses"]
        out["hit_ratio"] = (
            round((out["hits"] + out["local_hits"] + out["stale_hits"]) / lookups, 4)
            if lookups
            else None
        )
        out["local"] = self.local.stats() if self.local is not None else None
        if self._listener is not None and out["local"] is not None:
            out["local"]["subscriptions"] = self._listener.subscriptions
            out["local"]["messages"] = self._listener.messages
        out["breaker"] = self._breaker.state
        return out

    def reset_stats(self) -> None:
        self._stats = CacheStats()


def _json_validator(type_: Any) -> Callable[[bytes | str], Any]:
    """The fastest JSON validator for *type_* (pydantic-core's, without the Python wrapper)."""
    adapter = TypeAdapter(type_)
    validator = adapter.validator
    if isinstance(validator, SchemaValidator):
        return validator.validate_json
    return adapter.validate_json  # deferred or plugin-wrapped validators


def _fresh_ms(pttl: int, stale_ms: int) -> float:
    """Milliseconds an entry stays fresh given its PTTL (-1: forever) and stale window."""
    if pttl == -1:
        return math.inf
    if pttl < 0:
        return 0.0
    return float(pttl - stale_ms)


def _max_block(client: Any) -> float:
    """Longest single BLPOP wait that stays under the client's socket timeout."""
    timeout: Any = None
    with contextlib.suppress(AttributeError):
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if timeout is None:
        with contextlib.suppress(AttributeError):
            timeout = client.connection_kwargs.get("socket_timeout")
    if not timeout:
        return 1.0
    return max(0.05, min(1.0, float(timeout) / 2))


# -- default services ------------------------------------------------------------------

_REGISTRY_ATTR: Final = "_toolkit_cache_services"
_registry_version = 0
"""Bumped whenever a default service is registered or unregistered (``@cached`` memoizes)."""


def _registry(client: Any, *, create: bool) -> dict[str, CacheService] | None:
    found: dict[str, CacheService] | None = getattr(client, _REGISTRY_ATTR, None)
    if found is None and create:
        found = {}
        setattr(client, _REGISTRY_ATTR, found)
    return found


def get_cache(namespace: str = "cache", *, redis: AnyRedis | None = None) -> CacheService:
    """The default ``CacheService`` of *namespace* on *redis* (default: ``get_redis()``).

    Created on first use (no local tier) unless one was registered with
    ``set_default_cache``. ``@cached`` and ``CacheDep`` resolve their service here.
    """
    client = redis if redis is not None else get_redis()
    services = cast(dict[str, CacheService], _registry(client, create=True))
    service = services.get(namespace)
    if service is None:
        service = services[namespace] = CacheService(client, namespace=namespace)
    return service


def set_default_cache(service: CacheService) -> None:
    """Make *service* the one ``get_cache`` (and so ``@cached``) uses for its namespace."""
    global _registry_version
    services = cast(dict[str, CacheService], _registry(service.redis, create=True))
    services[service.namespace] = service
    _registry_version += 1
