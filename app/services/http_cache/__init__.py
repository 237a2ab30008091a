"""HTTP response caching in Redis per RFC 9110 / RFC 9111: parsers, entry layout, storage.

This package is the protocol and storage half of HTTP caching; the pure ASGI middleware
``app.middleware.http_cache`` drives it. It has three parts:

* **Parsers**, pure functions that never raise, whatever the input:
  ``parse_cache_control``, ``parse_if_none_match`` / ``if_none_match_matches``
  (weak comparison, RFC 9110 §13.1.2), ``parse_vary``, ``parse_http_date`` and
  ``normalize_query``. Malformed input is read leniently and, where a
  directive's meaning is unclear, in the direction that caches less: an
  unreadable ``max-age`` counts as 0, an unreadable ``Vary`` as ``*``.
* **Entry layout.** A stored response is one Redis hash: a compact binary blob
  (status, allow-listed headers, body, zlib above a threshold) plus the fields
  the Lua scripts reason about (ETag, Last-Modified, stored-at on the Redis
  clock, the fresh / stale-while-revalidate / stale-if-error windows and the
  generation it was stored under).
* **Storage.** ``HttpResponseCache`` over one client.

Keys (one hash tag per URL, so each script touches a single Cluster slot)::

    <prefix>:httpcache:{<url>}:m            meta: Vary spec, generation, newest Last-Modified
    <prefix>:httpcache:{<url>}:e:<variant>  one stored response
    <prefix>:httpcache:{<url>}:r:<variant>  stale-while-revalidate refresh lease

``<url>`` digests the method-normalised URL (HEAD is served from GET): scheme,
host (default port dropped), raw path and the query with its parameters
stably sorted by name. ``<variant>`` digests the Vary spec, the value of every
request header the response's ``Vary`` names and, for a request with
credentials, an HMAC of them (a private entry per caller).

A hit is one round trip: the lookup script reads the meta and the entry of
the variant the caller computed for the Vary spec it last saw for that URL;
only when the spec changed does a second lookup follow. An entry lives for
its fresh window plus the longer of its stale windows; the meta lives at
least as long as its longest-lived entry.

``invalidate(url)`` replaces the URL's generation: every variant, every
caller's private entry included, stops matching at once, and the orphans
expire with their TTL. The store script refuses a response whose lookup saw
an older generation, so a response computed before an invalidation can never
be stored after it.

Every Redis call goes through the store's ``app.core.guard.Guard``. Redis down:
``lookup`` and ``store`` fail open (they return ``None`` and count an error; the
core circuit breaker logs once per transition and skips Redis while open; a
refused command or an unreadable reply is logged once per change, never per
request). ``invalidate`` and ``clear`` raise ``RedisUnavailable``
(``RedisCommandError`` when Redis refuses the command): a silently failed
invalidation would leave stale data in place.
"""

from app.services.http_cache._digests import compute_etag, credential_digest, variant_digest
from app.services.http_cache._entry import (
    DEFAULT_MAX_BODY_SIZE,
    StoredResponse,
    decode_entry,
    encode_entry,
)
from app.services.http_cache._headers import (
    CacheControl,
    EntityTag,
    cache_control_for_private,
    format_http_date,
    if_none_match_matches,
    parse_cache_control,
    parse_entity_tag,
    parse_http_date,
    parse_if_none_match,
    parse_vary,
)
from app.services.http_cache._store import HttpCacheStats, HttpResponseCache, Lookup, StoreResult
from app.services.http_cache._urls import (
    normalize_host,
    normalize_path,
    normalize_query,
    url_digest,
    url_digest_for,
)

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "CacheControl",
    "EntityTag",
    "HttpCacheStats",
    "HttpResponseCache",
    "Lookup",
    "StoreResult",
    "StoredResponse",
    "cache_control_for_private",
    "compute_etag",
    "credential_digest",
    "decode_entry",
    "encode_entry",
    "format_http_date",
    "if_none_match_matches",
    "normalize_host",
    "normalize_path",
    "normalize_query",
    "parse_cache_control",
    "parse_entity_tag",
    "parse_http_date",
    "parse_if_none_match",
    "parse_vary",
    "url_digest",
    "url_digest_for",
    "variant_digest",
]
