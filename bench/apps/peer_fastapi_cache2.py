"""fastapi-cache2: ``@cache(expire=...)`` on an endpoint, as its README shows."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.backends.redis import RedisBackend
from fastapi_cache.decorator import cache
from redis.asyncio import Redis

from bench.common import SMALL


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    redis = Redis.from_url(os.environ["REDIS_URL"])
    FastAPICache.init(RedisBackend(redis), prefix="bench-fc2-http")
    yield
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/cached")
@cache(expire=3600)
async def cached() -> dict[str, Any]:
    return SMALL
