"""Structured field values (RFC 8941 / RFC 9651) as the toolkit's headers use them.

``parse_sf_string`` reads the quoted key of ``Idempotency-Key: "8e03..."``;
``sf_string`` and ``sf_item`` write the members of ``RateLimit-Policy`` and
``RateLimit`` (``"burst";q=10;w=1``).

The HTTP caching fields (``Cache-Control``, ``Vary``, validators, dates:
RFC 9110 / 9111) are parsed in ``app.services.http_cache``, beside the store
that also reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["parse_sf_string", "sf_item", "sf_string"]

_QUOTE = 0x22
_BACKSLASH = 0x5C


def parse_sf_string(text: bytes) -> str | None:
    """The value of an sf-string Item (``"abc"``, escapes ``\\"`` and ``\\\\``), or None.

    *text* starts at the opening quote. Parameters after the closing quote
    (``;a=1``) are allowed and ignored, as long as they are printable ASCII
    without a quote. None when the string is malformed: an unknown escape, a
    character outside printable ASCII, no closing quote, or anything but
    parameters after it.
    """
    out = bytearray()
    i, n = 1, len(text)
    while i < n:
        b = text[i]
        if b == _BACKSLASH:  # only \" and \\ are escapes (RFC 8941 §3.3.3)
            if i + 1 >= n or text[i + 1] not in (_QUOTE, _BACKSLASH):
                return None
            out.append(text[i + 1])
            i += 2
            continue
        if b == _QUOTE:
            rest = text[i + 1 :]
            if rest and not (
                rest.startswith(b";") and all(0x20 <= c <= 0x7E and c != _QUOTE for c in rest)
            ):
                return None
            return out.decode("ascii")
        if b < 0x20 or b > 0x7E:
            return None
        out.append(b)
        i += 1
    return None


def sf_string(value: str) -> str:
    """*value* serialized as an sf-string (RFC 8941 §4.1.6): quoted, ``\\`` and ``"`` escaped.

    *value* must be printable ASCII (policy names are, by their own rule).
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sf_item(value: str, params: Mapping[str, int | str]) -> str:
    """An sf-string Item with parameters: ``"name";q=10;qu="concurrent-requests"``.

    Integer parameters are written as they are, strings as sf-strings; the
    order is *params*' order.
    """
    parts = [sf_string(value)]
    for key, param in params.items():
        parts.append(f"{key}={param}" if isinstance(param, int) else f"{key}={sf_string(param)}")
    return ";".join(parts)
