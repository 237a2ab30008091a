"""Redis Streams (moving into a package; the parts follow)."""

from app.services.streams._consumer import (
    PAYLOAD_FIELD,
    ConsumerCounters,
    DeadLetter,
    Handler,
    StreamConsumer,
    StreamKeys,
    StreamMessage,
    StreamProducer,
    StreamStats,
    default_consumer_name,
    stream_keys,
    trim_stream,
)

__all__ = [
    "PAYLOAD_FIELD",
    "ConsumerCounters",
    "DeadLetter",
    "Handler",
    "StreamConsumer",
    "StreamKeys",
    "StreamMessage",
    "StreamProducer",
    "StreamStats",
    "default_consumer_name",
    "stream_keys",
    "trim_stream",
]
