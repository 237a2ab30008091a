"""``get_or_set``: serve an entry, or compute it once however many callers miss together.

In one process, concurrent callers of one key share one computation
(``single_flight``). Across processes one caller takes the key's lease and the
others register as waiters in the same script, then block on ``BLPOP`` of the
key's wake-up list until the writer pushes them a token (``_fill``). Stale and
early-refreshed entries are served at once and recomputed by the ``Refresher``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.core.errors import CodecError, RedisUnavailable
from app.core.keys import escape
from app.core.telemetry import outcome
from app.services.cache._core import CacheCore
from app.services.cache._entries import MISSING
from app.services.cache._keys import lease_keys
from app.services.cache._lease import keep_lease, release
from app.services.cache._policy import CachePolicy, TagsArg, fresh_ms
from app.services.cache._refresh import Refresher
from app.services.cache._scripts import HIT, LOCKED, S_LOCK, S_READ
from app.services.cache._writes import CacheWrites

__all__ = ["Flights"]

log = logging.getLogger("app.cache")

Factory = Callable[[], Awaitable[Any]]


class _LeaderGone(Exception):
    """The in-process caller computing a value was cancelled: followers retry."""


class Flights:
    """The miss path of ``get_or_set`` (and ``@cached``) for one service."""

    __slots__ = ("_core", "_inflight", "_refresher", "_writes")

    def __init__(self, core: CacheCore, writes: CacheWrites, refresher: Refresher) -> None:
        self._core = core
        self._writes = writes
        self._refresher = refresher
        self._inflight: dict[str, asyncio.Future[tuple[bytes | None, Any]]] = {}

    async def get_or_set(
        self, rkey: str, factory: Factory, policy: CachePolicy, tags: TagsArg, type_: Any
    ) -> Any:
        """See ``CacheService.get_or_set`` (*rkey* is the entry's Redis key)."""
        core = self._core
        local = core.local
        if local is None and policy.simple:
            try:
                with core.guard:
                    data = await core.redis.get(rkey)
            except RedisUnavailable as exc:
                return await self.single_flight(rkey, factory, policy, tags, type_, exc)
            if data is not None and data[:1] != core.entries.marker:
                try:
                    value = core.entries.decode(data, type_)
                except CodecError:
                    core.stats.decode_errors += 1
                else:
                    core.stats.hits += 1
                    return value
            return await self.after_read(rkey, data, factory, policy, tags, type_)
        if local is not None:
            value = core.local_hit(local, rkey, type_)
            if value is not MISSING:
                return value
        epoch = local.epoch if local is not None else 0
        try:
            with core.guard:
                data, pttl = await S_READ(core.redis, (rkey,))
        except RedisUnavailable as exc:
            return await self.single_flight(rkey, factory, policy, tags, type_, exc)
        if data is not None:
            found = await self.entry_hit(rkey, data, int(pttl), factory, policy, tags, type_, epoch)
            if found is not MISSING:
                return found
        core.stats.misses += 1
        return await self.single_flight(rkey, factory, policy, tags, type_, None)

    async def after_read(
        self,
        rkey: str,
        data: bytes | str | None,
        factory: Factory,
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
    ) -> Any:
        """A simple-policy read that was not a plain hit: a header entry, or a miss."""
        if data is not None and data[:1] == self._core.entries.marker:
            found = await self.entry_hit(rkey, data, None, factory, policy, tags, type_)
            if found is not MISSING:
                return found
        self._core.stats.misses += 1
        return await self.single_flight(rkey, factory, policy, tags, type_, None)

    async def entry_hit(
        self,
        rkey: str,
        data: bytes | str,
        pttl: int | None,
        factory: Factory,
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
        epoch: int = -1,
    ) -> Any:
        """Serve a stored entry (fresh, stale, early refresh); MISSING if unusable."""
        core = self._core
        try:
            entry = core.entries.split(data)
            value = core.entries.decode(entry.payload, type_)
        except CodecError:
            core.stats.decode_errors += 1
            return MISSING
        if entry.stale_ms or policy.beta:
            if pttl is None:
                try:
                    with core.guard:
                        pttl = int(await core.redis.pttl(rkey))
                except RedisUnavailable as exc:
                    core.failed(exc)
                    pttl = -1
            fresh = fresh_ms(pttl, entry.stale_ms)
            if fresh <= 0:
                core.stats.stale_hits += 1
                outcome("stale")
                self._refresher.later(rkey, factory, policy, tags, pttl)
                return value
            if (
                policy.beta
                and entry.delta_ms
                and entry.delta_ms * policy.beta * -math.log(1.0 - random.random()) >= fresh
            ):
                core.stats.early_refreshes += 1
                self._refresher.later(rkey, factory, policy, tags, pttl)
            if epoch >= 0 and pttl is not None:
                core.local_put(rkey, entry, pttl, fresh, epoch)
        elif epoch >= 0 and pttl is not None:
            core.local_put(rkey, entry, pttl, fresh_ms(pttl, 0), epoch)
        core.stats.hits += 1
        return value

    async def single_flight(
        self,
        rkey: str,
        factory: Factory,
        policy: CachePolicy,
        tags: TagsArg,
        type_: Any,
        redis_error: RedisUnavailable | None,
    ) -> Any:
        """One computation per key per process; the others share its result."""
        core = self._core
        while True:
            shared = self._inflight.get(rkey)
            if shared is None:
                break
            core.stats.coalesced += 1
            outcome("coalesced")
            try:
                payload, value = await asyncio.shield(shared)
            except _LeaderGone:
                continue
            if payload is None:
                return value
            return core.entries.decode(payload, type_)
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
        self, rkey: str, factory: Factory, type_: Any, redis_error: RedisUnavailable
    ) -> tuple[bytes | None, Any]:
        """Redis is down: run the factory (fail-open); stale local copy if it fails too."""
        core = self._core
        core.failed(redis_error)
        core.stats.fail_open += 1
        core.stats.factory_calls += 1
        try:
            value = await factory()
        except Exception:
            stale = core.local.peek_stale(rkey) if core.local is not None else None
            if stale is None:
                raise
            core.stats.stale_if_error += 1
            return None, core.entries.decode(stale.payload, type_)
        return None, value

    async def _fill(
        self, rkey: str, factory: Factory, policy: CachePolicy, tags: TagsArg, type_: Any
    ) -> tuple[bytes | None, Any]:
        """The cross-process part of a miss: lease, or wait to be woken, or time out."""
        core = self._core
        loop = asyncio.get_running_loop()
        token = os.urandom(8).hex()
        keys = (rkey, *lease_keys(rkey))
        deadline = loop.time() + policy.wait_timeout
        waited = False
        while True:
            try:
                with core.guard:
                    reply = await S_LOCK(core.redis, keys, (token, policy.lease_ms, "1"))
            except RedisUnavailable as exc:
                return await self._compute_offline(rkey, factory, type_, exc)
            status = int(reply[0])
            if status == HIT:
                try:
                    entry = core.entries.split(reply[1])
                    value = core.entries.decode(entry.payload, type_)
                except CodecError:
                    core.stats.decode_errors += 1
                    return await self._compute_and_store(rkey, factory, policy, tags, None)
                core.stats.hits += 1
                return (
                    entry.payload if isinstance(entry.payload, bytes) else entry.payload.encode()
                ), value
            if status == LOCKED:
                return await self._compute_and_store(rkey, factory, policy, tags, token)
            if not waited:
                waited = True
                core.stats.stampede_waits += 1
                outcome("waited")
            remaining = deadline - loop.time()
            if remaining <= 0:
                core.stats.wait_timeouts += 1
                return await self._compute_and_store(rkey, factory, policy, tags, None)
            lease_left = max(int(reply[1]), 10) / 1000
            block = max(0.01, min(remaining, lease_left + 0.01, core.max_block))
            try:
                with core.guard:
                    woken = await core.redis.blpop([keys[3]], timeout=block)
            except RedisUnavailable as exc:
                return await self._compute_offline(rkey, factory, type_, exc)
            if woken is not None:
                core.stats.wakeups += 1

    async def _compute_and_store(
        self,
        rkey: str,
        factory: Factory,
        policy: CachePolicy,
        tags: TagsArg,
        token: str | None,
    ) -> tuple[bytes | None, Any]:
        """Run the factory (holding the lease when *token*), store the value, wake waiters."""
        core = self._core
        keeper = keep_lease(core, rkey, token, policy.lease_ms) if token else None
        core.stats.factory_calls += 1
        outcome("computed")
        started = time.perf_counter()
        try:
            value = await factory()
        except BaseException:
            if keeper is not None:
                keeper.cancel()
            if token:
                await release(core, rkey, token, 0)
            raise
        if keeper is not None:
            keeper.cancel()
        delta_ms = max(1, round((time.perf_counter() - started) * 1000)) if policy.beta else 0
        try:
            payload = core.entries.codec.encode(value)
        except CodecError as exc:
            log.warning("cache %r: value for %s not cached: %s", core.namespace, rkey, exc)
            if token:
                await release(core, rkey, token, 0)
            return None, value
        etags = tuple(escape(t) for t in (tags() if callable(tags) else tags))
        stored = core.entries.wrap(payload, policy.stale_ms, delta_ms, etags)
        try:
            await self._writes.write(rkey, stored, policy.life_ms, etags, token or "")
        except RedisUnavailable as exc:
            core.failed(exc)
        return payload, value
