"""One spelling per resource: normalised host, path and query, and the URL digest of a key."""

from __future__ import annotations

import hashlib
from typing import Final
from urllib.parse import unquote_plus, urlsplit

from app.core.errors import ConfigurationError

__all__ = ["normalize_host", "normalize_path", "normalize_query", "url_digest", "url_digest_for"]


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
    """``url_digest`` of an absolute URL such as ``str(request.url_for(...))``.

    ``ConfigurationError`` (a ``ValueError``) when *url* has no scheme or host.
    """
    parts = urlsplit(str(url))
    if not parts.scheme or not parts.netloc:
        raise ConfigurationError(f"{url!r} is not an absolute URL (scheme://host/path)")
    path = normalize_path((parts.path or "/").encode(), remove_dots=True) or b"/"
    return url_digest(parts.scheme.lower(), parts.netloc, path, parts.query.encode())
