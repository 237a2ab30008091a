"""Redis Streams: a producer and a consumer-group worker that loses nothing.

``StreamProducer`` appends codec-encoded payloads (one ``XADD``, or one pipeline for
``add_many``). ``StreamConsumer`` runs a handler over a consumer group with
at-least-once delivery::

    producer = StreamProducer(redis, "events", maxlen=10_000)
    await producer.add({"n": 1})                       # -> "1718000000000-0"

    async def handler(message: StreamMessage[dict]) -> None: ...

    consumer = StreamConsumer(redis, "events", "group", "worker-1", handler)
    await consumer.ensure_group(); await consumer.run_once()   # -> number handled
    await consumer.run()          # until stop(); stop() drains in-flight handlers

The loop, in priority order on every turn:

1. retries whose backoff is over, then entries still pending for this consumer from an
   earlier life (a crash or a restart under the same name): its own PEL first;
2. entries idle longer than ``claim_idle`` in *any* consumer's PEL (dead consumers), taken
   with ``XAUTOCLAIM`` and its cursor followed to the end of the PEL;
3. new entries (``XREADGROUP >``), at most ``batch_size`` per read.

A consumer holds at most ``concurrency + prefetch`` entries between reading them and Redis
confirming their ack: up to ``concurrency`` handlers run, the rest wait in a local queue,
leased to this consumer like running ones (``prefetch`` defaults to what keeps two full
batches in the pipe: one handled while the next is read). At the bound the loop waits
without calling Redis, and the rest of the stream stays to the group's other consumers. After
a full read the next read does not block; a short one lets the next wait for new entries.
``stop()`` releases queued entries that no handler started: they stay pending for this
consumer and come back on its next start (or to another consumer after ``claim_idle``).

A handler that returns acks its entry. Acks are coalesced: the entries acked in one
event-loop turn go in one ``XACK``, sent at once, and those acked while it is in flight go
in the next; ``stop()`` and ``run_once()`` flush them before returning. One that raises
is retried after a capped, jittered exponential backoff; after ``max_deliveries`` deliveries
the entry goes to the dead-letter stream (original id, fields, error, delivery count) and is
acked, atomically, in one Lua script. Delivery counts come from the PEL, so a message that
crashes its worker (OOM, SIGKILL) is dead-lettered after ``max_deliveries`` crashes instead of
looping forever. While a handler runs, its claim is renewed (``XCLAIM ... JUSTID`` to itself,
owner-checked in Lua) every ``renew_interval``, so a job longer than ``claim_idle`` is not
taken by another consumer. Blocking reads stay below the client's ``socket_timeout``. A
``NOGROUP`` error (Redis restarted or flushed) recreates the group instead of stopping, and
connection errors are retried with backoff forever, until ``stop()``.

Every Redis call of a producer or consumer goes through the client's circuit breaker
(``app.core.guard.Guard``): callers get ``RedisUnavailable`` when Redis cannot be reached
or the breaker is open, and ``StreamError`` when Redis refuses a command (its text stays in
``__cause__``, for the logs). While the breaker is not closed the consumer's loop reads
without blocking, so its read never holds the breaker's one trial call.

Keys: the stream is ``<prefix>:stream:{<name>}`` and its dead-letter stream
``<prefix>:stream:{<name>}:dlq``: one hash tag, one Cluster slot, so the dead-letter script
touches both atomically. Streams are durable on purpose and carry no TTL; bound them with
``maxlen`` or ``trim()``.
"""

# The parts, one concern each: _keys (key names, consumer names), _models (what handlers and
# callers receive), _producer (StreamProducer, trim_stream), _consumer (StreamConsumer: its
# options and verbs) and the consumer's collaborators: _runner (the loop), _claims (retries,
# recovery, XAUTOCLAIM, leases), _delivery (local queue, handler workers, dead letters), _acks (coalesced
# XACK), _admin (stats, janitor, dead-letter reads). The Lua scripts are in lua/.

from app.services.streams._consumer import StreamConsumer
from app.services.streams._keys import StreamKeys, default_consumer_name, stream_keys
from app.services.streams._models import (
    PAYLOAD_FIELD,
    ConsumerCounters,
    DeadLetter,
    Handler,
    StreamMessage,
    StreamStats,
)
from app.services.streams._producer import StreamProducer, trim_stream

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
