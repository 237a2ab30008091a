"""Lock acquire + release pairs: ours against redis-py's Lock, pottery's AIORedlock,
aioredlock and fastapi-alcazaba.

Baseline: the raw pair ``SET NX PX`` + ``EVALSHA`` compare-and-delete (two round
trips), the least a safe lock costs. Each operation builds its lock object
(as code does per request), takes it without waiting and releases it. Lock
names cycle through 1,000 values, so names are reused like real resource
names but never contended (a name comes back only after 1,000 operations).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from bench.common import closing, raw_client, rotating_names, toolkit_client
from bench.harness import Case, Op

RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
LEASE = 10


class NotAcquired(RuntimeError):
    """A lock that should have been free was not: the measurement would be wrong."""


@asynccontextmanager
async def raw_pair(url: str) -> AsyncIterator[Op]:
    import secrets

    r = raw_client(url)
    sha = await r.script_load(RELEASE)
    name = rotating_names("bench:rawlock")

    async def op() -> None:
        key, token = name(), secrets.token_hex(16)
        if not await r.set(key, token, nx=True, px=LEASE * 1000):
            raise NotAcquired(key)
        await r.evalsha(sha, 1, key, token)

    async with closing(r):
        yield op


def ours(*, plain: bool = False) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.locks import RedisLock

        r = raw_client(url) if plain else toolkit_client(url)
        name = rotating_names("bench")

        async def op() -> None:
            lock = RedisLock(r, name(), timeout=LEASE)
            if not await lock.acquire():
                raise NotAcquired(lock.name)
            await lock.release()

        async with closing(r):
            yield op

    return make


@asynccontextmanager
async def redis_py_lock(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    name = rotating_names("bench:redispy-lock")

    async def op() -> None:
        lock = r.lock(name(), timeout=LEASE)
        if not await lock.acquire(blocking=False):
            raise NotAcquired(lock.name)
        await lock.release()

    async with closing(r):
        yield op


@asynccontextmanager
async def pottery_redlock(url: str) -> AsyncIterator[Op]:
    from pottery import AIORedlock

    r = raw_client(url)
    name = rotating_names("bench:pottery")

    async def op() -> None:
        lock = AIORedlock(key=name(), masters={r}, auto_release_time=LEASE)
        if not await lock.acquire(blocking=False):
            raise NotAcquired(lock.key)
        await lock.release()

    async with closing(r):
        yield op


@asynccontextmanager
async def aioredlock_pair(url: str) -> AsyncIterator[Op]:
    from aioredlock import Aioredlock

    manager = Aioredlock([url], retry_count=1)
    name = rotating_names("bench:aioredlock")

    async def op() -> None:
        lock = await manager.lock(name(), lock_timeout=LEASE)
        await manager.unlock(lock)

    try:
        yield op
    finally:
        await manager.destroy()


def alcazaba_lock(*, renew: bool) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from fastapi_alcazaba import Cache
        from fastapi_alcazaba.backends.redis import RedisBackend

        r = raw_client(url)
        cache = Cache(RedisBackend(r), prefix="bench-alcazaba")
        name = rotating_names("lock")

        async def op() -> None:
            lock = cache.lock(name(), ttl=LEASE, renew=renew)
            if not await lock.acquire():
                raise NotAcquired(lock.name)
            await lock.release()

        async with closing(r):
            yield op

    return make


def cases() -> list[Case]:
    base = "raw SET NX PX + EVALSHA release"
    return [
        Case(base, raw_pair, note="2 round trips: the floor of a safe lock"),
        Case("ours RedisLock acquire+release", ours(), base,
             note="acquire also issues the fencing token (same script)"),
        Case("ours RedisLock, plain redis.asyncio client", ours(plain=True), base),
        Case("redis-py asyncio Lock acquire+release", redis_py_lock, base),
        Case("pottery AIORedlock acquire+release", pottery_redlock, base, note="one master"),
        Case("aioredlock lock+unlock", aioredlock_pair, base,
             note="one instance; runs on aioredis 1.3 (its dependency), not redis-py"),
        Case("alcazaba lock acquire+release", alcazaba_lock(renew=True), base,
             note="its default renew=True starts a renewal task per acquisition"),
        Case("alcazaba lock, renew=False", alcazaba_lock(renew=False), base),
    ]  # fmt: skip
