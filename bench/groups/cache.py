"""Cache reads and writes: ours against cashews, aiocache, fastapi-cache2, fastapi-redis-sdk
and fastapi-alcazaba, on small (~100 B) and large (~50 KB) values.

Baselines: a hit is divided by a raw ``GET`` of the same value, a write by a raw
``SET EX``, and a miss that fills the cache by the raw two-round-trip floor
``GET`` (miss) + ``SET EX``. Libraries that serialize get the Python object;
raw commands and the byte backends (fastapi-cache2's and alcazaba's
``RedisBackend``) get the JSON bytes. Peers are set up as their READMEs show,
each on its own redis.asyncio client from the same URL (cashews with
``max_connections=50``; its default pool row shows what the default costs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bench.common import (
    LARGE,
    LARGE_BYTES,
    SMALL,
    SMALL_BYTES,
    closing,
    raw_client,
    toolkit_client,
    unique_names,
)
from bench.harness import Case, Op

SIZES = {"small": (SMALL, SMALL_BYTES), "large": (LARGE, LARGE_BYTES)}
TTL = 3600


# -- raw baselines ------------------------------------------------------------------


def raw_get(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        r = raw_client(url)
        key = f"bench:raw:{size}"
        await r.set(key, SIZES[size][1], ex=TTL)
        async with closing(r):
            yield lambda: r.get(key)

    return make


def raw_set_ex(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        r = raw_client(url)
        key, data = f"bench:raw:set:{size}", SIZES[size][1]
        async with closing(r):
            yield lambda: r.set(key, data, ex=60)

    return make


@asynccontextmanager
async def raw_miss_fill(url: str) -> AsyncIterator[Op]:
    """The floor of a cache miss: GET (nothing there), compute, SET EX: two round trips."""
    r = raw_client(url)
    name = unique_names("bench:raw:miss")

    async def op() -> None:
        key = name()
        if await r.get(key) is None:
            await r.set(key, SMALL_BYTES, ex=60)

    async with closing(r):
        yield op


# -- ours -------------------------------------------------------------------------


def ours_get(size: str, *, plain_client: bool = False) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.cache import CacheService

        r = raw_client(url) if plain_client else toolkit_client(url)
        svc = CacheService(r, namespace="bench")
        await svc.set(size, SIZES[size][0], ttl=TTL)
        async with closing(r):
            yield lambda: svc.get(size)

    return make


def ours_set(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.cache import CacheService

        r = toolkit_client(url)
        svc = CacheService(r, namespace="bench")
        key, value = f"set-{size}", SIZES[size][0]
        async with closing(r):
            yield lambda: svc.set(key, value, ttl=60)

    return make


@asynccontextmanager
async def ours_cached_hit(url: str) -> AsyncIterator[Op]:
    from app.services.cache import CacheService, cached

    r = toolkit_client(url)
    svc = CacheService(r, namespace="bench")

    @cached(ttl=TTL, cache=svc)
    async def load_user(user_id: int) -> dict[str, Any]:
        return SMALL

    await load_user(1)
    async with closing(r):
        yield lambda: load_user(1)


@asynccontextmanager
async def ours_local_hit(url: str) -> AsyncIterator[Op]:
    from app.services.cache import CacheService, LocalCache

    r = toolkit_client(url)
    svc = CacheService(r, namespace="bench.local", local=LocalCache())
    if not await svc.start():
        raise RuntimeError("the local tier's invalidation listener did not subscribe")
    await svc.set("small", SMALL, ttl=TTL)
    await svc.get("small")  # fills the local tier
    async with closing(r):
        try:
            yield lambda: svc.get("small")
        finally:
            await svc.aclose()


@asynccontextmanager
async def ours_get_or_set_miss(url: str) -> AsyncIterator[Op]:
    from app.services.cache import CacheService

    r = toolkit_client(url)
    svc = CacheService(r, namespace="bench.miss")
    name = unique_names("k")

    async def compute() -> dict[str, Any]:
        return SMALL

    async with closing(r):
        yield lambda: svc.get_or_set(name(), compute, ttl=60)


# -- cashews ----------------------------------------------------------------------


@asynccontextmanager
async def _cashews(url: str, **options: Any) -> AsyncIterator[Any]:
    from cashews import Cache

    cache = Cache()
    cache.setup(url, **options)
    await cache.init()
    try:
        yield cache
    finally:
        await cache.close()


def cashews_get(size: str, **options: Any) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        async with _cashews(url, **options) as cache:
            await cache.set(f"bench:cashews:{size}", SIZES[size][0], expire=TTL)
            yield lambda: cache.get(f"bench:cashews:{size}")

    return make


@asynccontextmanager
async def cashews_set(url: str) -> AsyncIterator[Op]:
    async with _cashews(url, max_connections=50) as cache:
        yield lambda: cache.set("bench:cashews:set", SMALL, expire=60)


@asynccontextmanager
async def cashews_decorator_hit(url: str) -> AsyncIterator[Op]:
    async with _cashews(url, max_connections=50) as cache:

        @cache(ttl=TTL)
        async def load_user(user_id: int) -> dict[str, Any]:
            return SMALL

        await load_user(1)
        yield lambda: load_user(1)


# -- aiocache ---------------------------------------------------------------------


@asynccontextmanager
async def _aiocache(url: str) -> AsyncIterator[Any]:
    from urllib.parse import urlsplit

    from aiocache import RedisCache
    from aiocache.serializers import JsonSerializer

    parts = urlsplit(url)
    cache = RedisCache(endpoint=parts.hostname, port=parts.port, serializer=JsonSerializer())
    try:
        yield cache
    finally:
        await cache.close()


def aiocache_get(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        async with _aiocache(url) as cache:
            await cache.set(f"bench:aiocache:{size}", SIZES[size][0], ttl=TTL)
            yield lambda: cache.get(f"bench:aiocache:{size}")

    return make


@asynccontextmanager
async def aiocache_set(url: str) -> AsyncIterator[Op]:
    async with _aiocache(url) as cache:
        yield lambda: cache.set("bench:aiocache:set", SMALL, ttl=60)


@asynccontextmanager
async def aiocache_decorator_hit(url: str) -> AsyncIterator[Op]:
    from urllib.parse import urlsplit

    from aiocache import Cache, cached
    from aiocache.serializers import JsonSerializer

    parts = urlsplit(url)

    @cached(
        ttl=TTL,
        cache=Cache.REDIS,
        endpoint=parts.hostname,
        port=parts.port,
        serializer=JsonSerializer(),
    )
    async def load_user(user_id: int) -> dict[str, Any]:
        return SMALL

    await load_user(1)
    try:
        yield lambda: load_user(1)
    finally:
        await load_user.cache.close()  # type: ignore[attr-defined]


# -- fastapi-cache2 -----------------------------------------------------------------


def fc2_get(size: str, *, with_ttl: bool = False) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from fastapi_cache.backends.redis import RedisBackend

        r = raw_client(url)
        backend = RedisBackend(r)
        key = f"bench:fc2:{size}"
        await backend.set(key, SIZES[size][1], expire=TTL)
        async with closing(r):
            yield (lambda: backend.get_with_ttl(key)) if with_ttl else (lambda: backend.get(key))

    return make


@asynccontextmanager
async def fc2_set(url: str) -> AsyncIterator[Op]:
    from fastapi_cache.backends.redis import RedisBackend

    r = raw_client(url)
    backend = RedisBackend(r)
    async with closing(r):
        yield lambda: backend.set("bench:fc2:set", SMALL_BYTES, expire=60)


@asynccontextmanager
async def fc2_decorator_hit(url: str) -> AsyncIterator[Op]:
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend
    from fastapi_cache.decorator import cache

    r = raw_client(url)
    FastAPICache.reset()  # init() is once per process otherwise; each case has its own client
    FastAPICache.init(RedisBackend(r), prefix="bench-fc2")

    @cache(expire=TTL)
    async def load_user(user_id: int) -> dict[str, Any]:
        return SMALL

    await load_user(1)
    async with closing(r):
        yield lambda: load_user(1)


# -- fastapi-redis-sdk ------------------------------------------------------------------


def sdk_get(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from redis_fastapi import CacheBackend

        r = raw_client(url)
        backend = CacheBackend(r)
        await backend.set(f"bench:{size}", SIZES[size][0], ttl=TTL)
        async with closing(r):
            yield lambda: backend.get(f"bench:{size}")

    return make


@asynccontextmanager
async def sdk_set(url: str) -> AsyncIterator[Op]:
    from redis_fastapi import CacheBackend

    r = raw_client(url)
    backend = CacheBackend(r)
    async with closing(r):
        yield lambda: backend.set("bench:set", SMALL, ttl=60)


# -- fastapi-alcazaba -----------------------------------------------------------------


def alcazaba_get(size: str) -> Any:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from fastapi_alcazaba.backends.redis import RedisBackend

        r = raw_client(url)
        backend = RedisBackend(r)
        key = f"bench:alcazaba:{size}"
        await backend.set(key, SIZES[size][1], expire=TTL)
        async with closing(r):
            yield lambda: backend.get(key)

    return make


@asynccontextmanager
async def alcazaba_set(url: str) -> AsyncIterator[Op]:
    from fastapi_alcazaba.backends.redis import RedisBackend

    r = raw_client(url)
    backend = RedisBackend(r)
    async with closing(r):
        yield lambda: backend.set("bench:alcazaba:set", SMALL_BYTES, expire=60)


@asynccontextmanager
async def alcazaba_decorator_hit(url: str) -> AsyncIterator[Op]:
    from fastapi_alcazaba import Cache
    from fastapi_alcazaba.backends.redis import RedisBackend

    r = raw_client(url)
    cache = Cache(RedisBackend(r), prefix="bench-alcazaba", expire=TTL)

    @cache.cached(expire=TTL)
    async def load_user(user_id: int) -> dict[str, Any]:
        return SMALL

    await load_user(1)
    async with closing(r):
        yield lambda: load_user(1)


@asynccontextmanager
async def alcazaba_get_or_set_hit(url: str) -> AsyncIterator[Op]:
    from fastapi_alcazaba import Cache
    from fastapi_alcazaba.backends.redis import RedisBackend

    r = raw_client(url)
    cache = Cache(RedisBackend(r), prefix="bench-alcazaba", expire=TTL)

    async def compute() -> dict[str, Any]:
        return SMALL

    await cache.get_or_set("user:1", compute)
    async with closing(r):
        yield lambda: cache.get_or_set("user:1", compute)


def cases() -> list[Case]:
    get_s, get_l, set_s, set_l = "raw GET", "raw GET, large", "raw SET EX", "raw SET EX, large"
    return [
        Case(get_s, raw_get("small")),
        Case(get_l, raw_get("large")),
        Case(set_s, raw_set_ex("small")),
        Case(set_l, raw_set_ex("large")),
        Case("raw GET miss + SET EX", raw_miss_fill, note="the floor of a miss that fills the cache: 2 round trips"),
        # ours
        Case("ours CacheService.get hit", ours_get("small"), get_s),
        Case("ours CacheService.get hit, plain redis.asyncio client", ours_get("small", plain_client=True), get_s,
             note="the service alone: same client as the baseline, without the toolkit pool"),
        Case("ours CacheService.get hit, large", ours_get("large"), get_l,
             note="zlib-compressed above 4 KB by our codec (50 KB of JSON -> a few KB on the wire)"),
        Case("ours CacheService.set", ours_set("small"), set_s,
             note="one EVALSHA: value, tags and the local-tier invalidation message together"),
        Case("ours CacheService.set, large", ours_set("large"), set_l),
        Case("ours @cached hit", ours_cached_hit, get_s),
        Case("ours local-tier hit", ours_local_hit, get_s,
             note="LocalCache() defaults: entries served up to 1 s, then re-read from Redis"),
        Case("ours get_or_set miss", ours_get_or_set_miss, "raw GET miss + SET EX",
             note="fresh key per call: read, lease, compute, store"),
        # peers
        Case("cashews get", cashews_get("small", max_connections=50), get_s),
        Case("cashews get, default pool (Blocking, 10)", cashews_get("small"), get_s,
             note="cashews' default BlockingConnectionPool(max_connections=10)"),
        Case("cashews get, large", cashews_get("large", max_connections=50), get_l),
        Case("cashews set", cashews_set, set_s),
        Case("cashews @cache hit", cashews_decorator_hit, get_s),
        Case("aiocache get", aiocache_get("small"), get_s),
        Case("aiocache get, large", aiocache_get("large"), get_l),
        Case("aiocache set", aiocache_set, set_s),
        Case("aiocache @cached hit", aiocache_decorator_hit, get_s),
        Case("fastapi-cache2 backend get", fc2_get("small"), get_s),
        Case("fastapi-cache2 backend get, large", fc2_get("large"), get_l),
        Case("fastapi-cache2 get_with_ttl", fc2_get("small", with_ttl=True), get_s,
             note="MULTI/EXEC of TTL + GET: what its @cache does per call"),
        Case("fastapi-cache2 @cache hit", fc2_decorator_hit, get_s),
        Case("fastapi-cache2 backend set", fc2_set, set_s),
        Case("fastapi-redis-sdk CacheBackend.get", sdk_get("small"), get_s),
        Case("fastapi-redis-sdk CacheBackend.get, large", sdk_get("large"), get_l),
        Case("fastapi-redis-sdk CacheBackend.set", sdk_set, set_s),
        Case("alcazaba backend get", alcazaba_get("small"), get_s),
        Case("alcazaba backend get, large", alcazaba_get("large"), get_l),
        Case("alcazaba backend set", alcazaba_set, set_s),
        Case("alcazaba @cache hit", alcazaba_decorator_hit, get_s),
        Case("alcazaba get_or_set hit", alcazaba_get_or_set_hit, get_s),
    ]  # fmt: skip
