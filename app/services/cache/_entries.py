"""Stored entries: the header format, fast decoding, and ``MISSING`` (no usable entry).

An entry is a codec payload, optionally behind a header that ``get_or_set``
and tags need: ``\\x02<stale ms>|<compute ms>|<escaped tags, space-separated>|<payload>``.
Entries without a stale window, a compute time or tags are the bare payload,
so a plain hit is one ``GET`` and one decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson
from pydantic import TypeAdapter, ValidationError
from pydantic_core import SchemaValidator

from app.core.codec import Codec
from app.core.errors import CodecError
from app.core.guard import as_text

__all__ = ["MISSING", "Entry", "EntryFormat", "json_validator"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""Default for ``get(key, MISSING)``: tells a miss from a stored ``None``."""


class Entry:
    """A stored entry split into its header fields and codec payload."""

    __slots__ = ("delta_ms", "payload", "stale_ms", "tags")

    def __init__(
        self, payload: bytes | str, stale_ms: int, delta_ms: int, tags: tuple[str, ...]
    ) -> None:
        self.payload = payload
        self.stale_ms = stale_ms
        self.delta_ms = delta_ms
        self.tags = tags


def json_validator(type_: Any) -> Callable[[bytes | str], Any]:
    """The fastest JSON validator for *type_* (pydantic-core's, without the Python wrapper)."""
    adapter = TypeAdapter(type_)
    validator = adapter.validator
    if isinstance(validator, SchemaValidator):
        return validator.validate_json
    return adapter.validate_json  # deferred or plugin-wrapped validators


class EntryFormat:
    """Writes and reads entries for one codec and one kind of client (bytes or str replies)."""

    __slots__ = ("_json_prefix", "_max_stored", "_sep", "_validators", "codec", "marker")

    def __init__(self, codec: Codec, decodes: bool) -> None:
        self.codec = codec
        self.marker: bytes | str = "\x02" if decodes else b"\x02"
        self._json_prefix: bytes | str = "\x01j-" if decodes else b"\x01j-"
        self._max_stored = codec.max_payload_bytes
        self._validators: dict[Any, Callable[[bytes | str], Any]] = {}
        self._sep: bytes | str = "|" if decodes else b"|"

    def wrap(self, payload: bytes, stale_ms: int, delta_ms: int, etags: Sequence[str]) -> bytes:
        if not (stale_ms or delta_ms or etags):
            return payload
        tags = " ".join(etags).encode()
        return b"\x02%d|%d|%s|" % (stale_ms, delta_ms, tags) + payload

    def split(self, data: bytes | str) -> Entry:
        if data[:1] != self.marker:
            return Entry(data, 0, 0, ())
        fields = data[1:].split(self._sep, 3)  # type: ignore[arg-type]
        if len(fields) != 4:
            raise CodecError("stored cache entry has a truncated header")
        stale, delta, tags, payload = fields
        try:
            stale_ms, delta_ms = int(stale), int(delta)
        except ValueError as exc:
            raise CodecError("stored cache entry has a corrupted header") from exc
        text = as_text(tags)
        return Entry(payload, stale_ms, delta_ms, tuple(text.split(" ")) if text else ())

    def decode(self, payload: bytes | str, type_: Any) -> Any:
        """Decode a codec payload; plain JSON envelopes skip the codec's generic path.

        Same result and errors as ``codec.decode`` (the JSON envelope is
        ``\\x01j-<json>``); every other format goes through the codec.
        """
        if payload[:3] != self._json_prefix or len(payload) > self._max_stored:
            return self.codec.decode(payload, type_)
        try:
            if type_ is None:
                return orjson.loads(payload[3:])
            validate = self._validators.get(type_)
            if validate is None:
                validate = self._validators[type_] = json_validator(type_)
            return validate(payload[3:])
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"corrupted JSON payload: {exc}") from exc
        except ValidationError as exc:
            raise CodecError(f"stored value does not match {type_!r}: {exc}") from exc
        except TypeError:  # an unhashable type expression: the codec copes
            return self.codec.decode(payload, type_)
