"""The cache-relevant parts of a request: its key, its caller, its validators."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from starlette.types import Scope

from app.http.asgi import request_target
from app.http.caller import PRINCIPAL_KEY, caller_resolver, resolve_caller
from app.services.http_cache import (
    CacheControl,
    credential_digest,
    if_none_match_matches,
    normalize_path,
    parse_cache_control,
    parse_http_date,
    url_digest,
    variant_digest,
)

__all__ = ["CacheRequest", "not_modified", "read_request", "variant_of"]


@dataclass(slots=True)
class CacheRequest:
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


@dataclass(slots=True)
class _Fields:
    """The request headers the cache reads, joined as RFC 9110 §5.3 allows."""

    host: bytes | None = None
    cache_control: bytes | None = None
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None
    pragma_no_cache: bool = False
    credentials: list[tuple[bytes, bytes]] = field(default_factory=list)


def _scan(headers: list[tuple[bytes, bytes]], private: frozenset[bytes]) -> _Fields | None:
    """The fields the cache reads; None for a ``Range`` request (it bypasses the cache)."""
    found = _Fields()
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"host":
            found.host = value
        elif name == b"cache-control":
            cc = found.cache_control
            found.cache_control = value if cc is None else cc + b"," + value
        elif name == b"if-none-match":
            inm = found.if_none_match
            found.if_none_match = value if inm is None else inm + b"," + value
        elif name == b"if-modified-since":
            # more than one member makes the field invalid (RFC 9110 §13.1.3)
            found.if_modified_since = value if found.if_modified_since is None else b""
        elif name == b"range":
            return None
        elif name == b"pragma":
            found.pragma_no_cache = found.pragma_no_cache or b"no-cache" in value.lower()
        elif name in private:
            found.credentials.append((name, value))
    return found


def _callers(
    scope: Scope, credentials: list[tuple[bytes, bytes]], secret: bytes | None
) -> tuple[str, ...]:
    """The caller digests of a request with credentials: the current one, then fallbacks."""
    identity = resolve_caller(scope)
    if identity.identified:
        callers = identity.scopes()
    else:  # a credential header the caller settings do not list
        credentials.sort()
        keys = caller_resolver().keys
        callers = tuple(credential_digest(k, credentials) for k in keys)
    if secret is not None:
        callers = tuple(credential_digest(secret, [(b"caller", c.encode())]) for c in callers)
    return callers


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def read_request(
    scope: Scope,
    *,
    private: frozenset[bytes],
    credentials: Literal["private", "bypass"],
    secret: bytes | None,
) -> CacheRequest | None:
    """The request's cache-relevant parts; None when it must bypass the cache.

    *private* names the credential headers; a request carrying one (or a
    principal) gets a caller-keyed entry, or bypasses the cache when
    *credentials* is ``"bypass"``. *secret* adds an HMAC over the caller digests.
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    found = _scan(headers, private)
    if found is None:
        return None
    scheme, host_text, raw_path, query = request_target(scope, found.host)
    path = normalize_path(raw_path)
    if path is None:  # dot segments: see the package docstring
        return None
    callers: tuple[str, ...] = ()
    if found.credentials or scope.get(PRINCIPAL_KEY) is not None:  # anonymous: a shared entry
        if credentials == "bypass":
            return None
        callers = _callers(scope, found.credentials, secret)
    cache_control = found.cache_control
    return CacheRequest(
        headers=headers,
        head=scope["method"] == "HEAD",
        url=url_digest(scheme, host_text, path, query),
        scope=scope,
        caller=callers[0] if callers else "",
        fallback_callers=callers[1:],
        cache_control=parse_cache_control(_text(cache_control) if cache_control else None),
        pragma_no_cache=found.pragma_no_cache and cache_control is None,
        if_none_match=_text(found.if_none_match),
        if_modified_since=_text(found.if_modified_since),
    )


def variant_of(req: CacheRequest, spec: str, caller: str | None = None) -> str:
    """The variant digest of *req* for the ``Vary`` names in *spec* (comma-joined)."""
    caller = req.caller if caller is None else caller
    if not spec:
        return variant_digest("", caller, ())
    values = []
    for name in spec.split(","):
        wanted = name.encode("latin-1")
        values.append(b", ".join(v.strip() for n, v in req.headers if n.lower() == wanted))
    return variant_digest(spec, caller, values)


def not_modified(req: CacheRequest, etag: str, last_modified: int) -> bool:
    """RFC 9110 §13.2.2: If-None-Match decides when present, else If-Modified-Since."""
    if req.if_none_match is not None:
        return if_none_match_matches(req.if_none_match, etag)
    if req.if_modified_since is not None and last_modified > 0:
        since = parse_http_date(req.if_modified_since)
        return since is not None and last_modified <= since
    return False
