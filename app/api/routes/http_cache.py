"""Demo routes for HTTP response caching, under ``/http-cache/``.

Both forms are wired:

* ``setup(app)`` adds ``HttpCacheMiddleware`` for the ``/http-cache/`` prefix
  (except ``/http-cache/stats`` and ``/http-cache/route/``), with a small body
  cap so the streaming demo can show the pass-through.
* ``/http-cache/route/...`` is served by an ``HttpCacheRoute`` router whose
  endpoint is marked ``@cache_response``: the per-route form.

Every response shows ``X-Cache: HIT|MISS|STALE``; ``X-Origin-Calls`` (sent on
a miss only, as it is not a stored header) counts how often the origin ran.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import HttpCacheDep
from app.core.redis import Lifespan
from app.middleware.http_cache import (
    HttpCacheMiddleware,
    HttpCachePolicy,
    HttpCacheRoute,
    cache_response,
)
from app.services.http_cache import HttpCacheStats

__all__ = ["DEMO_POLICY", "ROUTE_STATS", "lifespan", "router", "setup"]

DEMO_POLICY = HttpCachePolicy(ttl=30, max_age=0, max_body_size=64 * 1024)
"""30 s in Redis; ``max-age=0`` so browsers revalidate (cheap 304s) and see invalidations."""

ROUTE_STATS = HttpCacheStats()
"""Counters of the per-route demo (the decorator is applied at import time)."""

router = APIRouter(prefix="/http-cache", tags=["http-cache"])
route_router = APIRouter(prefix="/route", tags=["http-cache"], route_class=HttpCacheRoute)
lifespan: Lifespan | None = None


class _DemoState:
    """Per-app demo data: item versions and how often each origin ran."""

    def __init__(self) -> None:
        self.versions: Counter[int] = Counter()
        self.calls: Counter[str] = Counter()
        self.stats = HttpCacheStats()


def _state(request: Request) -> _DemoState:
    state: _DemoState = request.app.state.http_cache_demo
    return state


def _origin(request: Request, response: Response, name: str) -> int:
    state = _state(request)
    state.calls[name] += 1
    response.headers["X-Origin-Calls"] = str(state.calls[name])
    return state.calls[name]


@router.get("/items/{item_id}", summary="A cached item (ETag, 304, Age, HEAD)")
async def http_cache_get_item(item_id: int, request: Request, response: Response) -> dict[str, Any]:
    """Cached 30 s in Redis; `If-None-Match` with the ETag answers 304. HEAD reads the same entry."""
    _origin(request, response, f"item:{item_id}")
    return {"id": item_id, "name": f"item {item_id}", "version": _state(request).versions[item_id]}


@router.put("/items/{item_id}", summary="Update an item: the middleware invalidates its URL")
async def http_cache_put_item(item_id: int, request: Request) -> dict[str, Any]:
    """A 2xx answer to PUT on a cached URL invalidates it (RFC 9111 §4.4): no code needed."""
    _state(request).versions[item_id] += 1
    return {"id": item_id, "version": _state(request).versions[item_id]}


@router.post(
    "/items/{item_id}/rename", summary="Update an item through another URL, invalidate explicitly"
)
async def http_cache_rename_item(
    item_id: int, request: Request, http_cache: HttpCacheDep
) -> dict[str, Any]:
    """Another URI changes the item, so the handler drops `GET /http-cache/items/{id}` itself."""
    _state(request).versions[item_id] += 1
    url = str(request.url_for("http_cache_get_item", item_id=item_id))
    invalidated = await http_cache.invalidate(url)
    return {"id": item_id, "version": _state(request).versions[item_id], "invalidated": invalidated}


@router.get("/greeting", summary="Vary: Accept-Language (one entry per language)")
async def http_cache_greeting(
    request: Request, response: Response, accept_language: str = Header(default="en")
) -> dict[str, str]:
    _origin(request, response, "greeting")
    response.headers["Vary"] = "Accept-Language"
    words = {"fr": "bonjour", "de": "hallo", "es": "hola"}
    return {"greeting": words.get(accept_language[:2].lower(), "hello")}


@router.get("/me", summary="Per-caller private entry (Authorization)")
async def http_cache_me(
    request: Request, response: Response, authorization: str = Header(default="")
) -> dict[str, str]:
    """Each `Authorization` value gets its own entry; the response says `private`."""
    _origin(request, response, "me")
    return {"user": authorization.removeprefix("Bearer ") or "anonymous"}


@router.get("/clock", summary="stale-while-revalidate: stale answers at once, refreshed behind")
async def http_cache_clock(request: Request, response: Response) -> dict[str, float]:
    _origin(request, response, "clock")
    response.headers["Cache-Control"] = "max-age=2, stale-while-revalidate=30, stale-if-error=300"
    return {"computed_at": time.time()}


@router.get("/session", summary="Sets a cookie: never stored")
async def http_cache_session(request: Request, response: Response) -> dict[str, bool]:
    _origin(request, response, "session")
    response.set_cookie("demo", "1")
    return {"cached": False}


@router.get("/no-store", summary="Cache-Control: no-store: never stored")
async def http_cache_no_store(request: Request, response: Response) -> dict[str, bool]:
    _origin(request, response, "no-store")
    response.headers["Cache-Control"] = "no-store"
    return {"cached": False}


@router.get("/report", summary="A streamed body: stored under 64 KiB, passed through above")
async def http_cache_report(
    request: Request,
    size: int = Query(default=1000, ge=0, le=10_000_000),
    chunk: int = Query(default=8192, ge=1, le=1_000_000),
) -> StreamingResponse:
    state = _state(request)
    state.calls["report"] += 1

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            yield b"x" * n
            sent += n
            await asyncio.sleep(0)

    return StreamingResponse(
        body(),
        media_type="text/plain",
        headers={"X-Origin-Calls": str(state.calls["report"])},
    )


@router.get("/stats", summary="Hits, misses, stale hits, 304s, stores and errors")
async def http_cache_stats(request: Request) -> dict[str, dict[str, int]]:
    return {"middleware": _state(request).stats.as_dict(), "route": ROUTE_STATS.as_dict()}


@route_router.get("/items/{item_id}", summary="Per-route form: HttpCacheRoute + @cache_response")
@cache_response(ttl=10, stats=ROUTE_STATS)
async def http_cache_route_item(
    item_id: int, request: Request, response: Response
) -> dict[str, Any]:
    _origin(request, response, f"route-item:{item_id}")
    return {"id": item_id, "form": "route"}


router.include_router(route_router)


def setup(app: FastAPI) -> None:
    """Demo state, and the middleware for ``/http-cache/`` (the per-route demo excluded)."""
    state = _DemoState()
    app.state.http_cache_demo = state
    app.add_middleware(
        HttpCacheMiddleware,
        policy=DEMO_POLICY,
        paths=("/http-cache/",),
        exclude=("/http-cache/stats", "/http-cache/route/"),
        stats=state.stats,
    )
