"""The per-route form: ``@cache_response`` marks an endpoint, ``HttpCacheRoute`` caches it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from app.core.guard import Duration
from app.middleware.http_cache._middleware import HttpCacheMiddleware
from app.middleware.http_cache._policy import HttpCachePolicy
from app.services.http_cache import HttpCacheStats

__all__ = ["HttpCacheRoute", "cache_response"]

F = TypeVar("F", bound=Callable[..., Any])

_ROUTE_ATTR: Final = "__http_cache__"


@dataclass(frozen=True, slots=True)
class _RouteCache:
    policy: HttpCachePolicy
    namespace: str
    stats: HttpCacheStats | None
    timeout: Duration | None


def cache_response(
    ttl: float | None = None,
    *,
    policy: HttpCachePolicy | None = None,
    namespace: str = "httpcache",
    stats: HttpCacheStats | None = None,
    timeout: Duration | None = None,
) -> Callable[[F], F]:
    """Mark an endpoint of an ``HttpCacheRoute`` router for response caching.

    ::

        router = APIRouter(route_class=HttpCacheRoute)

        @router.get("/items/{item_id}")
        @cache_response(ttl=30)
        async def get_item(item_id: int) -> Item: ...

    *ttl* overrides ``policy.ttl``. The endpoint itself is returned unchanged
    (its signature and dependencies are FastAPI's as usual); the route wraps
    its ASGI handler with ``HttpCacheMiddleware``, so the semantics are the
    middleware's. On a router without ``HttpCacheRoute`` the mark does nothing.
    """
    chosen = policy or HttpCachePolicy()
    if ttl is not None:
        chosen = dataclasses.replace(chosen, ttl=ttl)
    config = _RouteCache(chosen, namespace, stats, timeout)

    def mark(endpoint: F) -> F:
        setattr(endpoint, _ROUTE_ATTR, config)
        return endpoint

    return mark


class HttpCacheRoute(APIRoute):
    """An ``APIRoute`` that caches the responses of endpoints marked with ``@cache_response``.

    HEAD requests to a cached GET route are answered from the GET entry (FastAPI
    alone would answer 405).
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        config: _RouteCache | None = getattr(endpoint, _ROUTE_ATTR, None)
        self.http_cache: HttpCacheMiddleware | None = None
        if config is not None:
            self.http_cache = HttpCacheMiddleware(
                self._handle_origin,
                policy=config.policy,
                namespace=config.namespace,
                stats=config.stats,
                timeout=config.timeout,
            )
            self.http_cache._route_level = True

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.http_cache is None:
            await super().handle(scope, receive, send)
        else:
            await self.http_cache(scope, receive, send)

    async def _handle_origin(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().handle(scope, receive, send)
