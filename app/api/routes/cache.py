"""Demo routes for the cache, under ``/cache/`` (plus ``GET /stats``).

* ``GET|PUT|DELETE /cache/items/{key}``: the plain ``CacheService`` contract
  (``PUT`` takes ``{"value": ..., "ttl": 60, "stale_ttl": null, "tags": []}``).
* ``GET /cache/users/{user_id}``: a ``@cached`` function returning a pydantic
  model, tagged ``users`` and ``user:{user_id}``; ``X-Origin-Calls`` counts
  how often the (simulated, slow) database ran.
* ``PUT /cache/users/{user_id}``: changes the "database" and invalidates that
  user's entry (``load_user.invalidate``) in Redis and in every worker's local tier.
* ``GET /cache/reports/{name}?delay=0.5``: ``get_or_set`` over a slow origin
  with stampede protection, stale-while-revalidate (fresh 5 s, kept 60 s) and
  early refresh; fire many at once and the origin runs once.
* ``POST /cache/tags/{tag}/invalidate``, ``POST /cache/invalidate?pattern=``,
  ``DELETE /cache``: tag, pattern and namespace invalidation (the last two
  answer 403 unless ``APP_ENV=development`` or ``DEMO_DESTRUCTIVE_ROUTES=true``).
* ``GET /stats``: ``cache.stats()`` of this worker (hits, local hits, stale
  hits, misses, stampede waits, errors, breaker state).

The lifespan registers a ``CacheService`` with a local tier (2 s, 10,000
entries, 32 MiB) as the default, so ``CacheDep`` and ``@cached`` use it. With
Redis down every route still answers from the origin (fail-open).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response
from pydantic import BaseModel, Field

from app.api.deps import CacheDep
from app.api.routes._guards import Destructive
from app.core.errors import ConfigurationError, ToolkitError
from app.core.redis import Lifespan, get_redis
from app.services.cache import MISSING, CacheService, LocalCache, cached, set_default_cache

__all__ = ["ORIGIN_CALLS", "User", "lifespan", "load_user", "router", "setup"]

router = APIRouter(tags=["cache"])

ORIGIN_CALLS: Counter[str] = Counter()
"""How often each simulated origin ran in this process (the demo's evidence)."""

_USERS: dict[int, str] = {}


class User(BaseModel):
    """What the demo "database" returns."""

    id: int
    name: str
    loaded_at: float


class ItemIn(BaseModel):
    value: Any = Field(description="Any JSON value (null included).")
    ttl: float | None = Field(default=60, gt=0, description="Fresh seconds (null: 1 hour).")
    stale_ttl: float | None = Field(
        default=None, gt=0, description="Seconds the entry is kept, stale, after that."
    )
    tags: list[str] = Field(default_factory=list)


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)


@cached(ttl=30, tags=["users", "user:{user_id}"])
async def load_user(user_id: int) -> User:
    """The slow "database" read, cached for 30 s and decoded back to ``User``."""
    ORIGIN_CALLS["users"] += 1
    await asyncio.sleep(0.05)
    return User(id=user_id, name=_USERS.get(user_id, f"user {user_id}"), loaded_at=time.time())


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = CacheService(
        get_redis(), local=LocalCache(max_entries=10_000, max_bytes=32 * 1024 * 1024, ttl=2.0)
    )
    set_default_cache(service)
    app.state.cache = service
    await service.start(timeout=1.0)  # False when Redis is down: it keeps retrying
    try:
        yield
    finally:
        await service.aclose()


lifespan: Lifespan | None = _lifespan


def setup(app: FastAPI) -> None:
    """Nothing to install: the routes use ``CacheDep`` and ``@cached``."""


@router.get("/cache/items/{key}", summary="Read a key (hit tells a miss from a stored null)")
async def get_item(key: str, cache: CacheDep) -> dict[str, Any]:
    value = await cache.get(key, MISSING)
    hit = value is not MISSING
    return {"key": key, "hit": hit, "value": value if hit else None}


@router.put("/cache/items/{key}", summary="Store a key with a TTL, stale TTL and tags")
async def put_item(key: str, item: ItemIn, cache: CacheDep) -> dict[str, Any]:
    try:
        stored = await cache.set(
            key, item.value, item.ttl, tags=item.tags, stale_ttl=item.stale_ttl
        )
    except ConfigurationError as exc:  # the request's arguments, e.g. a stale_ttl below the ttl
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    except ToolkitError:
        raise
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return {"key": key, "stored": stored, "ttl": await cache.ttl(key)}


@router.delete("/cache/items/{key}", summary="Delete a key (every worker's local tier too)")
async def delete_item(key: str, cache: CacheDep) -> dict[str, Any]:
    return {"key": key, "deleted": await cache.delete(key)}


@router.get("/cache/users/{user_id}", summary="@cached read of a pydantic model")
async def get_user(user_id: int, response: Response) -> User:
    user = await load_user(user_id)
    response.headers["X-Origin-Calls"] = str(ORIGIN_CALLS["users"])
    return user


@router.put("/cache/users/{user_id}", summary="Write the 'database' and invalidate the entry")
async def put_user(user_id: int, body: UserIn) -> dict[str, Any]:
    _USERS[user_id] = body.name
    return {"id": user_id, "name": body.name, "invalidated": await load_user.invalidate(user_id)}


@router.get(
    "/cache/reports/{name}",
    summary="get_or_set over a slow origin: stampede control, stale-while-revalidate",
)
async def get_report(
    name: str,
    cache: CacheDep,
    delay: Annotated[float, Query(ge=0, le=5, description="Origin latency, seconds.")] = 0.5,
) -> dict[str, Any]:
    async def origin() -> dict[str, Any]:
        ORIGIN_CALLS["reports"] += 1
        await asyncio.sleep(delay)
        return {"name": name, "computed_at": time.time()}

    report = await cache.get_or_set(
        f"report:{name}", origin, ttl=5, stale_ttl=60, early_refresh=1.0, tags=["reports"]
    )
    return {"report": report, "origin_calls": ORIGIN_CALLS["reports"]}


@router.post("/cache/tags/{tag}/invalidate", summary="Drop every entry carrying a tag")
async def invalidate_tag(tag: str, cache: CacheDep) -> dict[str, Any]:
    return {"tag": tag, "removed": await cache.invalidate_tags(tag)}


@router.post("/cache/invalidate", summary="Drop every entry whose key matches a pattern")
async def invalidate_pattern(
    _: Destructive,
    cache: CacheDep,
    pattern: Annotated[
        str,
        Query(
            min_length=1,
            max_length=512,
            description="'*' is the only wildcard; at most 4 (runs of '*' count once).",
        ),
    ],
) -> dict[str, Any]:
    """Off (403) unless APP_ENV=development or DEMO_DESTRUCTIVE_ROUTES=true."""
    return {"pattern": pattern, "removed": await cache.invalidate(pattern)}


@router.delete("/cache", summary="Clear the whole cache namespace")
async def clear(_: Destructive, cache: CacheDep) -> dict[str, Any]:
    """Off (403) unless APP_ENV=development or DEMO_DESTRUCTIVE_ROUTES=true."""
    return {"removed": await cache.clear()}


@router.get("/stats", summary="Cache counters of this worker: hits, local hits, stale, misses")
async def stats(cache: CacheDep) -> dict[str, Any]:
    return cache.stats()
