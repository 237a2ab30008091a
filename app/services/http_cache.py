"""HTTP response caching in Redis per RFC 9110 / RFC 9111: parsers, entry layout, storage.

This is the protocol and storage half of HTTP caching; the pure ASGI middleware
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

Redis down: ``lookup`` and ``store`` fail open (they return ``None`` and count
an error; the core circuit breaker logs once per transition and skips Redis
while open). ``invalidate`` and ``clear`` raise ``RedisUnavailable``: a
silently failed invalidation would leave stale data in place.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import email.utils
import hashlib
import hmac
import logging
import re
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import unquote_plus, urlsplit

from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import CodecError, RedisUnavailable, ToolkitError
from app.core.keys import KeySpace
from app.core.redis import AnyRedis, breaker_for, client_decodes_responses, unlink_matching
from app.core.scripts import Script, ScriptArg

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

log = logging.getLogger("app.http_cache")

DEFAULT_MAX_BODY_SIZE: Final = 1024 * 1024
"""Bodies larger than this are never stored (and never inflated from storage)."""

_LOOKUP = Script.from_package("app.services", "lua/http_cache_lookup.lua")
_STORE = Script.from_package("app.services", "lua/http_cache_store.lua")
_INVALIDATE = Script.from_package("app.services", "lua/http_cache_invalidate.lua")

# -- parsers ------------------------------------------------------------------

_TCHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_DIGITS: Final = re.compile(r"[0-9]+")
_DELTA_MAX: Final = 2_147_483_648  # RFC 9111 §1.2.2: larger delta-seconds mean this
_OWS: Final = " \t"
_MAX_FIELD_CHARS: Final = 16 * 1024  # longer values are cut (servers cap headers far below this)


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TCHARS for c in text)


def _split_members(value: str, *, escapes: bool) -> list[str]:
    """Split a comma-separated field value, honouring double quotes (and backslash escapes)."""
    value = value[:_MAX_FIELD_CHARS]
    members: list[str] = []
    start, quoted, i, n = 0, False, 0, len(value)
    while i < n:
        c = value[i]
        if quoted:
            if escapes and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ",":
            members.append(value[start:i])
            start = i + 1
        i += 1
    members.append(value[start:])
    return [m for m in (m.strip(_OWS) for m in members) if m]


def _unquote(raw: str) -> str:
    """The content of a quoted-string (lenient: a missing closing quote ends at the end)."""
    out: list[str] = []
    i, n = 1, len(raw)
    while i < n:
        c = raw[i]
        if c == "\\" and i + 1 < n:
            out.append(raw[i + 1])
            i += 2
            continue
        if c == '"':
            break
        out.append(c)
        i += 1
    return "".join(out)


def _delta_seconds(text: str | None) -> int | None:
    """delta-seconds, capped; None when *text* is not one."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    return _DELTA_MAX if len(text) > 10 else min(int(text), _DELTA_MAX)


class CacheControl(Mapping[str, "str | None"]):
    """Parsed ``Cache-Control`` directives: lower-case name -> argument (``None`` if bare).

    A directive repeated with two delta-seconds keeps the smaller one (RFC 9111
    §4.2.1 allows treating the conflict as stale; the smaller lifetime is the
    safe reading); any other repetition keeps the first.
    """

    __slots__ = ("_directives",)

    def __init__(self, directives: dict[str, str | None] | None = None) -> None:
        self._directives = directives or {}

    def __getitem__(self, name: str) -> str | None:
        return self._directives[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._directives)

    def __len__(self) -> int:
        return len(self._directives)

    def seconds(self, name: str) -> int | None:
        """The directive's delta-seconds; ``None`` when absent; 0 when malformed (safe: stale)."""
        if name not in self._directives:
            return None
        value = _delta_seconds(self._directives[name])
        return 0 if value is None else value

    def __repr__(self) -> str:
        return f"CacheControl({self._directives!r})"


def parse_cache_control(value: str | None) -> CacheControl:
    """Parse a ``Cache-Control`` field value (several lines joined with ``,``). Never raises."""
    directives: dict[str, str | None] = {}
    if not value:
        return CacheControl(directives)
    for member in _split_members(value, escapes=True):
        name, sep, raw = member.partition("=")
        name = name.strip(_OWS).lower()
        if not _is_token(name):
            continue
        arg: str | None = None
        if sep:
            raw = raw.strip(_OWS)
            arg = _unquote(raw) if raw.startswith('"') else raw
        if name not in directives:
            directives[name] = arg
            continue
        old, new = _delta_seconds(directives[name]), _delta_seconds(arg)
        if old is not None and new is not None and new < old:
            directives[name] = arg
    return CacheControl(directives)


def cache_control_for_private(value: str) -> str:
    """*value* turned into a private cache's header: ``private`` added, ``public`` and
    ``s-maxage`` (shared-cache directives) dropped, every other directive kept verbatim."""
    kept = []
    has_private = False
    for member in _split_members(value, escapes=True):
        name = member.partition("=")[0].strip(_OWS).lower()
        if name in ("public", "s-maxage"):
            continue
        has_private = has_private or name == "private"
        kept.append(member)
    if not has_private:
        kept.insert(0, "private")
    return ", ".join(kept)


class EntityTag(NamedTuple):
    """An entity tag: ``opaque`` keeps its double quotes (``'"abc"'``)."""

    weak: bool
    opaque: str

    def __str__(self) -> str:
        return ("W/" if self.weak else "") + self.opaque


def parse_entity_tag(value: str) -> EntityTag | None:
    """One entity tag (``"x"`` or ``W/"x"``), or ``None`` when *value* is not one. Never raises."""
    text = value.strip(_OWS)
    weak = text[:2] in ("W/", "w/")
    if weak:
        text = text[2:]
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and '"' not in text[1:-1]:
        return EntityTag(weak, text)
    return None


def parse_if_none_match(value: str) -> Literal["*"] | list[EntityTag]:
    """``*`` or the well-formed entity tags of an ``If-None-Match`` value. Never raises.

    Malformed members are skipped, and so is a ``*`` inside a list: both can
    only make a 304 less likely, never send one that the client did not ask for.
    """
    if value.strip(_OWS) == "*":
        return "*"
    tags = []
    for member in _split_members(value, escapes=False):
        tag = parse_entity_tag(member)
        if tag is not None:
            tags.append(tag)
    return tags


def if_none_match_matches(value: str, current: str) -> bool:
    """Does an ``If-None-Match`` value match the current ETag *current* (RFC 9110 §13.1.2)?

    Weak comparison: ``W/"x"`` matches ``"x"``. ``*`` matches any current
    representation. An unparsable *current* matches nothing but ``*``.
    """
    if value == current:
        return True
    parsed = parse_if_none_match(value)
    if parsed == "*":
        return True
    tag = parse_entity_tag(current)
    return tag is not None and any(t.opaque == tag.opaque for t in parsed)


def parse_vary(values: Iterable[str]) -> tuple[str, ...] | None:
    """Sorted, de-duplicated lower-case field names of ``Vary`` values; ``None`` for ``*``.

    A member that is not a field name also gives ``None``: a response that
    varies on something unreadable must not be stored. Never raises.
    """
    names: set[str] = set()
    for value in values:
        for member in value[:_MAX_FIELD_CHARS].split(","):
            name = member.strip(_OWS).lower()
            if not name:
                continue
            if name == "*" or not _is_token(name):
                return None
            names.add(name)
    return tuple(sorted(names))


def parse_http_date(value: str) -> int | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as epoch seconds, or ``None``. Never raises."""
    if not value or len(value) > 64:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        year, month, day, hour, minute, second = parsed[:6]
        dt.datetime(year, month, day, hour, minute, min(second, 59))  # out of range: ValueError
        return int(email.utils.mktime_tz(parsed))
    except Exception:  # the stdlib parser raises several types on odd input
        return None


def format_http_date(epoch_seconds: float) -> str:
    """An IMF-fixdate: ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(epoch_seconds, usegmt=True)


def _query_name(part: bytes) -> str:
    # Decoded exactly as Starlette's QueryParams decodes names, so two spellings the app
    # reads as one name always sort as equal and keep their relative order.
    return unquote_plus(part.split(b"=", 1)[0].decode("latin-1"))


def normalize_query(raw: bytes) -> bytes:
    """The query with empty parameters dropped and parameters stably sorted by decoded name.

    Values of a repeated name keep their order (``a=2&a=1`` stays distinct from
    ``a=1&a=2``), so two queries normalise alike only when the app reads the
    same parameters from them.
    """
    parts = [p for p in raw.split(b"&") if p]
    if len(parts) > 1:
        parts.sort(key=_query_name)
    return b"&".join(parts)


_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}


def normalize_host(scheme: str, host: str) -> str:
    """Lower-case host with the scheme's default port removed."""
    host = host.strip().lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return host


_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")


def normalize_path(raw: bytes, *, remove_dots: bool = False) -> bytes | None:
    """A raw path normalised per RFC 3986 §6.2.2: one spelling per resource. Never raises.

    Escapes of unreserved characters are decoded (``%7Euser`` -> ``~user``,
    ``%41`` -> ``A``), other escapes upper-cased (``%2f`` -> ``%2F``), and a
    ``%`` that starts no escape is spelled ``%25`` (as the app reads it). Dot
    segments (``.``, ``..``, also when escaped) are removed per §5.2.4 when
    *remove_dots*; otherwise a path that has any gives ``None``.
    """
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            value = int(raw[i + 1 : i + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + raw[i + 1 : i + 3].upper()
            i += 3
            continue
        if b == 0x25:  # a "%" that starts no escape means itself: spelled as one
            out += b"%25"
        else:
            out.append(b)
        i += 1
    segments = bytes(out).split(b"/")
    if not any(seg in (b".", b"..") for seg in segments):
        return bytes(out)
    if not remove_dots:
        return None
    kept: list[bytes] = []
    for index, seg in enumerate(segments):
        last = index == len(segments) - 1
        if seg == b".":
            if last:
                kept.append(b"")
        elif seg == b"..":
            if len(kept) > 1:
                kept.pop()
            if last:
                kept.append(b"")
        else:
            kept.append(seg)
    path = b"/".join(kept)
    return path if path.startswith(b"/") else b"/" + path


def url_digest(scheme: str, host: str, path: bytes, query: bytes) -> str:
    """The digest of a GET URL (HEAD shares it): scheme, normalised host, path, query.

    *path* is used as given: callers pass it through ``normalize_path``.
    """
    h = hashlib.sha256(b"GET\0")
    h.update(scheme.encode("latin-1", "replace"))
    h.update(b"\0")
    h.update(normalize_host(scheme, host).encode("latin-1", "replace"))
    h.update(b"\0")
    h.update(path)
    h.update(b"\0")
    h.update(normalize_query(query))
    return h.hexdigest()[:32]


def url_digest_for(url: str) -> str:
    """``url_digest`` of an absolute URL such as ``str(request.url_for(...))``."""
    parts = urlsplit(str(url))
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"{url!r} is not an absolute URL (scheme://host/path)")
    path = normalize_path((parts.path or "/").encode(), remove_dots=True) or b"/"
    return url_digest(parts.scheme.lower(), parts.netloc, path, parts.query.encode())


def _length_prefixed(h: Any, value: bytes) -> None:
    h.update(len(value).to_bytes(4, "big"))
    h.update(value)


def variant_digest(spec: str, caller: str, values: Sequence[bytes]) -> str:
    """The digest of a variant: Vary spec, caller digest ("" when shared), header values."""
    h = hashlib.sha256()
    _length_prefixed(h, spec.encode("latin-1", "replace"))
    _length_prefixed(h, caller.encode("ascii"))
    for value in values:
        _length_prefixed(h, value)
    return h.hexdigest()[:32]


def credential_digest(secret: bytes, credentials: Sequence[tuple[bytes, bytes]]) -> str:
    """An HMAC of a caller's credential headers: their private entries' identity.

    Keyed, so a Redis reader cannot test guesses of (low-entropy) Basic
    credentials or cookies against the key names.
    """
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for name, value in credentials:
        _length_prefixed(mac, name)
        _length_prefixed(mac, value)
    return mac.hexdigest()[:32]


def compute_etag(body: bytes, content_type: bytes = b"", content_encoding: bytes = b"") -> str:
    """A strong, quoted ETag from the representation: stable across processes and restarts.

    BLAKE2b-128 over content type, content encoding and body, base64url: a new
    body or a new encoding of it gives a new tag (RFC 9110 §8.8.3).
    """
    h = hashlib.blake2b(digest_size=16)
    _length_prefixed(h, content_type)
    _length_prefixed(h, content_encoding)
    h.update(body)
    return '"' + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii") + '"'


# -- entry layout -------------------------------------------------------------

_BLOB_MAGIC: Final = b"H\x01"
_BLOB_HEAD: Final = struct.Struct(">2sBHH")  # magic+version, flags, status, header count
_BLOB_FIELD: Final = struct.Struct(">BH")  # name length, value length
_FLAG_ZLIB: Final = 1
_FLAG_SYNTHESIZED_LM: Final = 2


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored: allow-listed headers (lower-case names), body and metadata.

    ``last_modified`` is epoch seconds (0: none); when ``synthesized_lm`` the
    header is not among ``headers`` and is added when the entry is served.
    Times are on the Redis server's clock.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    etag: str
    last_modified: int = 0
    synthesized_lm: bool = False
    stored_at_ms: int = 0
    fresh_ms: int = 0
    swr_ms: int = 0
    sie_ms: int = 0


def encode_entry(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    synthesized_lm: bool = False,
    compress_threshold: int = 0,
) -> bytes:
    """The binary blob of a response. Raises ``CodecError`` for a header that cannot fit."""
    flags = _FLAG_SYNTHESIZED_LM if synthesized_lm else 0
    if compress_threshold and len(body) > compress_threshold:
        packed = zlib.compress(body, 1)
        if len(packed) < len(body) - len(body) // 8:
            body, flags = packed, flags | _FLAG_ZLIB
    parts = [_BLOB_HEAD.pack(_BLOB_MAGIC, flags, status, len(headers))]
    for name, value in headers:
        if len(name) > 0xFF or len(value) > 0xFFFF:
            raise CodecError(f"header {name[:40]!r} is too long to store")
        parts += (_BLOB_FIELD.pack(len(name), len(value)), name, value)
    parts.append(body)
    return b"".join(parts)


def decode_entry(
    blob: bytes, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE
) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes, bool]:
    """``(status, headers, body, synthesized_lm)`` of a blob; ``CodecError`` when malformed."""
    try:
        magic, flags, status, count = _BLOB_HEAD.unpack_from(blob, 0)
        if magic != _BLOB_MAGIC:
            raise CodecError("stored HTTP response has an unknown layout version")
        pos = _BLOB_HEAD.size
        headers = []
        for _ in range(count):
            name_len, value_len = _BLOB_FIELD.unpack_from(blob, pos)
            pos += _BLOB_FIELD.size
            name = blob[pos : pos + name_len]
            value = blob[pos + name_len : pos + name_len + value_len]
            pos += name_len + value_len
            if len(name) != name_len or len(value) != value_len:
                raise CodecError("stored HTTP response is truncated")
            headers.append((name, value))
    except struct.error as exc:
        raise CodecError("stored HTTP response is truncated") from exc
    body = blob[pos:]
    if flags & _FLAG_ZLIB:
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(body, max_body_size + 1)
        except zlib.error as exc:
            raise CodecError(f"stored HTTP response body is corrupted: {exc}") from exc
        if len(body) > max_body_size or not inflater.eof:
            raise CodecError("stored HTTP response body is truncated or over the size cap")
    return status, tuple(headers), body, bool(flags & _FLAG_SYNTHESIZED_LM)


# -- storage ------------------------------------------------------------------


@dataclass
class HttpCacheStats:
    """Counters of one cache (shared by the middleware instances given the same object)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    not_modified: int = 0
    stores: int = 0
    uncacheable: int = 0
    refused: int = 0
    refreshes: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the lookup found: Redis time, the URL's generation and Vary spec, the entry.

    ``generation`` is "" when nothing was stored for the URL; ``variant`` is the
    variant digest for ``spec``; ``leased`` says this caller must refresh the
    (stale) entry in the background.
    """

    now_ms: int
    generation: str
    spec: str
    variant: str
    entry: StoredResponse | None = None
    leased: bool = False


@dataclass(frozen=True, slots=True)
class StoreResult:
    """``stored`` is False when the URL was invalidated after the lookup (nothing written)."""

    stored: bool
    stored_at_ms: int
    last_modified: int


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _ThrottledLog:
    """Log unexpected Redis errors at most once per interval and kind (never per request)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[type[BaseException], float] = {}

    def __call__(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        kind = type(exc)
        if now - self._last.get(kind, -self.interval) >= self.interval:
            self._last[kind] = now
            log.warning(message, exc)


class HttpResponseCache:
    """Stored HTTP responses in Redis: lookup, store, invalidate (see the module docstring).

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` True or False;
            with True the blob is stored base64-encoded so values stay UTF-8).
        namespace: the key space service name (``<prefix>:<namespace>:...``).
        timeout: seconds a lookup, store or invalidation may take before it
            counts as a Redis failure (None: the client's socket timeout bounds
            it; a tighter budget costs an event-loop timer per call).
        compress_threshold: zlib bodies larger than this (0: never).
        max_body_size: largest body stored and inflated.
        invalidation_window: seconds an invalidation is remembered at least, so
            a response computed before it (by a request slower than this at
            most) cannot be stored after it.
        stats: counters to update (shared between instances if given).
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        namespace: str = "httpcache",
        timeout: float | None = None,
        compress_threshold: int = 8192,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        invalidation_window: float = 60.0,
        stats: HttpCacheStats | None = None,
    ) -> None:
        self.redis = redis
        self.keys = KeySpace(get_settings().redis_key_prefix, namespace)
        self.timeout = timeout
        self.compress_threshold = compress_threshold
        self.max_body_size = max_body_size
        self.stats = stats if stats is not None else HttpCacheStats()
        self._root = self.keys.root
        self._text = client_decodes_responses(redis)
        self._breaker = breaker_for(redis)
        self._window_ms = max(1, int(invalidation_window * 1000))
        self._log = _ThrottledLog()

    def _meta(self, url: str) -> str:
        return f"{self._root}{{{url}}}:m"

    def _entry(self, url: str, variant: str) -> str:
        return f"{self._root}{{{url}}}:e:{variant}"

    def _lease(self, url: str, variant: str) -> str:
        return f"{self._root}{{{url}}}:r:{variant}"

    async def _call(self, script: Script, keys: list[str], args: list[ScriptArg]) -> Any:
        """Run *script* under the breaker and the timeout; None when Redis is unavailable."""
        try:
            with self._breaker:
                if self.timeout is None:
                    return await script(self.redis, keys, args)
                async with asyncio.timeout(self.timeout):
                    return await script(self.redis, keys, args)
        except RedisUnavailable:
            self.stats.errors += 1  # the breaker logs its transitions; nothing per request
        except RedisError as exc:
            self.stats.errors += 1
            self._log("HTTP cache: Redis refused a command (%s); serving without the cache", exc)
        except Exception as exc:  # e.g. a binary entry read through a decode_responses client
            self.stats.errors += 1
            self._log("HTTP cache: unexpected error (%r); serving without the cache", exc)
        return None

    async def lookup(
        self,
        url: str,
        variant_for: Callable[[str], str],
        spec_hint: str = "",
        *,
        lease_ms: int = 0,
    ) -> Lookup | None:
        """Find the stored response for a request: one round trip unless the URL's Vary changed.

        *url* is the ``url_digest``; ``variant_for(spec)`` gives the request's
        variant digest for a Vary spec; *spec_hint* is the spec to try first.
        With *lease_ms* > 0, a caller that finds the entry stale within its
        stale-while-revalidate window takes the refresh lease (``leased``) when
        no one holds it (the lease expires after *lease_ms*, so a caller
        cancelled after taking it only delays the next refresh). Read-only
        otherwise. Returns ``None`` when Redis is unavailable (fail-open); a
        corrupt entry reads as a miss.
        """
        spec = spec_hint
        variant = variant_for(spec)
        reply: Any = None
        for _ in range(2):
            reply = await self._call(
                _LOOKUP,
                [self._meta(url), self._entry(url, variant), self._lease(url, variant)],
                [spec, lease_ms],
            )
            if reply is None:
                return None
            if len(reply) == 1:
                return Lookup(int(reply[0]), "", spec, variant)
            found_spec = _text(reply[1])
            if found_spec == spec:
                break
            spec = found_spec
            variant = variant_for(spec)
        else:  # the URL's Vary changed again between the two lookups: a miss
            return Lookup(int(reply[0]), _text(reply[2]), spec, variant)
        now, generation = int(reply[0]), _text(reply[2])
        if len(reply) < 11:
            return Lookup(now, generation, spec, variant)
        try:
            entry = self._decode(reply)
        except CodecError as exc:
            self.stats.errors += 1
            self._log("HTTP cache: unreadable stored response (%s); treated as a miss", exc)
            return Lookup(now, generation, spec, variant)
        return Lookup(now, generation, spec, variant, entry, bool(int(reply[10])))

    def _decode(self, reply: Sequence[Any]) -> StoredResponse:
        blob = reply[3]
        try:
            # Entries written through a decode_responses=True client are base64 text.
            if isinstance(blob, str) or not blob.startswith(_BLOB_MAGIC):
                blob = base64.b64decode(blob, validate=True)
            status, headers, body, synthesized = decode_entry(
                blob, max_body_size=self.max_body_size
            )
            return StoredResponse(
                status=status,
                headers=headers,
                body=body,
                etag=_text(reply[4]),
                last_modified=int(reply[5]),
                synthesized_lm=synthesized,
                stored_at_ms=int(reply[6]),
                fresh_ms=int(reply[7]),
                swr_ms=int(reply[8]),
                sie_ms=int(reply[9]),
            )
        except (binascii.Error, ValueError, TypeError) as exc:
            raise CodecError(f"stored HTTP response is malformed: {exc}") from exc

    async def store(
        self,
        url: str,
        variant: str,
        *,
        spec: str,
        generation: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        etag: str,
        last_modified: int | None,
        fresh_ms: int,
        swr_ms: int = 0,
        sie_ms: int = 0,
    ) -> StoreResult | None:
        """Store a response for one variant of *url*, atomically with the URL's meta.

        *generation* is the one the caller's lookup saw: when the URL was
        invalidated since, nothing is written (``stored=False``). The entry
        lives ``fresh_ms`` plus the longer stale window; the stored-at time is
        the Redis clock's. *last_modified* (epoch s) is the origin's, ``0`` for
        none, ``None`` to synthesize one (see ``http_cache_store.lua``). The
        refresh lease of the variant is released. Atomic: entry and meta are
        written by one script, so a cancelled call stored all or nothing.
        Returns ``None`` when Redis is unavailable or the response cannot be
        encoded (nothing stored).
        """
        try:
            blob = encode_entry(
                status,
                headers,
                body,
                synthesized_lm=last_modified is None,
                compress_threshold=self.compress_threshold,
            )
        except CodecError as exc:
            self.stats.uncacheable += 1
            log.debug("HTTP cache: response not stored: %s", exc)
            return None
        payload: bytes | str = base64.b64encode(blob).decode("ascii") if self._text else blob
        reply = await self._call(
            _STORE,
            [self._meta(url), self._entry(url, variant), self._lease(url, variant)],
            [
                spec,
                generation,
                secrets.token_hex(8),
                payload,
                etag,
                -1 if last_modified is None else last_modified,
                max(0, fresh_ms),
                max(0, swr_ms),
                max(0, sie_ms),
                self._window_ms,
            ],
        )
        if reply is None:
            return None
        result = StoreResult(bool(int(reply[0])), int(reply[1]), int(reply[2]))
        if result.stored:
            self.stats.stores += 1
        else:
            self.stats.refused += 1
        return result

    async def invalidate(self, url: str) -> bool:
        """Drop every stored variant of an absolute URL (all callers' entries), atomically.

        ``await cache.invalidate(str(request.url_for("get_item", item_id=1)))``.
        Query order does not matter; HEAD shares the GET entry. One script: a
        cancelled call invalidated everything or nothing. The invalidation is
        remembered for ``invalidation_window`` seconds at least (the meta hash's
        TTL). Returns whether a response had been stored since the last
        invalidation. Raises
        ``RedisUnavailable`` when Redis cannot be reached: the caller must know
        the old response may still be served.
        """
        return await self.invalidate_digest(url_digest_for(url))

    async def invalidate_digest(self, url: str) -> bool:
        """``invalidate`` for a ``url_digest`` the caller computed."""
        keys: list[str] = [self._meta(url)]
        args: list[ScriptArg] = [secrets.token_hex(8), self._window_ms]
        try:
            with self._breaker:
                if self.timeout is None:
                    reply = await _INVALIDATE(self.redis, keys, args)
                else:
                    async with asyncio.timeout(self.timeout):
                        reply = await _INVALIDATE(self.redis, keys, args)
        except RedisError as exc:
            raise ToolkitError(f"HTTP cache invalidation failed: {exc}") from exc
        return bool(int(reply))

    async def clear(self) -> int:
        """Delete every key of this namespace (SCAN + UNLINK on every primary); returns the count.

        Not atomic: responses stored during the walk may survive it. Raises
        ``RedisUnavailable`` when Redis cannot be reached.
        """
        try:
            with self._breaker:
                return await unlink_matching(self.redis, self.keys.pattern("*"))
        except RedisError as exc:
            raise ToolkitError(f"HTTP cache clear failed: {exc}") from exc
