"""Background refreshes: stale-while-revalidate and early (XFetch) refresh of one entry.

One refresh per key per process; across processes the refresh runs under the
entry's lease, so one caller in the whole deployment recomputes while every
other keeps serving the stale value.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.core.errors import RedisUnavailable
from app.core.keys import escape
from app.services.cache._core import CacheCore
from app.services.cache._keys import lease_keys
from app.services.cache._lease import keep_lease, release
from app.services.cache._local import cancel_and_wait
from app.services.cache._policy import CachePolicy, TagsArg
from app.services.cache._scripts import LOCKED, S_LOCK
from app.services.cache._writes import CacheWrites

__all__ = ["Refresher"]

log = logging.getLogger("app.cache")


class Refresher:
    """Starts, tracks and stops the background refreshes of one service."""

    __slots__ = ("_core", "_refreshing", "_writes", "background")

    def __init__(self, core: CacheCore, writes: CacheWrites) -> None:
        self._core = core
        self._writes = writes
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[Any]] = set()

    def later(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        read_pttl: int,
    ) -> None:
        """Start one background refresh of *rkey* in this process (if none is running).

        *read_pttl* is the value's PTTL when it was read (negative: unknown). The refresh
        does nothing if the value has been written since, by a refresh in another
        instance that finished between that read and this one's lease.
        """
        if rkey in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(
            self._refresh(rkey, factory, policy, tags, read_pttl)
        )
        self._refreshing[rkey] = task
        self.background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.background.discard(t)
            if self._refreshing.get(rkey) is t:
                del self._refreshing[rkey]

        task.add_done_callback(done)

    async def wait_idle(self) -> None:
        """Wait until every background refresh started so far has finished."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)

    async def cancel_all(self) -> None:
        await asyncio.gather(*[cancel_and_wait(task) for task in list(self.background)])

    async def _refresh(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        read_pttl: int,
    ) -> None:
        core = self._core
        token = os.urandom(8).hex()
        keys = (rkey, *lease_keys(rkey))
        seen = read_pttl if read_pttl >= 0 else ""
        try:
            with core.guard:
                reply = await S_LOCK(core.redis, keys, (token, policy.lease_ms, "0", seen))
        except RedisUnavailable as exc:
            core.failed(exc)
            return
        if int(reply[0]) != LOCKED:
            return  # another caller (maybe in another process) is refreshing, or has
        core.stats.refreshes += 1
        try:
            await self._compute_and_store(rkey, factory, policy, tags, token)
        except Exception as exc:
            core.stats.refresh_errors += 1
            log.warning(
                "cache %r: background refresh of %s failed (%s: %s); serving the stale "
                "value, next attempt in %.1fs",
                core.namespace,
                rkey,
                type(exc).__name__,
                exc,
                min(policy.lease_ms, 1000) / 1000,
            )

    async def _compute_and_store(
        self,
        rkey: str,
        factory: Callable[[], Awaitable[Any]],
        policy: CachePolicy,
        tags: TagsArg,
        token: str,
    ) -> None:
        core = self._core
        keeper = keep_lease(core, rkey, token, policy.lease_ms)
        core.stats.factory_calls += 1
        started = time.perf_counter()
        try:
            value = await factory()
        except BaseException:
            keeper.cancel()
            # Hold the lease a little: a failing origin is retried once a second, not per hit.
            await release(core, rkey, token, min(policy.lease_ms, 1000))
            raise
        keeper.cancel()
        delta_ms = max(1, round((time.perf_counter() - started) * 1000)) if policy.beta else 0
        etags = tuple(escape(t) for t in (tags() if callable(tags) else tags))
        stored = core.entries.wrap(
            core.entries.codec.encode(value), policy.stale_ms, delta_ms, etags
        )
        try:
            await self._writes.write(rkey, stored, policy.life_ms, etags, token)
        except RedisUnavailable as exc:
            core.failed(exc)
