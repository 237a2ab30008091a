"""The stored form of a response: one compact binary blob (zlib above a threshold)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from app.core.errors import CodecError

__all__ = ["BLOB_MAGIC", "DEFAULT_MAX_BODY_SIZE", "StoredResponse", "decode_entry", "encode_entry"]

DEFAULT_MAX_BODY_SIZE: Final = 1024 * 1024
"""Bodies larger than this are never stored (and never inflated from storage)."""

BLOB_MAGIC: Final = b"H\x01"
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
    parts = [_BLOB_HEAD.pack(BLOB_MAGIC, flags, status, len(headers))]
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
        if magic != BLOB_MAGIC:
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
