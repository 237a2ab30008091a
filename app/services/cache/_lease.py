"""The lease of the caller computing a value: kept while it computes, released after.

Both are best effort and stay silent when Redis fails: the caller's own call
reports the outage, and a lease that cannot be extended or released expires
on its own.
"""

from __future__ import annotations

import asyncio
import contextlib

from app.core.errors import RedisUnavailable
from app.services.cache._core import CacheCore
from app.services.cache._keys import lease_keys
from app.services.cache._scripts import S_RELEASE

__all__ = ["keep_lease", "release"]


def keep_lease(core: CacheCore, rkey: str, token: str, lease_ms: int) -> asyncio.Task[None]:
    """A task extending the lease every third of it until cancelled or the lease is lost."""

    async def extend() -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)
            with contextlib.suppress(RedisUnavailable):
                with core.guard:
                    owned = await S_RELEASE(core.redis, lease_keys(rkey), (token, lease_ms))
                if not int(owned):
                    return

    return asyncio.get_running_loop().create_task(extend())


async def release(core: CacheCore, rkey: str, token: str, keep_ms: int) -> None:
    """Release the lease and wake the waiters (*keep_ms* 0), or hold it *keep_ms* longer."""
    with contextlib.suppress(RedisUnavailable), core.guard:
        await asyncio.shield(S_RELEASE(core.redis, lease_keys(rkey), (token, keep_ms)))
