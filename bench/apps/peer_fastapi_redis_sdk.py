"""fastapi-redis-sdk, set up as its README shows (``FastAPIRedis(app)...``).

Its caching and rate-limiting setup adds two middlewares to every route of
the app, which ``/bare`` here pays too.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from redis_fastapi import FastAPIRedis, cache, rate_limit

from bench.common import SMALL

app = FastAPI()
FastAPIRedis(app).lifespan().caching().rate_limiting()


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/cached", dependencies=[Depends(cache(ttl=3600))])
async def cached() -> dict[str, Any]:
    return SMALL


@app.get("/limited", dependencies=[Depends(rate_limit(limit=10**9, window=60))])
async def limited() -> dict[str, Any]:
    return SMALL
