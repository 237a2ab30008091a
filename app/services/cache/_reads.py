"""Reads that are not the plain-hit fast path: header entries, the local tier, batches, TTLs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, cast

from app.core.errors import CodecError, RedisUnavailable
from app.services.cache._core import CacheCore
from app.services.cache._entries import MISSING
from app.services.cache._keys import shard_root
from app.services.cache._local import LocalCache
from app.services.cache._policy import NO_EXPIRY, fresh_ms
from app.services.cache._scripts import S_READ, S_TTL

__all__ = ["CacheReads"]


class CacheReads:
    """``get`` of entries with a header or through the local tier, ``get_many``, ``exists``, ``ttl``."""

    __slots__ = ("_core",)

    def __init__(self, core: CacheCore) -> None:
        self._core = core

    async def get_entry(
        self, rkey: str, data: bytes | str, default: Any, type_: Any, allow_stale: bool
    ) -> Any:
        """A stored entry with a header: a miss while stale unless *allow_stale*."""
        core = self._core
        try:
            entry = core.entries.split(data)
            if entry.stale_ms and not allow_stale:
                with core.guard:
                    pttl = int(await core.redis.pttl(rkey))
                if 0 <= pttl <= entry.stale_ms:
                    core.stats.misses += 1
                    return default
            value = core.entries.decode(entry.payload, type_)
        except CodecError:
            core.stats.decode_errors += 1
            core.stats.misses += 1
            return default
        except RedisUnavailable as exc:
            core.failed(exc)
            return default
        core.stats.hits += 1
        return value

    async def get_local(self, rkey: str, default: Any, type_: Any, allow_stale: bool) -> Any:
        """``get`` through the local tier: its entry, else Redis (filling the tier)."""
        core = self._core
        local = cast(LocalCache, core.local)
        value = core.local_hit(local, rkey, type_)
        if value is not MISSING:
            return value
        epoch = local.epoch
        try:
            with core.guard:
                data, pttl = await S_READ(core.redis, (rkey,))
        except RedisUnavailable as exc:
            core.failed(exc)
            return default
        if data is None:
            core.stats.misses += 1
            return default
        try:
            entry = core.entries.split(data)
            value = core.entries.decode(entry.payload, type_)
        except CodecError:
            core.stats.decode_errors += 1
            core.stats.misses += 1
            return default
        fresh = fresh_ms(int(pttl), entry.stale_ms)
        if fresh <= 0 and not allow_stale:
            core.stats.misses += 1
            return default
        core.stats.hits += 1
        core.local_put(rkey, entry, int(pttl), fresh, epoch)
        return value

    async def get_many(self, keys: Iterable[str], type_: Any) -> dict[str, Any]:
        """See ``CacheService.get_many``."""
        core = self._core
        found, pending = self._from_local(list(dict.fromkeys(keys)), type_)
        if not pending:
            return found
        by_shard: dict[str, list[str]] = {}
        for _, rkey in pending:
            by_shard.setdefault(shard_root(rkey), []).append(rkey)
        try:
            fetched = await self._fetch(by_shard)
        except RedisUnavailable as exc:
            core.failed(exc)
            return found
        for key, rkey in pending:
            data = fetched[rkey]
            if data is None:
                core.stats.misses += 1
                continue
            value = await self.get_entry(rkey, data, MISSING, type_, False)
            if value is not MISSING:
                found[key] = value
        return found

    def _from_local(
        self, wanted: list[str], type_: Any
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """The local tier's hits as ``{key: value}``, and the (key, rkey) pairs it lacks."""
        core = self._core
        found: dict[str, Any] = {}
        pending: list[tuple[str, str]] = []
        local = core.local
        if local is not None and not local.active:
            core.ensure_listener()
        for key in wanted:
            rkey = core.layout.redis_key(key)
            hit = local.get(rkey) if local is not None else None
            if hit is not None:
                with contextlib.suppress(CodecError):
                    found[key] = core.entries.decode(hit.payload, type_)
                    core.stats.local_hits += 1
                    continue
            pending.append((key, rkey))
        return found, pending

    async def _fetch(self, by_shard: dict[str, list[str]]) -> dict[str, Any]:
        """``MGET`` the keys of every shard: one call, or one per slot (pipelined or concurrent)."""
        core = self._core
        fetched: dict[str, Any] = {}
        with core.guard:
            if len(by_shard) == 1:
                (rkeys,) = by_shard.values()
                fetched.update(zip(rkeys, await core.redis.mget(rkeys), strict=True))
            elif core.cluster:  # one MGET per slot, concurrently
                groups = list(by_shard.values())
                replies = await asyncio.gather(*[core.redis.mget(g) for g in groups])
                for rkeys, reply in zip(groups, replies, strict=True):
                    fetched.update(zip(rkeys, reply, strict=True))
            else:  # one MGET per slot, one round trip
                async with core.redis.pipeline(transaction=False) as pipe:
                    for rkeys in by_shard.values():
                        pipe.mget(rkeys)
                    replies = await pipe.execute()
                for rkeys, reply in zip(by_shard.values(), replies, strict=True):
                    fetched.update(zip(rkeys, reply, strict=True))
        return fetched

    async def exists(self, key: str) -> bool:
        core = self._core
        try:
            with core.guard:
                return bool(await core.redis.exists(core.layout.redis_key(key)))
        except RedisUnavailable as exc:
            core.failed(exc)
            return False

    async def ttl(self, key: str) -> float | None:
        core = self._core
        try:
            with core.guard:
                pttl, stale_ms = await S_TTL(core.redis, (core.layout.redis_key(key),))
        except RedisUnavailable as exc:
            core.failed(exc)
            return None
        pttl = int(pttl)
        if pttl == -2:
            return None
        if pttl == -1:
            return NO_EXPIRY
        return max(0.0, (pttl - int(stale_ms)) / 1000)
