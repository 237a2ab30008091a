"""Pub/sub fan-out (moving into a package; the parts follow)."""

from app.services.pubsub._broadcaster import (
    Broadcaster,
    Event,
    Message,
    OverflowPolicy,
    Published,
    Reconnected,
    Subscription,
)

__all__ = [
    "Broadcaster",
    "Event",
    "Message",
    "OverflowPolicy",
    "Published",
    "Reconnected",
    "Subscription",
]
