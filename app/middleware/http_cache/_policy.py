"""What the HTTP cache stores and for how long: ``HttpCachePolicy`` and the header sets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from app.core.errors import ConfigurationError
from app.core.guard import as_seconds
from app.services.http_cache import DEFAULT_MAX_BODY_SIZE

__all__ = ["DEFAULT_STORED_HEADERS", "NEVER_STORED", "HttpCachePolicy", "stored_header_names"]

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


NEVER_STORED: Final = frozenset(
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
        max_ttl: upper bound on any window read from the origin (``math.inf``: none).
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
        """Refuse a bad value with ``ConfigurationError`` (a ``ValueError``) naming the field."""
        for name in ("ttl", "max_age", "s_maxage", "stale_while_revalidate", "stale_if_error"):
            value = getattr(self, name)
            if value is not None:
                as_seconds(value, f"HttpCachePolicy.{name}", allow_zero=True)
        if self.max_ttl != math.inf:  # no cap
            as_seconds(self.max_ttl, "HttpCachePolicy.max_ttl", allow_zero=True)
        as_seconds(self.refresh_lease, "HttpCachePolicy.refresh_lease")
        if self.max_body_size < 0:
            raise ConfigurationError("HttpCachePolicy.max_body_size must be >= 0")
        if self.credentials not in ("private", "bypass"):
            raise ConfigurationError("HttpCachePolicy.credentials must be 'private' or 'bypass'")
        if self.request_no_cache not in ("revalidate", "ignore"):
            raise ConfigurationError(
                "HttpCachePolicy.request_no_cache must be 'revalidate' or 'ignore'"
            )


def stored_header_names(policy: HttpCachePolicy) -> frozenset[bytes]:
    """The lower-case response header names an entry keeps under *policy*."""
    return frozenset(h.lower().encode("latin-1") for h in policy.stored_headers) - NEVER_STORED
