"""The origin's answer on a miss: passed through, or buffered, stored and then sent."""

from __future__ import annotations

from typing import Protocol

from starlette.types import Message, Send

from app.middleware.http_cache._plan import StorePlan, plan_storage
from app.middleware.http_cache._policy import HttpCachePolicy
from app.middleware.http_cache._request import CacheRequest, not_modified, variant_of
from app.middleware.http_cache._send import MISS, send_not_modified
from app.services.http_cache import (
    HttpCacheStats,
    HttpResponseCache,
    Lookup,
    compute_etag,
    format_http_date,
)

__all__ = ["CacheLayer", "OriginResponse"]


class CacheLayer(Protocol):
    """What an origin response needs from the ``HttpCacheMiddleware`` that made it."""

    policy: HttpCachePolicy
    stats: HttpCacheStats
    _route_level: bool  # inside the session layer (HttpCacheRoute)
    _stored: frozenset[bytes]  # response header names an entry keeps

    def _remember(self, url: str, spec: str) -> None:
        """Note *spec* as the ``Vary`` names of *url*'s entries (the next lookup's hint)."""


class OriginResponse:
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
        mw: CacheLayer,
        req: CacheRequest,
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
        self.plan: StorePlan | None = None
        self.sent_start = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            if self.stale_fallback and self.status >= 500:
                self.state = "swallow"
                return
            self.plan = plan_storage(
                self.mw.policy,
                self.status,
                self.headers,
                self.req,
                route_level=self.mw._route_level,
            )
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
            variant = found.variant if plan.spec == found.spec else variant_of(self.req, plan.spec)
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
        if self.status == 200 and not_modified(self.req, etag, last_modified):
            self.sent_start = True
            await send_not_modified(
                self.send_downstream, self.mw.stats, headers, [(b"x-cache", MISS)]
            )
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
