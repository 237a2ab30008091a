"""HTTP response caching (RFC 9110 / RFC 9111) in Redis: pure ASGI, app-wide or per route."""

from app.middleware.http_cache._middleware import (
    DEFAULT_STORED_HEADERS,
    HttpCacheMiddleware,
    HttpCachePolicy,
    HttpCacheRoute,
    cache_response,
)

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "HttpCacheMiddleware",
    "HttpCachePolicy",
    "HttpCacheRoute",
    "cache_response",
]
