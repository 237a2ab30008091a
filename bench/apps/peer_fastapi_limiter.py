"""fastapi-limiter, both APIs: 0.2 (pyrate-limiter RedisBucket) and 0.1.6 (from the side copy)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import Duration, Limiter, Rate
from pyrate_limiter.buckets.redis_bucket import RedisBucket
from redis.asyncio import Redis

from bench.common import SMALL, fastapi_limiter_016

HUGE = 10**9
v016 = fastapi_limiter_016()
limiter_02 = RateLimiter(limiter=None)  # its Limiter needs the Redis bucket: set at startup


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    redis = Redis.from_url(os.environ["REDIS_URL"])
    bucket = await RedisBucket.init([Rate(HUGE, Duration.MINUTE)], redis, "bench:http:pyrate")
    limiter_02.limiter = Limiter(bucket)
    await v016.FastAPILimiter.init(redis)
    yield
    limiter_02.limiter.close()
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/limited", dependencies=[Depends(limiter_02)])
async def limited() -> dict[str, Any]:
    return SMALL


@app.get("/limited016", dependencies=[Depends(v016.RateLimiter(times=HUGE, minutes=1))])
async def limited016() -> dict[str, Any]:
    return SMALL
