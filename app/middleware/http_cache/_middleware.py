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

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import check_secret_keys, get_settings
from app.core.errors import ToolkitError
from app.core.redis import get_redis
from app.http.caller import PRINCIPAL_KEY, caller_resolver, resolve_caller
from app.middleware._order import enter_layer, pass_lifespan, session_replaced
from app.services.http_cache import (
    DEFAULT_MAX_BODY_SIZE,
    CacheControl,
    HttpCacheStats,
    HttpResponseCache,
    Lookup,
    StoredResponse,
    cache_control_for_private,
    compute_etag,
    credential_digest,
    format_http_date,
    if_none_match_matches,
    normalize_host,
    normalize_path,
    parse_cache_control,
    parse_http_date,
    parse_vary,
    url_digest,
    variant_digest,
)

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "HttpCacheMiddleware",
    "HttpCachePolicy",
    "HttpCacheRoute",
    "cache_response",
]

log = logging.getLogger("app.http_cache")

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STORED_HEADERS: Final = frozenset(
    {
        "cache-control",
        "content-disposition",
        "content-encoding",
        "content-language",
        "content-location",
        "content-type",
        "etag",
        "expires",
        "last-modified",
        "link",
        "vary",
    }
)
"""Response headers kept in a stored entry; anything else is served only on the miss."""

HIT: Final = b"HIT"
MISS: Final = b"MISS"
STALE: Final = b"STALE"

_METHODS: Final = frozenset({"GET", "HEAD"})
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_SCOPE_MARK: Final = "app.http_cache"  # set on a handled scope: inner layers pass it through
_VALIDATOR_HEADERS: Final = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary"}
)  # RFC 9110 §15.4.5: what a 304 carries
_NOT_FORWARDED_ON_REFRESH: Final = frozenset(
    {
        b"cache-control",
        b"if-match",
        b"if-modified-since",
        b"if-none-match",
        b"if-range",
        b"if-unmodified-since",
        b"pragma",
        b"range",
    }
)
_NEVER_STORED: Final = frozenset(
    {
        b"age",
        b"connection",
        b"content-length",
        b"date",
        b"set-cookie",
        b"transfer-encoding",
        b"x-cache",
    }
)  # per-response or hop-by-hop, whatever stored_headers says
_HINTS_MAX: Final = 4096


@dataclass(frozen=True, slots=True)
class HttpCachePolicy:
    """What to store and for how long. Durations are seconds.

    Args:
        ttl: freshness when the origin's response gives none (no ``s-maxage``,
            ``max-age`` or ``Expires``).
        max_age: ``max-age`` of the ``Cache-Control`` generated for responses
            without one (default: ``ttl``). ``0`` makes browsers revalidate
            each time (a cheap 304), so an invalidation reaches them at once.
        s_maxage: ``s-maxage`` for CDNs in the generated header (shared entries only).
        stale_while_revalidate / stale_if_error: stale windows used when the
            origin's ``Cache-Control`` does not name them (also generated).
        max_ttl: upper bound on any window read from the origin.
        cacheable_statuses: statuses that may be stored (2xx by default).
        max_body_size: larger bodies pass through unbuffered and unstored.
        stored_headers: response header names kept in the entry.
        vary: request headers to vary on even when the origin's ``Vary`` omits them
            (added to the response's ``Vary``).
        private_headers: request headers that carry a credential (default: the
            settings' ``CALLER_CREDENTIAL_HEADERS``).
        credentials: ``"private"`` (an entry per caller, marked private) or
            ``"bypass"`` (such requests skip the cache).
        request_no_cache: ``"revalidate"`` (a client's ``no-cache`` recomputes
            its own response) or ``"ignore"`` (served from the cache anyway).
        last_modified: synthesize ``Last-Modified`` (when the body was first
            stored) for responses without one, enabling ``If-Modified-Since``.
        refresh_lease: seconds one caller holds the stale-while-revalidate
            refresh of an entry before another may try.
        invalidate_on_unsafe: a 2xx/3xx answer to POST, PUT, PATCH, DELETE...
            invalidates the target URI and its ``Location`` / ``Content-Location``
            (RFC 9111 §4.4), before the response reaches the client.
    """

    ttl: float = 60.0
    max_age: float | None = None
    s_maxage: float | None = None
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    max_ttl: float = 86_400.0
    cacheable_statuses: frozenset[int] = frozenset({200, 203, 204})
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    stored_headers: frozenset[str] = DEFAULT_STORED_HEADERS
    vary: tuple[str, ...] = ()
    private_headers: tuple[str, ...] | None = None
    credentials: Literal["private", "bypass"] = "private"
    request_no_cache: Literal["revalidate", "ignore"] = "revalidate"
    last_modified: bool = True
    refresh_lease: float = 10.0
    invalidate_on_unsafe: bool = True

    def __post_init__(self) -> None:
        for name in ("ttl", "stale_while_revalidate", "stale_if_error", "max_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"HttpCachePolicy.{name} must be >= 0")
        if self.max_body_size < 0 or self.refresh_lease <= 0:
            raise ValueError("HttpCachePolicy: max_body_size >= 0 and refresh_lease > 0 required")
        if self.credentials not in ("private", "bypass"):
            raise ValueError("HttpCachePolicy.credentials must be 'private' or 'bypass'")
        if self.request_no_cache not in ("revalidate", "ignore"):
            raise ValueError("HttpCachePolicy.request_no_cache must be 'revalidate' or 'ignore'")


@dataclass(slots=True)
class _Request:
    headers: list[tuple[bytes, bytes]]
    head: bool
    url: str
    scope: Scope
    caller: str
    fallback_callers: tuple[str, ...]
    cache_control: CacheControl
    pragma_no_cache: bool
    if_none_match: str | None
    if_modified_since: str | None


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a storable response is stored and sent."""

    spec: str
    fresh_ms: int
    swr_ms: int
    sie_ms: int
    cache_control: bytes | None  # replaces the response's Cache-Control (None: leave as is)
    vary: bytes | None  # replaces the response's Vary when the policy adds names
    etag: str | None  # the origin's
    last_modified: int | None  # the origin's (epoch s)
    content_type: bytes
    content_encoding: bytes


def _seconds_ms(value: float, cap: float) -> int:
    return int(min(value, cap) * 1000)


async def _discard(message: Message) -> None:
    return None


class HttpCacheMiddleware:
    """Cache GET/HEAD responses in Redis (see the module docstring for the semantics).

    Args:
        app: the ASGI app.
        policy: what to store and for how long (``HttpCachePolicy()`` by default).
        paths: path prefixes to cache (None: every path).
        exclude: path prefixes never cached (checked first).
        namespace: key space service name.
        stats: counters to update (shared with a ``/stats`` route, say).
        timeout: seconds a Redis call may take before the request goes on
            without the cache (None: the client's socket timeout bounds it;
            a tighter budget such as 0.25 costs a timer per call).
        secret: an extra HMAC key over the caller digests (default none: the
            caller digests are keyed with ``Settings.signing_keys()``; set
            ``SECRET_KEY`` so every worker shares private entries).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: HttpCachePolicy | None = None,
        paths: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        namespace: str = "httpcache",
        stats: HttpCacheStats | None = None,
        timeout: float | None = None,
        secret: bytes | None = None,
    ) -> None:
        check_secret_keys(secret, source="HttpCacheMiddleware(secret=...)")
        self.app = app
        self.policy = policy or HttpCachePolicy()
        self.paths = tuple(paths) if paths is not None else None
        self.exclude = tuple(exclude)
        self.namespace = namespace
        self.stats = stats if stats is not None else HttpCacheStats()
        self.timeout = timeout
        self._secret = secret
        p = self.policy
        private_headers = (
            get_settings().caller_credential_headers
            if p.private_headers is None
            else p.private_headers
        )
        self._private = frozenset(h.lower().encode("latin-1") for h in private_headers)
        self._route_level = False  # set by HttpCacheRoute: inside the session layer
        self._stored = (
            frozenset(h.lower().encode("latin-1") for h in p.stored_headers) - _NEVER_STORED
        )
        self._lease_ms = max(1, int(p.refresh_lease * 1000))
        self._cache: HttpResponseCache | None = None
        self._hints: OrderedDict[str, str] = OrderedDict()
        self._last_spec = ""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- request ------------------------------------------------------------

    def _applies(self, path: str) -> bool:
        if any(path.startswith(prefix) for prefix in self.exclude):
            return False
        return self.paths is None or any(path.startswith(prefix) for prefix in self.paths)

    def _read_request(self, scope: Scope) -> _Request | None:
        """The request's cache-relevant parts; None when it must bypass the cache."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        host = cache_control = if_none_match = if_modified_since = None
        pragma_no_cache = False
        credentials: list[tuple[bytes, bytes]] = []
        for raw_name, value in headers:
            name = raw_name.lower()
            if name == b"host":
                host = value
            elif name == b"cache-control":
                cache_control = value if cache_control is None else cache_control + b"," + value
            elif name == b"if-none-match":
                if_none_match = value if if_none_match is None else if_none_match + b"," + value
            elif name == b"if-modified-since":
                # more than one member makes the field invalid (RFC 9110 §13.1.3)
                if_modified_since = value if if_modified_since is None else b""
            elif name == b"range":
                return None
            elif name == b"pragma":
                pragma_no_cache = pragma_no_cache or b"no-cache" in value.lower()
            elif name in self._private:
                credentials.append((name, value))
        scheme, host_text, raw_path, query = _target(scope, host)
        path = normalize_path(raw_path)
        if path is None:  # dot segments: see the module docstring
            return None
        callers: tuple[str, ...] = ()
        if credentials or scope.get(PRINCIPAL_KEY) is not None:  # anonymous: a shared entry
            if self.policy.credentials == "bypass":
                return None
            identity = resolve_caller(scope)
            if identity.identified:
                callers = identity.scopes()
            else:  # a credential header the caller settings do not list
                credentials.sort()
                keys = caller_resolver().keys
                callers = tuple(credential_digest(k, credentials) for k in keys)
            if self._secret is not None:
                callers = tuple(
                    credential_digest(self._secret, [(b"caller", c.encode())]) for c in callers
                )
        return _Request(
            headers=headers,
            head=scope["method"] == "HEAD",
            url=url_digest(scheme, host_text, path, query),
            scope=scope,
            caller=callers[0] if callers else "",
            fallback_callers=callers[1:],
            cache_control=parse_cache_control(
                cache_control.decode("latin-1") if cache_control else None
            ),
            pragma_no_cache=pragma_no_cache and cache_control is None,
            if_none_match=if_none_match.decode("latin-1") if if_none_match is not None else None,
            if_modified_since=(
                if_modified_since.decode("latin-1") if if_modified_since is not None else None
            ),
        )

    def _variant(self, req: _Request, spec: str, caller: str | None = None) -> str:
        caller = req.caller if caller is None else caller
        if not spec:
            return variant_digest("", caller, ())
        values = []
        for name in spec.split(","):
            wanted = name.encode("latin-1")
            values.append(b", ".join(v.strip() for n, v in req.headers if n.lower() == wanted))
        return variant_digest(spec, caller, values)

    async def _lookup_fallbacks(
        self, cache: HttpResponseCache, req: _Request, found: Lookup, lease_ms: int
    ) -> Lookup:
        """A miss for a caller during a key rotation: its entry under a fallback digest."""
        for caller in req.fallback_callers:
            alt = await cache.lookup(
                req.url,
                lambda spec, caller=caller: self._variant(req, spec, caller),  # type: ignore[misc]
                found.spec,
                lease_ms=lease_ms,
            )
            if alt is not None and alt.entry is not None:
                return alt
        return found

    def _hint(self, url: str) -> str:
        return self._hints.get(url, self._last_spec)

    def _remember(self, url: str, spec: str) -> None:
        self._last_spec = spec
        if self._hints.get(url) == spec:
            return
        self._hints[url] = spec
        if len(self._hints) > _HINTS_MAX:
            self._hints.popitem(last=False)

    def _cache_for(self, client: Any) -> HttpResponseCache:
        cache = self._cache
        if cache is None or cache.redis is not client:
            cache = self._cache = HttpResponseCache(
                client,
                namespace=self.namespace,
                timeout=self.timeout,
                max_body_size=self.policy.max_body_size,
                stats=self.stats,
            )
        return cache

    # -- ASGI ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not self._route_level:
            await pass_lifespan(self.app, "http_cache", scope, receive, send)
            return
        if scope["type"] == "http" and not self._route_level:
            enter_layer(scope, "http_cache")
        if scope["type"] != "http" or _SCOPE_MARK in scope or not self._applies(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in _METHODS:
            if scope["method"] in _SAFE_METHODS or not self.policy.invalidate_on_unsafe:
                await self.app(scope, receive, send)
            else:
                scope[_SCOPE_MARK] = True
                await self.app(scope, receive, self._invalidating(scope, send))
            return
        scope[_SCOPE_MARK] = True
        req = self._read_request(scope)
        if req is None:
            self.stats.misses += 1
            await self.app(scope, receive, _tag(send, MISS))
            return
        policy = self.policy
        cc = req.cache_control
        revalidate = policy.request_no_cache == "revalidate" and (
            "no-cache" in cc or req.pragma_no_cache or cc.seconds("max-age") == 0
        )
        cache = self._cache_for(get_redis())
        lease_ms = 0 if revalidate else self._lease_ms
        found = await cache.lookup(
            req.url, lambda spec: self._variant(req, spec), self._hint(req.url), lease_ms=lease_ms
        )
        fallback: tuple[StoredResponse, int] | None = None
        if found is not None:
            self._remember(req.url, found.spec)
            served = found
            if found.entry is None and req.fallback_callers and not revalidate:
                served = await self._lookup_fallbacks(cache, req, found, lease_ms)
            entry = served.entry
            if entry is not None and not revalidate:
                age_ms = max(0, found.now_ms - entry.stored_at_ms)
                client_max_age = cc.seconds("max-age")
                too_old = (
                    policy.request_no_cache == "revalidate"
                    and client_max_age is not None
                    and age_ms > client_max_age * 1000
                )
                if too_old:
                    pass
                elif age_ms <= entry.fresh_ms:
                    self.stats.hits += 1
                    await self._send_entry(send, req, entry, age_ms, HIT)
                    return
                elif age_ms <= entry.fresh_ms + entry.swr_ms:
                    self.stats.stale += 1
                    if served.leased:
                        self._spawn_refresh(scope, req, cache, served)
                    await self._send_entry(send, req, entry, age_ms, STALE)
                    return
                elif age_ms <= entry.fresh_ms + entry.sie_ms:
                    fallback = (entry, age_ms)
        may_store = found is not None and "no-store" not in cc
        origin_scope = {**scope, "method": "GET"} if req.head else scope
        responder = _OriginResponse(self, req, send, cache, found, may_store, fallback is not None)
        try:
            await self.app(origin_scope, receive, responder.send)
        except Exception:
            if fallback is None or responder.sent_start:
                raise
            log.warning("HTTP cache: the origin failed; serving the stale response", exc_info=True)
            responder.state = "swallow"
        if responder.state == "swallow" and fallback is not None:
            self.stats.stale += 1
            await self._send_entry(send, req, fallback[0], fallback[1], STALE)
            return
        self.stats.misses += 1
        await responder.finish()

    # -- unsafe methods -------------------------------------------------------

    def _invalidating(self, scope: Scope, send: Send) -> Send:
        """``send`` that invalidates the target URI (RFC 9111 §4.4) before a 2xx/3xx starts.

        ``Location`` and ``Content-Location`` URIs on the same origin are
        invalidated too. Done before the response reaches the client, so its
        next GET cannot read the old entry. Redis down: the response goes on
        (the breaker logs the outage) and ``stats.errors`` counts it.
        """

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 400:
                await self._invalidate_targets(scope, message.get("headers", ()))
            await send(message)

        return wrapped

    async def _invalidate_targets(
        self, scope: Scope, headers: Sequence[tuple[bytes, bytes]]
    ) -> None:
        scheme, host, raw_path, query = _target(scope)
        path = normalize_path(raw_path, remove_dots=True) or raw_path
        digests = {url_digest(scheme, host, path, query)}
        base = f"{scheme}://{host}{path.decode('latin-1')}"
        for name, value in headers:
            if name.lower() in (b"location", b"content-location"):
                parts = urlsplit(urljoin(base, value.decode("latin-1").strip()))
                if parts.scheme == scheme and normalize_host(
                    scheme, parts.netloc
                ) == normalize_host(scheme, host):
                    target = normalize_path((parts.path or "/").encode(), remove_dots=True)
                    digests.add(url_digest(scheme, host, target or b"/", parts.query.encode()))
        cache = self._cache_for(get_redis())
        for digest in digests:
            try:
                await cache.invalidate_digest(digest)
            except ToolkitError:
                self.stats.errors += 1

    # -- responses ----------------------------------------------------------

    def _not_modified(self, req: _Request, etag: str, last_modified: int) -> bool:
        """RFC 9110 §13.2.2: If-None-Match decides when present, else If-Modified-Since."""
        if req.if_none_match is not None:
            return if_none_match_matches(req.if_none_match, etag)
        if req.if_modified_since is not None and last_modified > 0:
            since = parse_http_date(req.if_modified_since)
            return since is not None and last_modified <= since
        return False

    async def _send_not_modified(
        self, send: Send, headers: Sequence[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]
    ) -> None:
        self.stats.not_modified += 1
        kept = [(n, v) for n, v in headers if n.lower() in _VALIDATOR_HEADERS]
        await send({"type": "http.response.start", "status": 304, "headers": kept + extra})
        await send({"type": "http.response.body", "body": b""})

    async def _send_entry(
        self, send: Send, req: _Request, entry: StoredResponse, age_ms: int, x_cache: bytes
    ) -> None:
        extra = [(b"age", str(age_ms // 1000).encode()), (b"x-cache", x_cache)]
        headers = list(entry.headers)
        if entry.synthesized_lm and entry.last_modified:
            headers.append((b"last-modified", format_http_date(entry.last_modified).encode()))
        if entry.status == 200 and self._not_modified(req, entry.etag, entry.last_modified):
            await self._send_not_modified(send, headers, extra)
            return
        if entry.status != 204:
            headers.append((b"content-length", str(len(entry.body)).encode()))
        await send(
            {"type": "http.response.start", "status": entry.status, "headers": headers + extra}
        )
        await send({"type": "http.response.body", "body": b"" if req.head else entry.body})

    def _plan(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], req: _Request
    ) -> _Plan | None:
        """How to store a response with this start message, or None when it must not be."""
        policy = self.policy
        if status not in policy.cacheable_statuses or session_replaced(req.scope):
            return None
        if self._route_level and getattr(req.scope.get("session"), "accessed", False):
            # Inside the session layer its Set-Cookie comes later: a response that used
            # the session is per client and never stored.
            return None
        cc_values: list[str] = []
        vary_values: list[str] = list(policy.vary)
        etag: str | None = None
        last_modified: int | None = None
        expires: str | None = None
        content_type = content_encoding = b""
        for raw_name, value in headers:
            name = raw_name.lower()
            if name == b"set-cookie":
                return None
            if name == b"cache-control":
                cc_values.append(value.decode("latin-1"))
            elif name == b"vary":
                vary_values.append(value.decode("latin-1"))
            elif name == b"etag":
                etag = value.decode("latin-1").strip()
            elif name == b"last-modified":
                last_modified = parse_http_date(value.decode("latin-1"))
            elif name == b"expires":
                expires = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
                if value.lower().startswith(b"text/event-stream"):
                    return None
            elif name == b"content-encoding":
                content_encoding = value
            elif name == b"content-length":
                try:
                    if int(value) > policy.max_body_size:
                        return None
                except ValueError:
                    return None
        names = parse_vary(vary_values)
        if names is None:
            return None
        private = bool(req.caller)
        cap = policy.max_ttl
        header: str | None
        if not cc_values and expires is None:
            fresh = policy.ttl
            swr, sie = policy.stale_while_revalidate, policy.stale_if_error
            header = self._generated_cache_control(private)
        else:
            cc = parse_cache_control(", ".join(cc_values))
            if "no-store" in cc or "no-cache" in cc or (not private and "private" in cc):
                return None
            s_maxage, max_age = cc.seconds("s-maxage"), cc.seconds("max-age")
            if s_maxage is not None and not private:
                fresh = float(s_maxage)
            elif max_age is not None:
                fresh = float(max_age)
            elif expires is not None:
                when = parse_http_date(expires)
                fresh = max(0.0, when - time.time()) if when is not None else 0.0
            else:
                fresh = policy.ttl
            if "must-revalidate" in cc or (not private and "proxy-revalidate" in cc):
                swr = sie = 0.0
            else:
                swr_value = cc.seconds("stale-while-revalidate")
                sie_value = cc.seconds("stale-if-error")
                swr = policy.stale_while_revalidate if swr_value is None else float(swr_value)
                sie = policy.stale_if_error if sie_value is None else float(sie_value)
            if cc_values:
                joined = ", ".join(cc_values)
                # The origin's own public / s-maxage is its decision to share; anything
                # else sent to a caller with credentials is made private.
                shared_by_origin = "public" in cc or "s-maxage" in cc
                header = (
                    cache_control_for_private(joined)
                    if private and not shared_by_origin
                    else joined
                )
            else:  # Expires alone says how fresh; a caller's entry still says private
                header = "private" if private else None
        fresh_ms, swr_ms, sie_ms = (_seconds_ms(v, cap) for v in (fresh, swr, sie))
        if fresh_ms + max(swr_ms, sie_ms) <= 0:
            return None
        spec = ",".join(names)
        return _Plan(
            spec=spec,
            fresh_ms=fresh_ms,
            swr_ms=swr_ms,
            sie_ms=sie_ms,
            cache_control=None if header is None else header.encode("latin-1", "replace"),
            vary=", ".join(names).encode("latin-1") if policy.vary else None,
            etag=etag,
            last_modified=last_modified,
            content_type=content_type,
            content_encoding=content_encoding,
        )

    def _generated_cache_control(self, private: bool) -> str:
        p = self.policy
        max_age = p.ttl if p.max_age is None else p.max_age
        # Never "public": a cache only obeys it (RFC 9111 §3.5), it does not invent it.
        parts = [*(["private"] if private else []), f"max-age={math.floor(max_age)}"]
        if p.s_maxage is not None and not private:
            parts.append(f"s-maxage={math.floor(p.s_maxage)}")
        if p.stale_while_revalidate:
            parts.append(f"stale-while-revalidate={math.floor(p.stale_while_revalidate)}")
        if p.stale_if_error:
            parts.append(f"stale-if-error={math.floor(p.stale_if_error)}")
        return ", ".join(parts)

    # -- stale-while-revalidate ---------------------------------------------

    def _spawn_refresh(
        self, scope: Scope, req: _Request, cache: HttpResponseCache, found: Lookup
    ) -> None:
        headers = [(n, v) for n, v in req.headers if n.lower() not in _NOT_FORWARDED_ON_REFRESH]
        refresh_scope = {**scope, "method": "GET", "headers": headers}
        refresh_req = dataclasses.replace(
            req, headers=headers, head=False, if_none_match=None, if_modified_since=None
        )
        task = asyncio.create_task(self._refresh(refresh_scope, refresh_req, cache, found))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(
        self, scope: Scope, req: _Request, cache: HttpResponseCache, found: Lookup
    ) -> None:
        """Recompute a stale entry in the background (this caller holds the refresh lease).

        The lease is released when the fresh response is stored; if the origin
        fails or the response is not storable, the lease simply expires and the
        stale entry keeps being served until its window closes.
        """
        done = asyncio.Event()
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        responder = _OriginResponse(self, req, _discard, cache, found, True, False)
        try:
            await self.app(scope, receive, responder.send)
            await responder.finish()
            self.stats.refreshes += 1
        except Exception:
            log.warning("HTTP cache: background refresh failed", exc_info=True)
        finally:
            done.set()

    async def drain(self) -> None:
        """Wait for the background refreshes in flight (e.g. at shutdown or in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class _OriginResponse:
    """Forwards the origin's messages; buffers a storable response to store it, then sends it.

    States: ``start`` (nothing seen), ``buffer`` (storable so far: start held,
    body collected up to the cap), ``pass`` (forwarding as it comes),
    ``swallow`` (a 5xx to be replaced by a stale response), ``done``.
    """

    __slots__ = (
        "cache",
        "chunks",
        "found",
        "headers",
        "may_store",
        "mw",
        "plan",
        "req",
        "send_downstream",
        "sent_start",
        "size",
        "stale_fallback",
        "state",
        "status",
    )

    def __init__(
        self,
        mw: HttpCacheMiddleware,
        req: _Request,
        send: Send,
        cache: HttpResponseCache,
        found: Lookup | None,
        may_store: bool,
        stale_fallback: bool,
    ) -> None:
        self.mw = mw
        self.req = req
        self.send_downstream = send
        self.cache = cache
        self.found = found
        self.may_store = may_store
        self.stale_fallback = stale_fallback
        self.state = "start"
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.plan: _Plan | None = None
        self.sent_start = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            if self.stale_fallback and self.status >= 500:
                self.state = "swallow"
                return
            self.plan = self.mw._plan(self.status, self.headers, self.req)
            if self.plan is None:
                self.mw.stats.uncacheable += 1
                self.state = "pass"
                await self._start(self.headers)
            else:
                self.state = "buffer"
        elif kind == "http.response.body":
            await self._body(message.get("body", b""), message.get("more_body", False))
        elif self.state != "swallow":  # trailers, pathsend...: not ours to buffer
            if self.state == "buffer":
                await self._flush(more_body=True)
            if self.req.head and kind == "http.response.pathsend":
                await self.send_downstream({"type": "http.response.body", "body": b""})
                return
            await self.send_downstream(message)

    async def _start(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.sent_start = True
        await self.send_downstream(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [*headers, (b"x-cache", MISS)],
            }
        )

    async def _body(self, body: bytes, more_body: bool) -> None:
        if self.state == "pass":
            if not self.req.head:
                await self.send_downstream(
                    {"type": "http.response.body", "body": body, "more_body": more_body}
                )
            elif not more_body:
                await self.send_downstream({"type": "http.response.body", "body": b""})
            return
        if self.state != "buffer":
            return
        if body:
            self.chunks.append(body)
            self.size += len(body)
        if self.size > self.mw.policy.max_body_size:
            self.mw.stats.uncacheable += 1
            await self._flush(more_body=more_body)
        elif not more_body:
            await self._complete()

    async def _flush(self, *, more_body: bool) -> None:
        """Give up on storing: send what was held and pass the rest through."""
        self.state = "pass"
        await self._start(self.headers)
        body = b"".join(self.chunks)
        self.chunks = []
        if not self.req.head:
            await self.send_downstream(
                {"type": "http.response.body", "body": body, "more_body": more_body}
            )
        elif not more_body:
            await self.send_downstream({"type": "http.response.body", "body": b""})

    async def _complete(self) -> None:
        """The whole storable body is here: ETag, store, then send (or 304)."""
        plan = self.plan
        assert plan is not None
        self.state = "done"
        body = b"".join(self.chunks)
        self.chunks = []
        etag = plan.etag or compute_etag(body, plan.content_type, plan.content_encoding)
        headers: list[tuple[bytes, bytes]] = []
        has_length = False
        for name, value in self.headers:
            lower = name.lower()
            if (lower == b"cache-control" and plan.cache_control is not None) or (
                lower == b"vary" and plan.vary is not None
            ):
                continue
            has_length = has_length or lower == b"content-length"
            headers.append((name, value))
        if plan.cache_control is not None:
            headers.append((b"cache-control", plan.cache_control))
        if plan.vary is not None:
            headers.append((b"vary", plan.vary))
        if plan.etag is None:
            headers.append((b"etag", etag.encode("latin-1")))
        last_modified = plan.last_modified or 0
        found = self.found
        if self.may_store and found is not None:
            variant = (
                found.variant if plan.spec == found.spec else self.mw._variant(self.req, plan.spec)
            )
            synthesize = plan.last_modified is None and self.mw.policy.last_modified
            result = await self.cache.store(
                self.req.url,
                variant,
                spec=plan.spec,
                generation=found.generation,
                status=self.status,
                headers=[(n.lower(), v) for n, v in headers if n.lower() in self.mw._stored],
                body=body,
                etag=etag,
                last_modified=None if synthesize else last_modified,
                fresh_ms=plan.fresh_ms,
                swr_ms=plan.swr_ms,
                sie_ms=plan.sie_ms,
            )
            if result is not None:
                self.mw._remember(self.req.url, plan.spec)
                if synthesize and result.stored and result.last_modified:
                    last_modified = result.last_modified
                    headers.append((b"last-modified", format_http_date(last_modified).encode()))
        if self.status == 200 and self.mw._not_modified(self.req, etag, last_modified):
            self.sent_start = True
            await self.mw._send_not_modified(self.send_downstream, headers, [(b"x-cache", MISS)])
            return
        if not has_length and self.status != 204:
            headers.append((b"content-length", str(len(body)).encode()))
        await self._start(headers)
        await self.send_downstream(
            {"type": "http.response.body", "body": b"" if self.req.head else body}
        )

    async def finish(self) -> None:
        """After the origin returned: send anything still held (an origin that never ended its body)."""
        if self.state == "buffer":
            await self._flush(more_body=False)


def _target(scope: Scope, host: bytes | None = None) -> tuple[str, str, bytes, bytes]:
    """Scheme, host, raw path and raw query of the request's target URI."""
    if host is None:
        host = next((v for n, v in scope["headers"] if n.lower() == b"host"), None)
    if host is None:
        server = scope.get("server")
        host_text = f"{server[0]}:{server[1]}" if server else ""
    else:
        host_text = host.decode("latin-1")
    # Without raw_path, the decoded path is re-escaped so a literal "%" stays a "%25"
    # (normalize_path would otherwise read it as an escape).
    path = scope.get("raw_path") or quote(scope["path"], safe="/!$&'()*+,;=:@~").encode("ascii")
    return scope.get("scheme", "http"), host_text, path, scope.get("query_string", b"")


def _tag(send: Send, x_cache: bytes) -> Send:
    async def tagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-cache", x_cache)]}
        await send(message)

    return tagged


# -- per route ------------------------------------------------------------------

_ROUTE_ATTR: Final = "__http_cache__"


@dataclass(frozen=True, slots=True)
class _RouteCache:
    policy: HttpCachePolicy
    namespace: str
    stats: HttpCacheStats | None
    timeout: float | None


def cache_response(
    ttl: float | None = None,
    *,
    policy: HttpCachePolicy | None = None,
    namespace: str = "httpcache",
    stats: HttpCacheStats | None = None,
    timeout: float | None = None,
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
