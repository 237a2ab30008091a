"""How a session maps to the fields of its hash: data through the codec, the subject, metadata.

Each top-level data key is the field ``d:<name>`` (a codec envelope); ``m:<name>``
and ``w:<nonce>`` are the write script's bookkeeping and never leave the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.core.codec import Codec
from app.core.errors import UsageError
from app.services.sessions._record import SessionRecord, time_of

__all__ = ["RecordFields"]


class RecordFields:
    """Encodes data for a write, decodes a hash into a ``SessionRecord``, names the subject."""

    __slots__ = ("codec", "subject_key")

    def __init__(self, codec: Codec, subject_key: str | None) -> None:
        self.codec = codec
        self.subject_key = subject_key

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

    def parse(self, session_id: str, items: Iterable[tuple[Any, Any]]) -> SessionRecord:
        meta: dict[str, str] = {}
        data: dict[str, Any] = {}
        decode = self.codec.decode
        # Decoded inline, not through as_text: this runs for every field of every load,
        # and the names and metadata are ASCII the scripts wrote.
        for raw_name, value in items:
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            kind = name[:2]
            if kind == "d:":
                data[name[2:]] = decode(value)
            elif kind != "m:" and kind != "w:":  # per-key versions, write nonces
                meta[name] = value.decode() if isinstance(value, bytes) else value
        get = meta.get
        return SessionRecord.model_construct(
            id=session_id,
            unique_key=get("unique_key", ""),
            client_ip=get("client_ip") or None,
            locked=get("locked") == "1",
            created_at=time_of(get("created_at", 0)),
            modified_at=time_of(get("modified_at", 0)),
            expires_at=time_of(get("expires_at", 0)),
            version=int(get("version", 0)),
            subject=get("subject") or None,
            data=data,
        )
