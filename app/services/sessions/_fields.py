"""How a session maps to the fields of its hash: data through the codec, the subject, metadata.

Each top-level data key is the field ``d:<name>`` (a codec envelope); ``m:<name>``
and ``w:<nonce>`` are the write script's bookkeeping and never leave the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from app.core.codec import Codec
from app.core.errors import UsageError
from app.core.memo import BoundedMemo
from app.services.sessions._record import SessionRecord, new_record, time_of

__all__ = ["RecordFields"]


class RecordFields:
    """Encodes data for a write, decodes a hash into a ``SessionRecord``, names the subject.

    Every request that loads a session decodes the same stored values again (a
    user id, a name, a flag), so small values that decode to an immutable scalar
    (``int``, ``float``, ``str``, ``bool``, ``bytes``, ``None``) are remembered
    by their stored bytes: the codec runs once per distinct value, and sharing an
    immutable result between requests is safe. Anything else (a list, a dict, a
    tagged datetime) is decoded on every load, so no request can change what
    another one reads.
    """

    __slots__ = ("_decoded", "codec", "subject_key")

    def __init__(self, codec: Codec, subject_key: str | None) -> None:
        self.codec = codec
        self.subject_key = subject_key
        self._decoded: BoundedMemo[bytes | str, Any] = BoundedMemo(_REMEMBER_MAX)

    def subject_of(self, data: Mapping[str, Any]) -> str:
        key = self.subject_key
        if key is None:
            return ""
        value = data.get(key)
        return "" if value is None else str(value)

    def subject_change(
        self, values: Mapping[str, Any], removed: Sequence[str], *, replace: bool
    ) -> str | None:
        """The subject the write sets ('' clears it), or None when it keeps it."""
        key = self.subject_key
        if key is None:
            return None
        if key in values:
            return self.subject_of(values)
        if replace or key in removed:
            return ""
        return None

    def encode_items(self, values: Mapping[str, Any]) -> list[tuple[str, bytes]]:
        encode = self.codec.encode
        out = []
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise UsageError(f"session data keys must be non-empty strings, got {name!r}")
            out.append((name, encode(value)))
        return out

    def read(self, session_id: str, fields: dict[Any, Any]) -> SessionRecord | None:
        """``parse`` for a plain ``HGETALL`` reply: None when it is empty or no record.

        A hash without ``expires_at`` and ``idle_ms`` was not written by this
        store's scripts (they write every metadata field at once): it reads None.
        """
        if not fields:
            return None
        names = _TEXT_NAMES if isinstance(next(iter(fields)), str) else _BYTES_NAMES
        if names[_EXPIRES] not in fields or names[_IDLE] not in fields:
            return None
        return self.parse(session_id, fields)

    def parse(self, session_id: str, fields: dict[Any, Any]) -> SessionRecord:
        """The record of *session_id* from its hash (field names and values bytes or text).

        Takes *fields* over (it is emptied of the metadata). Data fields go
        through the codec (``CodecError`` when one does not decode); the
        scripts' bookkeeping (``m:``, ``w:``) and unknown fields are skipped.
        """
        # This runs on every load: the metadata is popped by name (dict lookups in C)
        # so that only the data and bookkeeping fields are looped over in Python.
        text = isinstance(next(iter(fields), ""), str)
        pop = fields.pop
        unique_key, client_ip, locked, created, modified, expires, version, subject, prefix, _ = (
            _TEXT_NAMES if text else _BYTES_NAMES
        )
        record = new_record(
            session_id,
            _text(pop(unique_key, "")),
            _text(pop(client_ip, "")) or None,
            _text(pop(locked, "")) == "1",
            time_of(pop(created, 0)),
            time_of(pop(modified, 0)),
            time_of(pop(expires, 0)),
            int(pop(version, 0)),
            _text(pop(subject, "")) or None,
            {},
        )
        known = self._decoded.get
        data = record.data
        for name, raw in fields.items():
            if name[:2] == prefix:
                value = known(raw, _UNSET)
                data[name[2:] if text else name[2:].decode()] = (
                    self._decode(raw) if value is _UNSET else value
                )
        return record

    def _decode(self, raw: bytes | str) -> Any:
        value = self.codec.decode(raw)
        if type(value) in _SCALARS and len(raw) <= _REMEMBER_MAX_LEN:
            self._decoded.put(raw, value)
        return value


_TEXT_NAMES: Final = (
    "unique_key", "client_ip", "locked", "created_at", "modified_at", "expires_at", "version",
    "subject", "d:", "idle_ms",
)  # fmt: skip
_EXPIRES: Final = 5  # indexes in _TEXT_NAMES / _BYTES_NAMES
_IDLE: Final = 9
_BYTES_NAMES: Final = tuple(name.encode() for name in _TEXT_NAMES)
_UNSET: Final = object()
_SCALARS: Final = frozenset({int, float, str, bool, bytes, type(None)})
_REMEMBER_MAX_LEN: Final = 256  # longer stored values are decoded every time
_REMEMBER_MAX: Final = 4096  # decoded values remembered per store (all forgotten when full)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
