"""What travels on the pub/sub connection: subscription kinds, payload frames, stream ids.

A published payload is the codec envelope, behind at most two optional frames: on a
history-backed channel ``"\\x02" <stream id> "\\x00"`` (written by the publish script), and
while tracing is on ``"\\x03" <W3C traceparent> "\\x00"``.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeAlias

from app.core.telemetry import carrier

_CHANNEL: Final = 0  # SUBSCRIBE / PUBLISH
_PATTERN: Final = 1  # PSUBSCRIBE
_SHARD: Final = 2  # SSUBSCRIBE / SPUBLISH
_Key: TypeAlias = tuple[int, bytes]  # (kind, Redis channel or pattern)

_FRAME: Final = 2  # first byte of a history-backed payload: "\x02" <stream id> "\x00" <envelope>
_TRACED: Final = 3  # "\x03" <W3C traceparent> "\x00" <envelope>: sent only while tracing is on

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_ZERO_ID: Final = (0, 0)


def _parse_id(value: str | bytes) -> tuple[int, int]:
    text = value.decode("ascii") if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _valid_id(value: str | None) -> bool:
    return value is not None and _STREAM_ID.match(value) is not None


def _with_trace(payload: bytes) -> bytes:
    """*payload* behind a ``_TRACED`` frame carrying the current trace context, if any."""
    trace = carrier()
    return payload if not trace else b"\x03" + trace[1].encode("ascii") + b"\x00" + payload


def _untrace(payload: Any) -> tuple[str | None, Any]:
    """Split a ``_TRACED`` frame: (traceparent, envelope); (None, payload) without one."""
    marker: Any = "\x03" if isinstance(payload, str) else b"\x03"
    end: Any = "\x00" if isinstance(payload, str) else b"\x00"
    if payload[:1] != marker or (cut := payload.find(end, 1)) < 0:
        return None, payload
    trace = payload[1:cut]
    return trace if isinstance(trace, str) else trace.decode("ascii", "replace"), payload[cut + 1 :]
