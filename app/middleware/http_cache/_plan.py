"""Whether and how a response is stored: freshness, stale windows, the headers it gets.

RFC 9111 §3 (storing), §4.2.1 (freshness lifetime) and §5.2.2 (response
directives), as this cache applies them to a response start message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.middleware._order import session_replaced
from app.middleware.http_cache._policy import HttpCachePolicy
from app.middleware.http_cache._request import CacheRequest
from app.services.http_cache import (
    cache_control_for_private,
    parse_cache_control,
    parse_http_date,
    parse_vary,
)

__all__ = ["StorePlan", "generated_cache_control", "plan_storage"]


@dataclass(frozen=True, slots=True)
class StorePlan:
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


@dataclass(slots=True)
class _Origin:
    """What the origin's response headers say about storing it."""

    cache_control: list[str] = field(default_factory=list)
    vary: list[str] = field(default_factory=list)
    etag: str | None = None
    last_modified: int | None = None
    expires: str | None = None
    content_type: bytes = b""
    content_encoding: bytes = b""


@dataclass(frozen=True, slots=True)
class _Windows:
    fresh: float
    swr: float
    sie: float
    header: str | None  # the Cache-Control to send (None: the origin's, unchanged)


def _seconds_ms(value: float, cap: float) -> int:
    return int(min(value, cap) * 1000)


def _too_long(value: bytes, limit: int) -> bool:
    try:
        return int(value) > limit
    except ValueError:
        return True


def _read_origin(headers: Sequence[tuple[bytes, bytes]], policy: HttpCachePolicy) -> _Origin | None:
    """The origin's storage-relevant headers; None when one of them forbids storing."""
    found = _Origin(vary=list(policy.vary))
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"set-cookie":
            return None
        if name == b"cache-control":
            found.cache_control.append(value.decode("latin-1"))
        elif name == b"vary":
            found.vary.append(value.decode("latin-1"))
        elif name == b"etag":
            found.etag = value.decode("latin-1").strip()
        elif name == b"last-modified":
            found.last_modified = parse_http_date(value.decode("latin-1"))
        elif name == b"expires":
            found.expires = value.decode("latin-1")
        elif name == b"content-type":
            found.content_type = value
            if value.lower().startswith(b"text/event-stream"):
                return None
        elif name == b"content-encoding":
            found.content_encoding = value
        elif name == b"content-length" and _too_long(value, policy.max_body_size):
            return None
    return found


def _origin_windows(origin: _Origin, policy: HttpCachePolicy, private: bool) -> _Windows | None:
    """Freshness and stale windows from the origin's ``Cache-Control`` / ``Expires``."""
    cc = parse_cache_control(", ".join(origin.cache_control))
    if "no-store" in cc or "no-cache" in cc or (not private and "private" in cc):
        return None
    s_maxage, max_age = cc.seconds("s-maxage"), cc.seconds("max-age")
    if s_maxage is not None and not private:
        fresh = float(s_maxage)
    elif max_age is not None:
        fresh = float(max_age)
    elif origin.expires is not None:
        when = parse_http_date(origin.expires)
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
    header: str | None
    if origin.cache_control:
        joined = ", ".join(origin.cache_control)
        # The origin's own public / s-maxage is its decision to share; anything
        # else sent to a caller with credentials is made private.
        shared_by_origin = "public" in cc or "s-maxage" in cc
        header = cache_control_for_private(joined) if private and not shared_by_origin else joined
    else:  # Expires alone says how fresh; a caller's entry still says private
        header = "private" if private else None
    return _Windows(fresh, swr, sie, header)


def plan_storage(
    policy: HttpCachePolicy,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    req: CacheRequest,
    *,
    route_level: bool,
) -> StorePlan | None:
    """How to store a response with this start message, or None when it must not be.

    *route_level*: the cache wraps one route, inside the session layer.
    """
    if status not in policy.cacheable_statuses or session_replaced(req.scope):
        return None
    if route_level and getattr(req.scope.get("session"), "accessed", False):
        # Inside the session layer its Set-Cookie comes later: a response that used
        # the session is per client and never stored.
        return None
    origin = _read_origin(headers, policy)
    if origin is None:
        return None
    names = parse_vary(origin.vary)
    if names is None:
        return None
    private = bool(req.caller)
    windows: _Windows | None
    if not origin.cache_control and origin.expires is None:
        windows = _Windows(
            policy.ttl,
            policy.stale_while_revalidate,
            policy.stale_if_error,
            generated_cache_control(policy, private),
        )
    else:
        windows = _origin_windows(origin, policy, private)
    if windows is None:
        return None
    cap = policy.max_ttl
    fresh_ms, swr_ms, sie_ms = (
        _seconds_ms(v, cap) for v in (windows.fresh, windows.swr, windows.sie)
    )
    if fresh_ms + max(swr_ms, sie_ms) <= 0:
        return None
    header = windows.header
    return StorePlan(
        spec=",".join(names),
        fresh_ms=fresh_ms,
        swr_ms=swr_ms,
        sie_ms=sie_ms,
        cache_control=None if header is None else header.encode("latin-1", "replace"),
        vary=", ".join(names).encode("latin-1") if policy.vary else None,
        etag=origin.etag,
        last_modified=origin.last_modified,
        content_type=origin.content_type,
        content_encoding=origin.content_encoding,
    )


def generated_cache_control(policy: HttpCachePolicy, private: bool) -> str:
    """The ``Cache-Control`` given to a response without one."""
    p = policy
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
