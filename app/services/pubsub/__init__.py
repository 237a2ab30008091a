"""Pub/sub fan-out: one supervised Redis connection per process, bounded local queues.

``Broadcaster`` multiplexes every local subscription of a process onto ONE
dedicated Redis pub/sub connection (one per shard with sharded pub/sub on a
Cluster). The connection is made for the broadcaster (it is never borrowed from
the client's pool, so it neither counts against the pool nor waits for it) and
speaks RESP2, so ``CLIENT LIST TYPE pubsub``, ``CLIENT KILL TYPE pubsub`` and the
server's ``client-output-buffer-limit pubsub`` apply to it.

Each local subscriber owns a bounded queue. When a subscriber does not keep up,
its overflow policy decides: ``"drop_oldest"`` (default) drops its oldest
queued message and counts it in ``Subscription.dropped``; ``"disconnect"`` ends
the subscription with ``SubscriberOverflow``. Either way the reader never
waits for a subscriber, so one slow WebSocket cannot stall the others.

Supervision: a reader task per connection dispatches messages; a pinger sends
``PING`` every ``ping_interval`` seconds and forces a reconnect when the
``PONG`` does not come back within ``ping_timeout`` (a half-open TCP link is
found this way; redis-py's ``health_check_interval`` only writes). After any
loss the connection is re-made with capped, jittered exponential backoff,
every channel and pattern is subscribed again, and each subscriber that was
live receives a ``Reconnected`` event carrying the gap. Errors are logged
(logger ``app.pubsub``) and counted in ``stats()``; nothing dies silently.
``publish`` and the history reads go through the client's circuit breaker
(``app.core.guard.Guard``): ``RedisUnavailable`` when Redis cannot be reached
or the breaker is open, ``RedisCommandError`` when Redis refuses a command.

Optional catch-up (``history``): a channel can be backed by a capped stream.
``publish`` then runs one script that appends to the stream
(``XADD MAXLEN ~``, TTL refreshed) and publishes in the same round trip, and
every message carries its stream id. A subscriber resumes from an id it saw
(``last_ids``, e.g. SSE ``Last-Event-ID``) and, after a reconnect, is replayed
what it missed before live messages continue, without duplicates.

Channel names are namespaced and escaped through ``KeySpace`` (service
``pubsub``), so untrusted names cannot reach other namespaces or act as globs:
the logical channel ``"chat:1"`` is the Redis channel ``<prefix>:pubsub:{chat%3A1}``.
Patterns support ``*`` and ``?`` over logical names.
"""

# The parts, one concern each: _types (what subscribers and publishers get back), _wire
# (subscription kinds, payload frames, stream ids), _subscription (Subscription, its bounded
# queue), _broadcaster (Broadcaster: options, names, publish, subscribe, stats) and the
# broadcaster's collaborators: _routing (which link a channel lives on), _link (one
# supervised connection), _dispatch (messages into queues), _history (catch-up). The Lua
# script is in lua/.

from app.services.pubsub._broadcaster import Broadcaster
from app.services.pubsub._subscription import Subscription
from app.services.pubsub._types import Event, Message, OverflowPolicy, Published, Reconnected

__all__ = [
    "Broadcaster",
    "Event",
    "Message",
    "OverflowPolicy",
    "Published",
    "Reconnected",
    "Subscription",
]
