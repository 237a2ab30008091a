"""The values a stream hands out: messages, dead letters, counters and stats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Generic, TypeVar

__all__ = [
    "PAYLOAD_FIELD",
    "ConsumerCounters",
    "DeadLetter",
    "Handler",
    "StreamMessage",
    "StreamStats",
]

T = TypeVar("T")

PAYLOAD_FIELD: Final = "payload"
"""The stream field that holds the codec envelope of a payload written by ``StreamProducer``."""


@dataclass(frozen=True, slots=True)
class StreamMessage(Generic[T]):
    """One stream entry handed to a handler.

    ``payload`` is the decoded value (typed when the consumer has ``payload_type``); entries
    not written by ``StreamProducer`` (no ``payload`` field) expose their fields as a
    ``dict[str, str]`` instead. ``deliveries`` is the PEL delivery count: 1 on the first
    delivery, +1 on every retry or claim. ``fields`` are the raw stream fields.
    """

    id: str
    payload: T
    deliveries: int
    stream: str
    group: str
    consumer: str
    fields: Mapping[Any, Any] = field(repr=False)

    @property
    def timestamp_ms(self) -> int:
        """Milliseconds since the epoch when the entry was added (from its id)."""
        return int(self.id.split("-", 1)[0])


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter entry: which entry failed, how often, why, and its original fields."""

    id: str
    original_id: str
    stream: str
    group: str
    consumer: str
    error: str
    deliveries: int
    failed_at_ms: int
    payload: Any
    fields: Mapping[str, Any] = field(repr=False)


@dataclass(slots=True)
class ConsumerCounters:
    """What this consumer object did since it was built (process-local, not in Redis)."""

    handled: int = 0  # handler calls that completed (success or failure)
    acked: int = 0
    failed: int = 0  # handler calls that raised
    retried: int = 0  # failures scheduled for another delivery
    dead_lettered: int = 0
    claimed: int = 0  # entries taken from idle consumers with XAUTOCLAIM
    recovered: int = 0  # own pending entries re-read at start or after an error
    deleted: int = 0  # pending entries whose stream entry was trimmed or deleted
    lost_claims: int = 0  # entries another consumer claimed while this one held them
    abandoned: int = 0  # handlers cancelled at the stop deadline (left pending)
    released: int = 0  # entries read ahead, not started when the consumer stopped (left pending)
    group_recreated: int = 0
    redis_errors: int = 0


@dataclass(frozen=True, slots=True)
class StreamStats:
    """A snapshot of one stream and consumer group (one pipelined round trip)."""

    stream: str
    group: str
    consumer: str
    length: int  # entries in the stream (acked ones included, until trimmed)
    lag: int | None  # entries not yet delivered to the group (None: Redis cannot tell)
    pending: int  # delivered, not yet acknowledged (the group's PEL)
    oldest_pending_id: str | None
    oldest_pending_idle: float | None  # seconds since the oldest pending entry was delivered
    consumers: int
    last_delivered_id: str | None
    dead_letters: int  # entries in the dead-letter stream
    in_flight: int  # handlers of this consumer object running now
    waiting_retry: int  # failed entries of this consumer waiting for their backoff
    counters: ConsumerCounters

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Entry:
    id: str
    fields: dict[Any, Any]
    deliveries: int


Handler = Callable[[StreamMessage[T]], Awaitable[Any]]
"""``async def handler(message: StreamMessage[T]) -> None``: raise to fail the delivery."""
