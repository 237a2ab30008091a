"""The reader's hot path: a message from Redis, decoded once per type, into every local
subscriber's queue (never awaiting, so one slow subscriber cannot stall the others)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from app.core.errors import CodecError
from app.services.pubsub._types import Message
from app.services.pubsub._wire import _FRAME, _TRACED, _untrace

if TYPE_CHECKING:
    from app.services.pubsub._broadcaster import Broadcaster
    from app.services.pubsub._link import _Link

log = logging.getLogger("app.pubsub")

_NO_VALUE: Final = object()


class _Dispatcher:
    """Delivers what a broadcaster's links read to its subscribers."""

    def __init__(self, owner: Broadcaster) -> None:
        self.owner = owner
        self.topics = owner._topics  # the broadcaster's dict itself (never rebound)
        self.counters = owner._counters

    def deliver(
        self, link: _Link, kind: int, channel: bytes, payload: bytes, pattern: bytes | None
    ) -> None:
        topic = self.topics.get((kind, channel if pattern is None else pattern))
        self.counters.received += 1
        if topic is None or topic.link is not link:
            return
        subs = topic.subs
        if not subs:
            return
        id_: str | None = None
        if payload and payload[0] == _FRAME:
            cut = payload.find(b"\x00", 1)
            if cut > 0:
                id_ = payload[1:cut].decode("ascii", "replace")
                payload = payload[cut + 1 :]
        trace, payload = _untrace(payload) if payload and payload[0] == _TRACED else (None, payload)
        if pattern is None:
            name, pattern_name = topic.name, None
        else:
            name, pattern_name = self.owner._logical(channel), topic.name
        last_type: Any = _NO_VALUE
        last_message: Any = None
        memo: dict[Any, Any] | None = None
        for sub in subs:
            type_ = sub._type
            if type_ is last_type:
                message = last_message
            else:
                if memo is not None and type_ in memo:
                    message = memo[type_]
                else:
                    message = self.decode(name, payload, type_, pattern_name, id_, trace)
                    if last_type is not _NO_VALUE:
                        if memo is None:
                            memo = {last_type: last_message}
                        memo[type_] = message
                last_type, last_message = type_, message
            if message is not None:
                sub._push(message)
                self.counters.delivered += 1

    def decode(
        self,
        channel: str,
        payload: bytes,
        type_: Any,
        pattern: str | None,
        id_: str | None,
        trace: str | None = None,
    ) -> Message[Any] | None:
        """The message, or None (counted and logged) when it cannot be decoded."""
        try:
            return Message(channel, self.owner.codec.decode(payload, type_), pattern, id_, trace)
        except CodecError as exc:
            self.counters.decode_errors += 1
            self.counters.last_error = f"undecodable message on {channel!r}: {exc}"
            log.warning("pub/sub: skipped an undecodable message on %r: %s", channel, exc)
            return None
