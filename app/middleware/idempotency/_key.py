"""The key and the record: parsing ``Idempotency-Key``, naming a record, fingerprinting a request."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from typing import Final, Literal, TypeAlias

import orjson
from starlette.types import Scope

from app.core.errors import IdempotencyKeyInvalid
from app.core.keys import HmacKey
from app.http.headers import parse_sf_string

__all__ = [
    "DEFAULT_HEADER",
    "BodyFingerprint",
    "PrincipalFunc",
    "default_principal",
    "parse_idempotency_key",
    "record_name",
    "request_fingerprint",
]

DEFAULT_HEADER: Final = "Idempotency-Key"


BodyFingerprint: TypeAlias = "Literal['raw', 'json'] | Callable[[bytes], bytes | str]"
"""``"raw"``: the body bytes; ``"json"``: canonical JSON (sorted keys, compact; a body
that is not JSON counts raw); a callable: its digest of the body (e.g. selected fields)."""
PrincipalFunc: TypeAlias = "Callable[[Scope], str | bytes | None]"
"""The authenticated principal from the ASGI scope; None or "" defers to ``resolve_caller``."""

_MAX_KEY_LENGTH: Final = 255
_BARE_KEY: Final = re.compile(rb"[\x21\x23-\x7e]{1,255}")
"""A valid bare key: 1-255 visible ASCII characters, no double quote (the common case)."""
_U32: Final = struct.Struct(">I").pack


def parse_idempotency_key(value: bytes | str) -> str:
    """The key in an ``Idempotency-Key`` field value; raises ``IdempotencyKeyInvalid``.

    Accepts the draft's sf-string (``"abc"``, with ``\\"`` and ``\\\\`` escapes
    and optional ``;parameters``, which are ignored) and a bare token of visible
    ASCII characters (``abc``). The key, unquoted, must be 1-255 printable ASCII
    characters. ``"abc"`` and ``abc`` are the same key.
    """
    raw = value.encode("latin-1") if isinstance(value, str) else value
    text = raw.strip(b" \t")
    if _BARE_KEY.fullmatch(text):
        return text.decode("ascii")
    if text.startswith(b'"'):
        parsed = parse_sf_string(text)
        if parsed is None:
            raise IdempotencyKeyInvalid(
                "Idempotency-Key is a malformed quoted string: use printable ASCII between double "
                'quotes, escaping only \\" and \\\\, e.g. Idempotency-Key: "order-42"'
            )
        key = parsed
    else:
        if not text or any(b < 0x21 or b > 0x7E or b == 0x22 for b in text):
            raise IdempotencyKeyInvalid(
                "Idempotency-Key must be a quoted string or a token of visible ASCII "
                'characters, e.g. Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"'
            )
        key = text.decode("ascii")
    if not 1 <= len(key) <= _MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"Idempotency-Key must be 1-{_MAX_KEY_LENGTH} characters long, got {len(key)}; "
            "a UUID is a good key"
        )
    return key


def default_principal(scope: Scope) -> str:
    """``auth:<sha256 of the Authorization header>``, or ``""`` without one.

    The scope of earlier releases, kept for apps that pass it as ``principal=``;
    the default is now ``app.http.caller.resolve_caller``, which also tells
    cookie, ``X-API-Key`` and session callers apart.
    """
    for name, value in scope["headers"]:
        if name == b"authorization":
            return "auth:" + hashlib.sha256(value).hexdigest()
    return ""


def _length_prefixed(a: bytes, b: bytes, c: bytes, d: bytes) -> bytes:
    return b"".join((_U32(len(a)), a, _U32(len(b)), b, _U32(len(c)), c, _U32(len(d)), d))


def _encode(text: str | bytes | None) -> bytes:
    if text is None:
        return b""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def record_name(secret: bytes, scope: str | bytes | None, method: str, route: str, key: str) -> str:
    """The record of a request: HMAC of the caller scope, method, route and key (hex, 128 bits)."""
    data = _length_prefixed(
        _encode(scope),
        method.encode("utf-8", "surrogateescape"),
        route.encode("utf-8", "surrogateescape"),
        key.encode("utf-8", "surrogateescape"),
    )
    return HmacKey.of(secret).digest(data)[:16].hex()


def request_fingerprint(
    mode: BodyFingerprint, method: str, path: str, query: bytes, body: bytes
) -> str:
    """Digest of method, path, query string and body (the body as *mode* says)."""
    if mode == "raw":
        digest_of_body = body
    elif mode == "json":
        try:
            digest_of_body = b"j" + orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            digest_of_body = b"r" + body
    else:
        digest_of_body = _encode(mode(body))
    message = _length_prefixed(
        method.encode("utf-8", "surrogateescape"),
        path.encode("utf-8", "surrogateescape"),
        query,
        digest_of_body,
    )
    return hashlib.sha256(message).digest()[:16].hex()
