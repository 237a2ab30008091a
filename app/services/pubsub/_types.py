"""What pub/sub hands out: messages and reconnect events, publish results, the overflow
policies, and the process-local counters behind ``Broadcaster.stats()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, TypeAlias, TypeVar

from app.core.errors import ConfigurationError

__all__ = ["Event", "Message", "OverflowPolicy", "Published", "Reconnected"]

T = TypeVar("T")

OverflowPolicy = Literal["drop_oldest", "disconnect"]
"""What happens when a subscriber's queue is full: drop its oldest message (counted)
or end the subscription with ``SubscriberOverflow``."""


@dataclass(frozen=True, slots=True)
class Message(Generic[T]):
    """A message delivered to a subscriber.

    ``channel`` is the logical channel name (as given to ``publish``);
    ``pattern`` is the logical pattern when the message matched a pattern
    subscription; ``id`` is the stream id on history-backed channels, else None.
    ``traceparent`` is the publisher's W3C trace context when it published with
    telemetry on (see ``app.observability.continue_trace``), else None.
    """

    channel: str
    data: T
    pattern: str | None = None
    id: str | None = None
    traceparent: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The pub/sub link was lost and restored; the subscriber may have to resync.

    ``gap`` is the seconds between the last sign of life of the old connection
    and the moment every channel was subscribed again. ``may_have_missed`` is
    False only when every channel of the subscription is history-backed and
    the missed messages were replayed (``replayed`` of them follow this
    event); otherwise messages published during the gap are lost to it.
    Also yielded first when a ``last_ids`` replay at subscribe time could not
    be complete (history trimmed or expired), with ``gap`` 0.
    """

    gap: float
    may_have_missed: bool
    replayed: int = 0
    reason: str = ""


Event: TypeAlias = "Message[Any] | Reconnected"
"""What iterating a ``Subscription`` yields."""


class Published(NamedTuple):
    """Result of ``Broadcaster.publish``."""

    receivers: int
    """Subscribed connections that received it (on a Cluster: on the publishing node only)."""
    id: str | None
    """Stream id on history-backed channels, else None."""


def _check_overflow(policy: str) -> None:
    if policy not in ("drop_oldest", "disconnect"):
        raise ConfigurationError(
            f"unknown overflow policy {policy!r}; use 'drop_oldest' or 'disconnect'"
        )


@dataclass(slots=True)
class _Counters:
    """What a broadcaster did since it was built (its parts count here)."""

    published: int = 0
    publish_errors: int = 0
    received: int = 0
    delivered: int = 0
    dropped: int = 0
    overflow_disconnects: int = 0
    decode_errors: int = 0
    reconnects: int = 0
    errors: int = 0
    last_error: str | None = None
    last_gap: float | None = None
