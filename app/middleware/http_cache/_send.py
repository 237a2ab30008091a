"""Answers the cache sends itself: a stored entry, a 304, and the ``X-Cache`` tag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from starlette.types import Send

from app.http.asgi import send_response, with_headers
from app.middleware.http_cache._request import CacheRequest, not_modified
from app.services.http_cache import HttpCacheStats, StoredResponse, format_http_date

__all__ = ["HIT", "MISS", "STALE", "send_entry", "send_not_modified", "tag"]

HIT: Final = b"HIT"
MISS: Final = b"MISS"
STALE: Final = b"STALE"

_VALIDATOR_HEADERS: Final = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary"}
)  # RFC 9110 §15.4.5: what a 304 carries


def tag(send: Send, x_cache: bytes) -> Send:
    """*send* with ``X-Cache: <x_cache>`` on the response."""
    return with_headers(send, [(b"x-cache", x_cache)])


async def send_not_modified(
    send: Send,
    stats: HttpCacheStats,
    headers: Sequence[tuple[bytes, bytes]],
    extra: list[tuple[bytes, bytes]],
) -> None:
    """A 304 carrying the validator headers of *headers*, plus *extra*."""
    stats.not_modified += 1
    kept = [(n, v) for n, v in headers if n.lower() in _VALIDATOR_HEADERS]
    await send_response(send, 304, kept + extra)


async def send_entry(
    send: Send,
    stats: HttpCacheStats,
    req: CacheRequest,
    entry: StoredResponse,
    age_ms: int,
    x_cache: bytes,
) -> None:
    """Answer *req* from a stored entry (a 304 when its validators match)."""
    extra = [(b"age", str(age_ms // 1000).encode()), (b"x-cache", x_cache)]
    headers = list(entry.headers)
    if entry.synthesized_lm and entry.last_modified:
        headers.append((b"last-modified", format_http_date(entry.last_modified).encode()))
    if entry.status == 200 and not_modified(req, entry.etag, entry.last_modified):
        await send_not_modified(send, stats, headers, extra)
        return
    if entry.status != 204:
        headers.append((b"content-length", str(len(entry.body)).encode()))
    await send_response(send, entry.status, headers + extra, b"" if req.head else entry.body)
