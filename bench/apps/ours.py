"""Our stateless routes: cache (Redis hit, local-tier hit, HTTP response cache) and rate limits.

No app-wide middleware: ``rate_limit`` is a dependency and writes its own
``RateLimit`` headers. ``/redis`` is one ``GET`` on the toolkit client, the
same stack as the other routes; ``/redis-dep`` is the same ``GET`` with the client
from a FastAPI dependency, which shows what one ``Depends`` costs a route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI

from app.api.deps import RedisDep
from app.api.problems import install_problem_handlers
from app.core.redis import get_redis, redis_lifespan
from app.middleware.http_cache import HttpCacheRoute, cache_response
from app.middleware.rate_limit import rate_limit
from app.services.cache import CacheService, LocalCache, cached
from bench.common import SMALL, SMALL_BYTES

KEY = "bench:http:value"
ONE = "1000000/second"
THREE = "burst=1000000/second;minute=100000000/minute;day=1000000000/day"
services: dict[str, CacheService] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    redis = get_redis()
    await redis.set(KEY, SMALL_BYTES)
    services["redis"] = CacheService(redis, namespace="bench.http")
    local = services["local"] = CacheService(
        redis, namespace="bench.http.local", local=LocalCache()
    )
    await local.start()
    yield
    for service in services.values():
        await service.aclose()


app = FastAPI(lifespan=redis_lifespan(lifespan))
install_problem_handlers(app)


@cached(ttl=3600, cache=lambda: services["redis"])
async def load_item() -> dict[str, Any]:
    return SMALL


@cached(ttl=3600, cache=lambda: services["local"])
async def load_item_local() -> dict[str, Any]:
    return SMALL


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/redis")
async def one_get() -> dict[str, Any]:
    return orjson.loads(await get_redis().get(KEY))


@app.get("/redis-dep")
async def one_get_dep(redis: RedisDep) -> dict[str, Any]:
    """``/redis`` written the FastAPI way: the client from a dependency (``RedisDep``)."""
    return orjson.loads(await redis.get(KEY))


@app.get("/cached")
async def cached_redis() -> dict[str, Any]:
    return await load_item()


@app.get("/cached-local")
async def cached_local() -> dict[str, Any]:
    return await load_item_local()


@app.get("/limited", dependencies=[Depends(rate_limit(ONE))])
async def limited() -> dict[str, Any]:
    return SMALL


@app.get("/limited3", dependencies=[Depends(rate_limit(THREE))])
async def limited3() -> dict[str, Any]:
    return SMALL


router = APIRouter(route_class=HttpCacheRoute)


@router.get("/http-cached")
@cache_response(ttl=3600)
async def http_cached() -> dict[str, Any]:
    return SMALL


app.include_router(router)
