"""Writes: one entry with its tags in one script, batches, deletes and new lifetimes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError

from app.core.errors import RedisUnavailable
from app.core.guard import as_text
from app.core.keys import escape
from app.services.cache._core import CacheCore
from app.services.cache._keys import lease_keys, shard_root, tag_key
from app.services.cache._policy import ms
from app.services.cache._scripts import S_DELETE, S_EXPIRE, S_SET

__all__ = ["CacheWrites"]


class CacheWrites:
    """``set``, ``set_many``, ``delete`` and ``expire``; ``write`` also serves ``get_or_set``."""

    __slots__ = ("_core",)

    def __init__(self, core: CacheCore) -> None:
        self._core = core

    async def set(
        self, rkey: str, value: Any, life_ms: int, stale_ms: int, tags: Iterable[str]
    ) -> bool:
        """See ``CacheService.set``."""
        core = self._core
        etags = tuple(escape(t) for t in tags)
        stored = core.entries.wrap(core.entries.codec.encode(value), stale_ms, 0, etags)
        try:
            await self.write(rkey, stored, life_ms, etags, "")
        except RedisUnavailable as exc:
            core.failed(exc)
            return False
        return True

    async def write(
        self, rkey: str, stored: bytes, life_ms: int, etags: Sequence[str], token: str
    ) -> None:
        """Run cache_set for one entry, then evict it from this process's local tier."""
        core = self._core
        cut = rkey.index("}:") + 1
        root = rkey[:cut]
        keys = [rkey, *lease_keys(rkey)]
        keys.extend(tag_key(root, t) for t in etags)
        message = core.message("k", (rkey,))
        with core.guard:
            await S_SET(
                core.redis,
                keys,
                (stored, life_ms, token, rkey[cut + 1 :], root, core.channel, message),
            )
        core.stats.sets += 1
        if core.local is not None:
            core.local.invalidate_keys((rkey,))

    async def set_many(
        self, items: Mapping[str, Any], life_ms: int, stale_ms: int, tags: Iterable[str]
    ) -> bool:
        """See ``CacheService.set_many`` (*items* is not empty)."""
        core = self._core
        etags = tuple(escape(t) for t in tags)
        calls: list[tuple[list[str], tuple[Any, ...]]] = []
        rkeys: list[str] = []
        for key, value in items.items():
            rkey = core.layout.redis_key(key)
            cut = rkey.index("}:") + 1
            root = rkey[:cut]
            keys = [rkey, *lease_keys(rkey)]
            keys.extend(tag_key(root, t) for t in etags)
            stored = core.entries.wrap(core.entries.codec.encode(value), stale_ms, 0, etags)
            message = core.message("k", (rkey,))
            args = (stored, life_ms, "", rkey[cut + 1 :], root, core.channel, message)
            calls.append((keys, args))
            rkeys.append(rkey)
        try:
            with core.guard:
                if core.cluster:  # cluster pipelines refuse EVALSHA: concurrent calls per node
                    await asyncio.gather(*[S_SET(core.redis, k, a) for k, a in calls])
                else:
                    await self._pipelined_sets(calls)
        except RedisUnavailable as exc:
            core.failed(exc)
            return False
        core.stats.sets += len(calls)
        if core.local is not None:
            core.local.invalidate_keys(rkeys)
        return True

    async def _pipelined_sets(self, calls: Sequence[tuple[list[str], tuple[Any, ...]]]) -> None:
        redis = self._core.redis
        for attempt in (1, 2):
            async with redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(S_SET.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results) or attempt == 2:
                break
            await S_SET.load(redis)  # the server lost its scripts (restart, failover)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def delete(self, keys: Iterable[str]) -> int:
        """See ``CacheService.delete``."""
        core = self._core
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            rkey = core.layout.redis_key(k)
            by_shard.setdefault(shard_root(rkey), []).append(rkey)
        removed = 0
        try:
            for rkeys in by_shard.values():
                message = core.message("k", rkeys)
                with core.guard:
                    removed += int(await S_DELETE(core.redis, rkeys, (core.channel, message)))
                if core.local is not None:
                    core.local.invalidate_keys(rkeys)
        except RedisUnavailable as exc:
            core.failed(exc)
        return removed

    async def expire(self, rkey: str, fresh: float) -> bool:
        """See ``CacheService.expire`` (*fresh*: the new fresh lifetime in seconds)."""
        core = self._core
        cut = rkey.index("}:") + 1
        root, member = rkey[:cut], rkey[cut + 1 :]
        message = core.message("k", (rkey,))
        expected = ""
        try:
            for _ in range(3):
                keys = [rkey]
                if expected:
                    keys.extend(tag_key(root, t) for t in expected.split(" "))
                with core.guard:
                    reply = await S_EXPIRE(
                        core.redis, keys, (ms(fresh), expected, core.channel, message, member)
                    )
                if int(reply[0]) != 2:
                    break
                found = reply[1]
                expected = as_text(found)
        except RedisUnavailable as exc:
            core.failed(exc)
            return False
        if core.local is not None:
            core.local.invalidate_keys((rkey,))
        return int(reply[0]) == 1
