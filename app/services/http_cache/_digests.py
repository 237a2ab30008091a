"""Digests that name a variant, a caller's private entries and a representation (ETag)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

__all__ = ["compute_etag", "credential_digest", "variant_digest"]


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
