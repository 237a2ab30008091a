"""HTTP response caching (RFC 9110 / RFC 9111) in Redis: pure ASGI, app-wide or per route.

Two ways to use it, one engine:

* App-wide: ``app.add_middleware(HttpCacheMiddleware, policy=HttpCachePolicy(ttl=30),
  paths=["/catalog/"])`` caches GET and HEAD under the given path prefixes.
* Per route: ``APIRouter(route_class=HttpCacheRoute)`` plus ``@cache_response(ttl=30)``
  under the route decorator. The route's own ASGI handler is wrapped, so the
  route decides, and routes without the decorator are untouched.

What it does with a GET or HEAD request:

* **Key**: the method-normalised URL (scheme, host, normalised path, query
  sorted by name; HEAD reads and fills the GET entry) plus the value of every
  request header named in the stored response's ``Vary``. The path is
  normalised per RFC 3986 §6.2.2 (unreserved characters percent-decoded,
  escapes upper-cased, dot segments removed), so an invalidation reaches
  every spelling; a request whose path has dot segments is never served
  from or stored in the cache (the app may route it elsewhere, and storing
  its answer under the normalised URL would let it poison that URL).
* **Callers**: a request carrying any credential header (``Authorization``,
  ``Proxy-Authorization``, ``Cookie``, ``X-API-Key``: ``CALLER_CREDENTIAL_HEADERS``
  or ``policy.private_headers``), or whose principal an outer auth layer set,
  gets its own entry, keyed by the caller identity (``app.http.caller``),
  and the response is marked ``private`` unless the origin itself said
  ``public`` or ``s-maxage`` (``policy.credentials="bypass"`` skips the cache
  for them instead). The cache never adds ``public``: a generated
  ``Cache-Control`` is ``max-age=...`` (shared entries) or ``private, ...``.
  During a secret rotation a miss is looked up again under the caller's
  fallback-key digests, so entries stored before it are still served.
* **Hit** (one Redis round trip): the stored status, allow-listed headers and
  body, with ``Age`` and ``X-Cache: HIT``; ``If-None-Match`` (lists, ``W/``
  weak comparison, ``*``) or else ``If-Modified-Since`` answers ``304`` with
  ``ETag``, ``Cache-Control``, ``Vary``, ``Expires``, ``Content-Location`` and
  ``Age``. Stale within the response's ``stale-while-revalidate``: served with
  ``X-Cache: STALE`` while one caller (a Redis lease) refreshes it in the
  background. Stale within ``stale-if-error``: the origin is asked, and its
  5xx or exception is replaced by the stale response.
* **Miss** (``X-Cache: MISS``): the origin answers; a storable response is
  buffered (up to ``policy.max_body_size``), given a strong ETag from its
  body hash (unless it has one) and a ``Cache-Control`` (the origin's, made
  private for a private entry, or generated from the policy), stored, then
  sent (or a 304 if the request's validators match it). Anything else passes
  through as it streams: the start message is held only while the body still
  fits the cap, so a large or slow body is delayed by at most the cap's worth.
* **Never stored**: responses with ``Set-Cookie`` (per client, RFC 9111 §7.3), a
  response the session layer replaced (409, 503), ``no-store`` or ``no-cache``
  (request ``no-store`` too), ``private`` on a shared entry, ``Vary: *``, a
  status outside ``policy.cacheable_statuses`` (200, 203, 204 by default), bodies over
  the cap, ``text/event-stream``; ``Range`` requests bypass the cache.
* **Client revalidation**: ``Cache-Control: no-cache`` (or ``max-age=0``, or
  ``Pragma: no-cache``) makes the origin answer this request, and the fresh
  response replaces the entry; a client can never delete an entry or make
  anyone else's request skip the cache (``request_no_cache="ignore"``
  serves such requests from the cache too).
* **Writes invalidate**: a 2xx/3xx answer to an unsafe method (POST, PUT,
  PATCH, DELETE...) on a cached path drops every variant of its target URI
  and of its same-origin ``Location`` / ``Content-Location`` (RFC 9111 §4.4)
  before the response is sent. Other URLs: ``HttpResponseCache.invalidate``.
* **Redis down**: the origin answers as if there were no cache (the core
  circuit breaker skips Redis while open and logs once per transition).

An entry is written by one script after the whole body is in, so a request
cancelled midway (client gone) never leaves a partial entry. The ``Date``
header is the server's to add (uvicorn does); the cache sends ``Age``.
"""

from app.middleware.http_cache._middleware import HttpCacheMiddleware
from app.middleware.http_cache._policy import DEFAULT_STORED_HEADERS, HttpCachePolicy
from app.middleware.http_cache._route import HttpCacheRoute, cache_response

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "HttpCacheMiddleware",
    "HttpCachePolicy",
    "HttpCacheRoute",
    "cache_response",
]
