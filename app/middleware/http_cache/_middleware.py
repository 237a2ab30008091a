"""``HttpCacheMiddleware``: the engine of both forms (see the package docstring)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, Literal
from urllib.parse import urljoin, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import check_secret_keys, get_settings
from app.core.errors import ToolkitError
from app.core.guard import Duration, PerClient, as_seconds, to_ms
from app.core.redis import get_redis
from app.http.asgi import discard, request_target
from app.middleware._order import enter_layer, pass_lifespan
from app.middleware.http_cache._origin import OriginResponse
from app.middleware.http_cache._policy import HttpCachePolicy, stored_header_names
from app.middleware.http_cache._request import CacheRequest, read_request, variant_of
from app.middleware.http_cache._send import HIT, MISS, STALE, send_entry, tag
from app.services.http_cache import (
    HttpCacheStats,
    HttpResponseCache,
    Lookup,
    StoredResponse,
    normalize_host,
    normalize_path,
    url_digest,
)

__all__ = ["HttpCacheMiddleware"]

log = logging.getLogger("app.http_cache")

_METHODS: Final = frozenset({"GET", "HEAD"})
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_SCOPE_MARK: Final = "app.http_cache"  # set on a handled scope: inner layers pass it through

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
_HINTS_MAX: Final = 4096


class HttpCacheMiddleware:
    """Cache GET/HEAD responses in Redis (see the package docstring for the semantics).

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
        timeout: Duration | None = None,
        secret: bytes | None = None,
    ) -> None:
        check_secret_keys(secret, source="HttpCacheMiddleware(secret=...)")
        self.app = app
        self.policy = policy or HttpCachePolicy()
        self.paths = tuple(paths) if paths is not None else None
        self.exclude = tuple(exclude)
        self.namespace = namespace
        self.stats = stats if stats is not None else HttpCacheStats()
        self.timeout = None if timeout is None else as_seconds(timeout, "timeout")
        self._secret = secret
        p = self.policy
        private_headers = (
            get_settings().caller_credential_headers
            if p.private_headers is None
            else p.private_headers
        )
        self._private = frozenset(h.lower().encode("latin-1") for h in private_headers)
        self._route_level = False  # set by HttpCacheRoute: inside the session layer
        self._stored = stored_header_names(p)
        self._lease_ms = to_ms(p.refresh_lease)
        # One store per client; the builder holds the options, not this middleware (the
        # client keeps the builder as long as it lives).
        self._caches: PerClient[HttpResponseCache] = PerClient(
            functools.partial(
                HttpResponseCache,
                namespace=namespace,
                timeout=self.timeout,
                max_body_size=self.policy.max_body_size,
                stats=self.stats,
            )
        )
        self._hints: OrderedDict[str, str] = OrderedDict()
        self._last_spec = ""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- request ------------------------------------------------------------

    def _applies(self, path: str) -> bool:
        if any(path.startswith(prefix) for prefix in self.exclude):
            return False
        return self.paths is None or any(path.startswith(prefix) for prefix in self.paths)

    async def _lookup_fallbacks(
        self, cache: HttpResponseCache, req: CacheRequest, found: Lookup, lease_ms: int
    ) -> Lookup:
        """A miss for a caller during a key rotation: its entry under a fallback digest."""
        for caller in req.fallback_callers:
            alt = await cache.lookup(
                req.url,
                lambda spec, caller=caller: variant_of(req, spec, caller),  # type: ignore[misc]
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
            await self._other_method(scope, receive, send)
            return
        scope[_SCOPE_MARK] = True
        req = read_request(
            scope,
            private=self._private,
            credentials=self.policy.credentials,
            secret=self._secret,
        )
        if req is None:
            self.stats.misses += 1
            await self.app(scope, receive, tag(send, MISS))
            return
        await self._serve(scope, receive, send, req)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, req: CacheRequest) -> None:
        """A GET or HEAD the cache handles: from the entry when it may, else from the origin."""
        cc = req.cache_control
        revalidate = self.policy.request_no_cache == "revalidate" and (
            "no-cache" in cc or req.pragma_no_cache or cc.seconds("max-age") == 0
        )
        cache = self._caches(get_redis())
        lease_ms = 0 if revalidate else self._lease_ms
        found = await cache.lookup(
            req.url, lambda spec: variant_of(req, spec), self._hint(req.url), lease_ms=lease_ms
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
                state = self._entry_state(req, entry, age_ms)
                if state == "fresh":
                    self.stats.hits += 1
                    await send_entry(send, self.stats, req, entry, age_ms, HIT)
                    return
                if state == "stale":
                    self.stats.stale += 1
                    if served.leased:
                        self._spawn_refresh(scope, req, cache, served)
                    await send_entry(send, self.stats, req, entry, age_ms, STALE)
                    return
                if state == "if-error":
                    fallback = (entry, age_ms)
        await self._from_origin(scope, receive, send, req, cache, found, fallback)

    def _entry_state(
        self, req: CacheRequest, entry: StoredResponse, age_ms: int
    ) -> Literal["fresh", "stale", "if-error"] | None:
        """How a stored entry of this age may serve *req* (None: ask the origin)."""
        client_max_age = req.cache_control.seconds("max-age")
        too_old = (
            self.policy.request_no_cache == "revalidate"
            and client_max_age is not None
            and age_ms > client_max_age * 1000
        )
        if too_old:
            return None
        if age_ms <= entry.fresh_ms:
            return "fresh"
        if age_ms <= entry.fresh_ms + entry.swr_ms:
            return "stale"
        if age_ms <= entry.fresh_ms + entry.sie_ms:
            return "if-error"
        return None

    async def _from_origin(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        req: CacheRequest,
        cache: HttpResponseCache,
        found: Lookup | None,
        fallback: tuple[StoredResponse, int] | None,
    ) -> None:
        """Let the origin answer (storing a storable answer); *fallback* replaces its 5xx."""
        may_store = found is not None and "no-store" not in req.cache_control
        origin_scope = {**scope, "method": "GET"} if req.head else scope
        responder = OriginResponse(self, req, send, cache, found, may_store, fallback is not None)
        try:
            await self.app(origin_scope, receive, responder.send)
        except Exception:
            if fallback is None or responder.sent_start:
                raise
            log.warning("HTTP cache: the origin failed; serving the stale response", exc_info=True)
            responder.state = "swallow"
        if responder.state == "swallow" and fallback is not None:
            self.stats.stale += 1
            await send_entry(send, self.stats, req, fallback[0], fallback[1], STALE)
            return
        self.stats.misses += 1
        await responder.finish()

    # -- unsafe methods -------------------------------------------------------

    async def _other_method(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Neither GET nor HEAD: passed through, invalidating after an unsafe method."""
        if scope["method"] in _SAFE_METHODS or not self.policy.invalidate_on_unsafe:
            await self.app(scope, receive, send)
        else:
            scope[_SCOPE_MARK] = True
            await self.app(scope, receive, self._invalidating(scope, send))

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
        scheme, host, raw_path, query = request_target(scope)
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
        cache = self._caches(get_redis())
        for digest in digests:
            try:
                await cache.invalidate_digest(digest)
            except ToolkitError:
                self.stats.errors += 1

    # -- stale-while-revalidate ---------------------------------------------

    def _spawn_refresh(
        self, scope: Scope, req: CacheRequest, cache: HttpResponseCache, found: Lookup
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
        self, scope: Scope, req: CacheRequest, cache: HttpResponseCache, found: Lookup
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

        responder = OriginResponse(self, req, discard, cache, found, True, False)
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
