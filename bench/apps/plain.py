"""The reference: a bare endpoint and one raw ``GET`` on redis.asyncio's defaults."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from redis.asyncio import Redis

from bench.common import SMALL, SMALL_BYTES

KEY = "bench:http:value"
state: dict[str, Redis] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    r = state["redis"] = Redis.from_url(os.environ["REDIS_URL"])
    await r.set(KEY, SMALL_BYTES)
    yield
    await r.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/redis")
async def one_get() -> dict[str, Any]:
    return orjson.loads(await state["redis"].get(KEY))
