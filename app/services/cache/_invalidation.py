"""Removing many entries at once: by tag (tag sets, one script per shard), by pattern, all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from app.core.errors import RedisUnavailable
from app.core.guard import as_text
from app.core.keys import bound_pattern, escape, escape_glob
from app.core.redis import scan_keys
from app.services.cache._core import CacheCore
from app.services.cache._keys import glob_to_escaped, tag_key
from app.services.cache._local import encode_message, pattern_predicate
from app.services.cache._scripts import S_TAGS

__all__ = ["CacheInvalidation"]

_TAG_BUDGET: Final = 5000


class CacheInvalidation:
    """``invalidate_tags``, ``invalidate`` (pattern) and ``clear`` of one namespace."""

    __slots__ = ("_core",)

    def __init__(self, core: CacheCore) -> None:
        self._core = core

    async def invalidate_tags(self, tags: Iterable[str]) -> int:
        """See ``CacheService.invalidate_tags``."""
        core = self._core
        etags = [escape(t) for t in tags]
        if not etags:
            return 0

        async def drain(root: str) -> int:
            keys = [tag_key(root, t) for t in etags]
            removed = 0
            while True:
                with core.guard:
                    done, left = await S_TAGS(core.redis, keys, (_TAG_BUDGET, *[root] * len(keys)))
                removed += int(done)
                if not int(left):
                    return removed

        removed = 0
        try:
            counts = await asyncio.gather(*[drain(root) for root in core.layout.shard_roots])
            removed = sum(counts)
            await self._broadcast("t", etags)
        except RedisUnavailable as exc:
            core.failed(exc)
        if core.local is not None:
            core.local.invalidate_tags(etags)
        core.stats.invalidations += 1
        return removed

    async def invalidate(self, pattern: str) -> int:
        """See ``CacheService.invalidate``."""
        core = self._core
        glob = glob_to_escaped(bound_pattern(pattern, what="cache pattern"))
        keep = pattern_predicate(glob)
        # The server matches at most one star of the caller's (its matcher backtracks:
        # exponential on the embedded store and on Redis before 7.0.9); keep() checks the rest.
        first_star = glob.find("*")
        server_glob = glob if glob.count("*") <= 1 else glob[: first_star + 1]
        match = f"{escape_glob(core.layout.root)}{{*}}:{server_glob}"
        removed = 0
        try:
            with core.guard:
                removed = await self._unlink_scanned(match, entries_only=True, keep=keep)
            await self._broadcast("p", (glob,))
        except RedisUnavailable as exc:
            core.failed(exc)
        if core.local is not None:
            core.local.invalidate_matching(pattern_predicate(glob))
        core.stats.invalidations += 1
        return removed

    async def clear(self) -> int:
        """See ``CacheService.clear``."""
        core = self._core
        removed = 0
        try:
            with core.guard:
                removed = await self._unlink_scanned(
                    escape_glob(core.layout.root) + "*", entries_only=False
                )
            await self._broadcast("f", ())
        except RedisUnavailable as exc:
            core.failed(exc)
        if core.local is not None:
            core.local.flush()
        core.stats.invalidations += 1
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
        async for found in scan_keys(self._core.redis, match):
            name = as_text(found)
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
                removed += int(await self._core.redis.unlink(*names))
        return removed

    async def _broadcast(self, op: str, items: Iterable[str]) -> None:
        core = self._core
        if core.channel:
            with core.guard:
                await core.redis.publish(core.channel, encode_message(core.sender, op, items))
