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

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, NamedTuple, TypeAlias, TypeVar, overload
from urllib.parse import unquote_to_bytes

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from app.core.codec import Codec, default_codec
from app.core.config import get_settings
from app.core.errors import (
    CodecError,
    ConfigurationError,
    RedisUnavailable,
    SubscriberOverflow,
    ToolkitError,
)
from app.core.keys import KeySpace, bound_pattern, escape, escape_glob
from app.core.redis import (
    CONNECTION_ERRORS,
    REFUSED_FOR_NOW,
    AnyRedis,
    breaker_for,
    client_decodes_responses,
    is_cluster,
)
from app.core.scripts import Script
from app.core.telemetry import carrier, traced

__all__ = [
    "Broadcaster",
    "Event",
    "Message",
    "OverflowPolicy",
    "Published",
    "Reconnected",
    "Subscription",
]

log = logging.getLogger("app.pubsub")

T = TypeVar("T")

OverflowPolicy = Literal["drop_oldest", "disconnect"]
"""What happens when a subscriber's queue is full: drop its oldest message (counted)
or end the subscription with ``SubscriberOverflow``."""

_PUBLISH = Script.from_package("app.services.pubsub", "lua/pubsub_publish.lua")

_CHANNEL: Final = 0  # SUBSCRIBE / PUBLISH
_PATTERN: Final = 1  # PSUBSCRIBE
_SHARD: Final = 2  # SSUBSCRIBE / SPUBLISH
_SUBSCRIBE = (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE")
_UNSUBSCRIBE = (b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"SUNSUBSCRIBE")
_ACK_KIND = {b"subscribe": _CHANNEL, b"psubscribe": _PATTERN, b"ssubscribe": _SHARD}
_UNACK_KIND = {b"unsubscribe": _CHANNEL, b"punsubscribe": _PATTERN, b"sunsubscribe": _SHARD}
_FRAME: Final = 2  # first byte of a history-backed payload: "\x02" <stream id> "\x00" <envelope>
_TRACED: Final = 3  # "\x03" <W3C traceparent> "\x00" <envelope>: sent only while tracing is on
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_COMMAND_CHUNK: Final = 512  # names per SUBSCRIBE command when (re)subscribing many
_ZERO_ID: Final = (0, 0)
_REPLAY_ATTEMPTS: Final = 3

_Key: TypeAlias = tuple[int, bytes]
_REDIS_DOWN: tuple[type[BaseException], ...] = (RedisUnavailable, *CONNECTION_ERRORS)


# -- public value types -------------------------------------------------------


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


# -- stream ids -----------------------------------------------------------------


def _parse_id(value: str | bytes) -> tuple[int, int]:
    text = value.decode("ascii") if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- subscriptions ------------------------------------------------------------


class _Topic:
    """One Redis channel or pattern and the local subscribers on it."""

    __slots__ = ("active", "detected_at", "key", "link", "lost_at", "name", "subs")

    def __init__(self, key: _Key, name: str, link: _Link) -> None:
        self.key = key
        self.name = name
        self.link = link
        self.subs: tuple[Subscription[Any], ...] = ()
        self.active = asyncio.Event()  # the server has confirmed the subscription
        self.lost_at: float | None = None  # last sign of life before the loss
        self.detected_at: float | None = None  # when the loss was noticed


_NO_VALUE: Final = object()


class Subscription(Generic[T]):
    """A local subscriber: an async iterator of ``Message[T]`` and ``Reconnected`` events.

    Obtained from ``Broadcaster.subscribe(...)``; valid inside that ``async with``.
    Iteration ends when the broadcaster shuts down (after the queued messages),
    and raises ``SubscriberOverflow`` when the ``disconnect`` policy dropped it.
    """

    def __init__(
        self,
        owner: Broadcaster,
        channels: tuple[str, ...],
        patterns: tuple[str, ...],
        type_: Any,
        queue_size: int,
        overflow: OverflowPolicy,
    ) -> None:
        self.channels = channels
        self.patterns = patterns
        self.queue_size = queue_size
        self.overflow: OverflowPolicy = overflow
        self.dropped = 0
        """Messages dropped from this subscriber's queue (``drop_oldest`` policy)."""
        self.received = 0
        """Live messages delivered to this subscriber's queue (dropped ones included)."""
        self._owner = owner
        self._type = type_
        self._queue: collections.deque[Any] = collections.deque()
        self._replay: collections.deque[Message[T] | Reconnected] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: str | None = None  # "shutdown", "overflow" or "exited"
        self._activated_at: float | None = None
        self._topics: list[_Topic] = []
        # History channels: the last id yielded (None: none yet), and the stream's last id
        # when the subscription started (where a replay starts if nothing was yielded).
        self._high: dict[str, tuple[int, int] | None] = {}
        self._since: dict[str, tuple[int, int]] = {}

    # -- reading ----------------------------------------------------------

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> Message[T] | Reconnected:
        event = await self._next(None)
        if event is None:
            raise StopAsyncIteration
        return event

    async def get(self, timeout: float | None = None) -> Message[T] | Reconnected | None:
        """The next event; None after *timeout* seconds without one, or at the end.

        After None, ``closed and not pending`` tells the end from a timeout. The
        timeout only bounds waiting: a history replay in progress is not cut short.
        """
        return await self._next(timeout)

    async def _next(self, timeout: float | None) -> Message[T] | Reconnected | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._replay:
                return self._replay.popleft()
            queue = self._queue
            if queue:
                item = queue.popleft()
                if type(item) is Message:
                    if (
                        item.id is not None
                        and item.pattern is None
                        and not self._advance(item.channel, item.id)
                    ):
                        continue  # already replayed
                    return item
                return await self._resync(item)
            if self._closed is not None:
                if self._closed == "overflow":
                    raise SubscriberOverflow(
                        f"subscriber on {self._describe()} fell more than {self.queue_size} "
                        "messages behind and was disconnected; read faster, raise queue_size "
                        'or use overflow="drop_oldest"',
                        queue_size=self.queue_size,
                    )
                return None
            waiter = self._waiter = loop.create_future()
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return None
                    try:
                        async with asyncio.timeout(remaining):
                            await waiter
                    except TimeoutError:
                        return None
            finally:
                self._waiter = None

    @property
    def pending(self) -> int:
        """Events queued for this subscriber and not read yet."""
        return len(self._queue) + len(self._replay)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def last_ids(self) -> dict[str, str]:
        """The last stream id seen per history-backed channel (resume from these)."""
        return {ch: "{}-{}".format(*self._resume_point(ch)) for ch in self._high}

    def _resume_point(self, channel: str) -> tuple[int, int]:
        return self._high.get(channel) or self._since.get(channel, _ZERO_ID)

    def _describe(self) -> str:
        names = [*self.channels, *(f"pattern {p}" for p in self.patterns)]
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    def _advance(self, channel: str, id_: str) -> bool:
        if channel not in self._high:
            return True
        high = self._high[channel]
        parsed = _parse_id(id_)
        if high is not None and parsed <= high:
            return False
        self._high[channel] = parsed
        return True

    async def _resync(self, event: Reconnected) -> Reconnected:
        if not self._high:
            return event
        since = {channel: self._resume_point(channel) for channel in self._high}
        for attempt in range(_REPLAY_ATTEMPTS):
            try:
                replayed, complete = await self._owner._replay_history(self, since)
                break
            except _REDIS_DOWN as exc:
                # After an outage the client's pooled connections may be stale: retry.
                if attempt + 1 < _REPLAY_ATTEMPTS:
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                self._owner._record_error(f"history replay failed: {exc}")
                log.warning("pub/sub history replay after reconnect failed: %s", exc)
                return event
        self._queue_replay(replayed)
        covered = complete and not self.patterns and len(self._high) == len(self.channels)
        return Reconnected(
            gap=event.gap, may_have_missed=not covered, replayed=len(replayed), reason=event.reason
        )

    def _queue_replay(self, messages: list[Message[T]]) -> None:
        for message in messages:
            if message.id is not None and self._advance(message.channel, message.id):
                self._replay.append(message)

    # -- feeding (called by the reader, never awaits) ---------------------

    def _push(self, item: Message[Any]) -> None:
        if self._closed is not None:
            return
        queue = self._queue
        self.received += 1
        if len(queue) >= self.queue_size:
            if self.overflow == "disconnect":
                self._owner._overflowed(self)
                return
            self._drop_oldest()
        queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop_oldest(self) -> None:
        queue = self._queue
        if type(queue[0]) is Message:
            queue.popleft()
        else:  # keep control events: drop the oldest message behind them
            for index, item in enumerate(queue):
                if type(item) is Message:
                    del queue[index]
                    break
            else:
                return
        self.dropped += 1
        self._owner._dropped += 1

    def _push_control(self, event: Reconnected) -> None:
        """Control events bypass the bound: they are rare and must not be lost."""
        if self._closed is not None:
            return
        self._queue.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
            if reason == "overflow":
                self._queue.clear()
                self._replay.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# -- one pub/sub connection ---------------------------------------------------


class _DeadLink(Exception):
    """No PONG came back within the bound."""


ConnectionFactory: TypeAlias = Callable[[], Any]


class _Link:
    """One dedicated pub/sub connection, supervised: connect, resubscribe, read, ping."""

    def __init__(self, owner: Broadcaster, name: str, factory: ConnectionFactory) -> None:
        self.owner = owner
        self.name = name
        self.factory = factory
        self.topics: dict[_Key, _Topic] = {}
        self.state = "idle"
        self.connected_once = False
        self.reconnects = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_gap: float | None = None
        self.loss_reason = "connection lost"
        self.rtt: float | None = None
        self.last_alive = 0.0
        self._conn: Any = None
        self._sent: set[_Key] = set()  # subscribed (or being subscribed) on this connection
        self._acks: dict[_Key, int] = {}  # SUBSCRIBE commands awaiting confirmation
        self._unacks: dict[_Key, int] = {}  # UNSUBSCRIBE commands we sent, unconfirmed
        self._dirty: set[_Key] = set()
        self._wake = asyncio.Event()
        self._pongs: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recovering: set[_Topic] = set()
        self._task: asyncio.Task[None] | None = None

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"pubsub-link-{self.name}"
            )
            self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - defensive
            exc = task.exception()
            self.owner._record_error(f"link {self.name} supervisor crashed: {exc!r}")
            log.error("pub/sub supervisor %s crashed", self.name, exc_info=exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await _cancel_all([task])
        await self._drop_connection()
        self.state = "closed"

    def add(self, topic: _Topic) -> None:
        key = topic.key
        self.topics[key] = topic
        if key in self._sent:  # still subscribed from a previous topic on this name
            if key not in self._acks:
                topic.active.set()
            return
        self._dirty.add(key)
        self._wake.set()

    def remove(self, topic: _Topic) -> None:
        self.topics.pop(topic.key, None)
        self._recovering.discard(topic)
        self._dirty.add(topic.key)
        self._wake.set()

    def mark_lost(self, topic: _Topic, now: float, lost_at: float) -> None:
        if topic.active.is_set():
            topic.active.clear()
            if topic.lost_at is None:
                topic.lost_at, topic.detected_at = lost_at, now
        if topic.lost_at is not None:
            self._recovering.add(topic)

    # -- supervision ------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        owner = self.owner
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                self.state = "connecting"
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
            if loop.time() - started > owner.backoff_cap:
                attempt = 0  # the session was healthy for a while: retry at once
            delay = random.uniform(0, min(owner.backoff_cap, owner.backoff_base * 2**attempt))
            attempt += 1
            self.state = "backoff"
            await asyncio.sleep(delay)
            await owner._before_reconnect(self)

    async def _session(self) -> None:
        conn = self.factory()
        self._conn = conn
        try:
            await self._run_session(conn)
        finally:
            self._conn = None
            await asyncio.shield(_disconnect(conn))

    async def _run_session(self, conn: Any) -> None:
        owner = self.owner
        try:
            async with asyncio.timeout(owner.connect_timeout):
                await conn.connect()
        except TimeoutError as exc:
            raise TimeoutError(f"connect timed out after {owner.connect_timeout}s") from exc
        loop = asyncio.get_running_loop()
        self.last_alive = loop.time()
        self._sent.clear()
        self._acks.clear()
        self._unacks.clear()
        self._dirty = set(self.topics)
        self.state = "connected"
        if self.connected_once:
            self.reconnects += 1
            owner._reconnects += 1
        self.connected_once = True
        tasks = [
            loop.create_task(self._read(conn), name=f"pubsub-read-{self.name}"),
            loop.create_task(self._ping(conn), name=f"pubsub-ping-{self.name}"),
            loop.create_task(self._sync(conn), name=f"pubsub-sync-{self.name}"),
        ]
        self._wake.set()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all(tasks)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error
        raise ConnectionError("pub/sub session ended without an error")  # pragma: no cover

    @traced(
        "pubsub.reconnect",
        attrs=lambda link, exc: {"toolkit.pubsub.link": link.name},
        result=lambda _: "lost",
    )
    def _lost(self, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        was_connected = self.state == "connected"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.errors += 1
        self.last_error, self.last_error_at = text, time.time()
        self.owner._record_error(f"link {self.name}: {text}")
        expected = isinstance(exc, (_DeadLink, *CONNECTION_ERRORS))
        if was_connected:
            self.loss_reason = text
            log.warning(
                "pub/sub link %s lost (%s); reconnecting and resubscribing %d topics",
                self.name,
                text,
                len(self.topics),
                exc_info=None if expected else exc,
            )
        else:
            log.warning("pub/sub link %s cannot connect: %s", self.name, text)
        for topic in self.topics.values():
            self.mark_lost(topic, now, self.last_alive)
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.cancel()
        self._sent.clear()
        self._acks.clear()
        self._unacks.clear()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _disconnect(conn)

    # -- the three tasks of a session -------------------------------------

    async def _read(self, conn: Any) -> None:
        owner = self.owner
        read = conn.read_response
        clock = asyncio.get_running_loop().time
        deliver = owner._deliver
        while True:
            try:
                response = await read(
                    disable_decoding=True,
                    timeout=math.inf,
                    disconnect_on_error=False,
                    push_request=True,
                )
            except ResponseError as exc:  # e.g. an ACL refusing one channel: keep the link
                owner._record_error(f"link {self.name}: {exc}")
                log.error("pub/sub link %s: Redis refused a command: %s", self.name, exc)
                continue
            self.last_alive = clock()
            if not isinstance(response, list):
                if response is not None:
                    self._pong()  # a plain "PONG" outside subscribed mode
                continue
            kind = response[0]
            if kind == b"message":
                deliver(self, _CHANNEL, response[1], response[2], None)
            elif kind == b"smessage":
                deliver(self, _SHARD, response[1], response[2], None)
            elif kind == b"pmessage":
                deliver(self, _PATTERN, response[2], response[3], response[1])
            elif kind == b"pong":
                self._pong()
            elif kind in _ACK_KIND:
                self._ack((_ACK_KIND[kind], response[1]))
            elif kind in _UNACK_KIND:
                self._unack((_UNACK_KIND[kind], response[1]))

    async def _ping(self, conn: Any) -> None:
        owner = self.owner
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(owner.ping_interval)
            if not conn.is_connected:
                raise ConnectionError("pub/sub connection closed")
            pong: asyncio.Future[None] = loop.create_future()
            self._pongs.append(pong)
            sent = loop.time()
            await conn.send_command("PING", check_health=False)
            try:
                async with asyncio.timeout(owner.ping_timeout):
                    await pong
            except TimeoutError:
                raise _DeadLink(
                    f"no PONG within {owner.ping_timeout}s on the pub/sub connection "
                    "(dead or half-open link)"
                ) from None
            self.rtt = loop.time() - sent

    async def _sync(self, conn: Any) -> None:
        """Reconcile the server's subscriptions with ``self.topics`` (batched)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            subscribe: list[list[bytes]] = [[], [], []]
            unsubscribe: list[list[bytes]] = [[], [], []]
            for key in dirty:
                wanted, sent = key in self.topics, key in self._sent
                if wanted and not sent:
                    self._sent.add(key)
                    self._acks[key] = self._acks.get(key, 0) + 1
                    subscribe[key[0]].append(key[1])
                elif sent and not wanted:
                    self._sent.discard(key)
                    self._unacks[key] = self._unacks.get(key, 0) + 1
                    unsubscribe[key[0]].append(key[1])
            if not conn.is_connected:
                raise ConnectionError("pub/sub connection closed")
            for kind in (_CHANNEL, _PATTERN, _SHARD):
                for commands, names in ((_UNSUBSCRIBE, unsubscribe), (_SUBSCRIBE, subscribe)):
                    for chunk in _chunks(kind, names[kind]):
                        await conn.send_command(commands[kind], *chunk, check_health=False)

    # -- replies ------------------------------------------------------------

    def _pong(self) -> None:
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.set_result(None)
                return

    def _ack(self, key: _Key) -> None:
        count = self._acks.get(key, 0) - 1
        if count > 0:
            self._acks[key] = count
            return
        self._acks.pop(key, None)
        topic = self.topics.get(key)
        if topic is not None and key in self._sent:
            topic.active.set()
        if not self._acks and self._recovering:
            self._flush_recovered()

    def _unack(self, key: _Key) -> None:
        count = self._unacks.get(key, 0)
        if count > 0:
            if count == 1:
                del self._unacks[key]
            else:
                self._unacks[key] = count - 1
            return
        # The server dropped a subscription we did not give up: a Cluster slot moved.
        if key in self._sent:
            self._sent.discard(key)
            topic = self.topics.get(key)
            now = asyncio.get_running_loop().time()
            if topic is not None:
                self.mark_lost(topic, now, now)
            self.owner._server_unsubscribed(self, key)

    def _flush_recovered(self) -> None:
        now = asyncio.get_running_loop().time()
        gaps: dict[Subscription[Any], float] = {}
        flushed = 0
        for topic in [t for t in self._recovering if t.active.is_set()]:
            self._recovering.discard(topic)
            lost_at, detected_at = topic.lost_at, topic.detected_at
            topic.lost_at = topic.detected_at = None
            if lost_at is None or detected_at is None:
                continue
            flushed += 1
            gap = now - lost_at
            for sub in topic.subs:
                if sub._activated_at is not None and sub._activated_at <= detected_at:
                    gaps[sub] = max(gap, gaps.get(sub, 0.0))
        if not flushed:
            return
        worst = max(gaps.values(), default=0.0)
        self.last_gap = worst
        self.owner._last_gap = worst
        reason = self.loss_reason
        for sub, gap in gaps.items():
            sub._push_control(Reconnected(gap=gap, may_have_missed=True, reason=reason))
        log.info(
            "pub/sub link %s resubscribed %d topics after a %.2fs gap; notified %d subscribers",
            self.name,
            flushed,
            worst,
            len(gaps),
        )

    def stats(self) -> dict[str, Any]:
        kinds = [0, 0, 0]
        for kind, _ in self.topics:
            kinds[kind] += 1
        return {
            "name": self.name,
            "state": self.state,
            "channels": kinds[_CHANNEL] + kinds[_SHARD],
            "patterns": kinds[_PATTERN],
            "reconnects": self.reconnects,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_gap_seconds": self.last_gap,
            "ping_rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
        }


def _chunks(kind: int, names: list[bytes]) -> list[list[bytes]]:
    """Batches for one (UN)SUBSCRIBE command: shard channels of one command share a slot."""
    if not names:
        return []
    if kind == _SHARD:
        by_slot: dict[int, list[bytes]] = {}
        for name in names:
            by_slot.setdefault(key_slot(name), []).append(name)
        groups = list(by_slot.values())
    else:
        groups = [names]
    return [g[i : i + _COMMAND_CHUNK] for g in groups for i in range(0, len(g), _COMMAND_CHUNK)]


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel *tasks* and wait for them, cancelling again if one swallowed it.

    On Python 3.11 ``asyncio.wait_for`` (used by redis-py when writing) can
    swallow a cancellation that arrives as the write completes.
    """
    pending = {t for t in tasks if not t.done()}
    interrupted = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=0.1)
        except asyncio.CancelledError:  # we are being cancelled too: finish the cleanup first
            interrupted = True
            pending = {t for t in pending if not t.done()}
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller reports the first error
    if interrupted:
        raise asyncio.CancelledError


async def _disconnect(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception as exc:  # pragma: no cover - closing a broken socket
        log.debug("error while closing a pub/sub connection: %s", exc)


def _dedicated(connection_class: Any, kwargs: Mapping[str, Any]) -> Any:
    """A new connection with the client's settings, RESP2, no hidden retries or health PINGs."""
    options = dict(kwargs)
    options.update(protocol=2, health_check_interval=0, retry=Retry(NoBackoff(), 0))
    return connection_class(**options)


# -- the broadcaster ----------------------------------------------------------


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


def _publish_attrs(broadcaster: Any, channel: str, message: Any) -> dict[str, str]:
    # the channel stays on spans: it may name a user, so it is no metric attribute
    return {"messaging.system": "redis", "toolkit.pubsub.channel": channel}


class Broadcaster:
    """Publish and subscribe across processes over one Redis pub/sub connection per process.

    Args:
        client: any ``redis.asyncio`` client (standalone, Sentinel-managed or
            ``RedisCluster``, ``decode_responses`` True or False) or fakeredis.
            Publishing goes through it; subscribing opens one dedicated
            connection with its settings (never one of its pooled connections).
        codec: payload codec (default: the JSON codec from settings).
        queue_size: per-subscriber queue bound (default 1000 events).
        overflow: ``"drop_oldest"`` (default; counted) or ``"disconnect"``.
        ping_interval: seconds between PINGs on the pub/sub connection.
        ping_timeout: seconds a PONG may take before the link counts as dead.
        connect_timeout: bound on connecting (and the handshake) per attempt.
        backoff_base, backoff_cap: reconnect delay is uniform in
            ``[0, min(cap, base * 2**attempt)]`` (full jitter).
        subscribe_timeout: how long ``subscribe`` waits for Redis to confirm
            before raising ``RedisUnavailable``.
        history: approximate stream length kept per channel for catch-up, as an
            int for every channel or a function of the logical channel name
            (0: plain pub/sub, the default).
        history_ttl: seconds a channel's history outlives its last publish.
        sharded: use ``SPUBLISH``/``SSUBSCRIBE`` (default: when *client* is a
            ``RedisCluster``). Sharded pub/sub has no patterns.
        drain_timeout: on ``aclose``, how long to wait for subscribers to finish.
        key_prefix: namespace prefix (default: ``REDIS_KEY_PREFIX`` from settings).
    """

    def __init__(
        self,
        client: AnyRedis | Any,
        *,
        codec: Codec | None = None,
        queue_size: int = 1000,
        overflow: OverflowPolicy = "drop_oldest",
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        connect_timeout: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        subscribe_timeout: float = 10.0,
        history: int | Callable[[str], int] = 0,
        history_ttl: float = 3600.0,
        sharded: bool | None = None,
        drain_timeout: float = 5.0,
        key_prefix: str | None = None,
    ) -> None:
        _check_overflow(overflow)
        if queue_size < 1:
            raise ConfigurationError("queue_size must be at least 1")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ConfigurationError("ping_interval and ping_timeout must be positive")
        if history_ttl <= 0:
            raise ConfigurationError("history_ttl must be positive (history streams expire)")
        self.client = client
        self._cluster = is_cluster(client)
        self.sharded = self._cluster if sharded is None else sharded
        if self.sharded and not self._cluster:
            raise ConfigurationError("sharded pub/sub needs a RedisCluster client")
        base_codec = codec or default_codec()
        self.codec = base_codec.with_text_safe(client_decodes_responses(client))
        self.queue_size = queue_size
        self.overflow: OverflowPolicy = overflow
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.subscribe_timeout = subscribe_timeout
        self.history = history
        self.history_ttl_ms = int(history_ttl * 1000)
        self.drain_timeout = drain_timeout
        self.keys = KeySpace(key_prefix or get_settings().redis_key_prefix, "pubsub")
        self._root = (self.keys.root + "{").encode()
        self._pattern_root = escape_glob(self.keys.root) + "{"
        self._kind = _SHARD if self.sharded else _CHANNEL
        self._topics: dict[_Key, _Topic] = {}
        self._links: dict[str, _Link] = {}
        self._subs: set[Subscription[Any]] = set()
        self._closing = False
        self._started = False
        self._drained: asyncio.Event | None = None
        self._cluster_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # counters for stats()
        self._published = 0
        self._publish_errors = 0
        self._received = 0
        self._delivered = 0
        self._dropped = 0
        self._overflow_disconnects = 0
        self._decode_errors = 0
        self._reconnects = 0
        self._errors = 0
        self._last_error: str | None = None
        self._last_gap: float | None = None

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> Broadcaster:
        """Connect ahead of the first subscriber (optional: ``subscribe`` starts it lazily).

        Returns at once; the connection is made in the background and retried
        with backoff while Redis is down.
        """
        if self._closing:
            raise RuntimeError("this Broadcaster is closed; build a new one")
        self._started = True
        if not self.sharded:
            self._main_link().start()
        return self

    async def aclose(self, drain_timeout: float | None = None) -> None:
        """Stop: end every subscription, wait for subscribers to finish, close the connections.

        New ``subscribe`` calls raise ``RuntimeError``. Each subscriber's
        iteration yields what is already queued, then ends. After
        *drain_timeout* seconds (default: the constructor's) the connections
        are closed regardless. ``publish`` keeps working (it uses the client).
        """
        self._closing = True
        for sub in list(self._subs):
            sub._close("shutdown")
        if self._subs:
            self._drained = asyncio.Event()
            bound = self.drain_timeout if drain_timeout is None else drain_timeout
            try:
                async with asyncio.timeout(bound):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "pub/sub shutdown: %d subscribers still open after %.1fs; closing anyway",
                    len(self._subs),
                    bound,
                )
        for link in list(self._links.values()):
            await link.stop()
        for task in list(self._background):
            task.cancel()
        self._links.clear()

    async def __aenter__(self) -> Broadcaster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- names --------------------------------------------------------------

    def channel_name(self, channel: str) -> str:
        """The Redis channel for the logical *channel* (escaped, namespaced)."""
        if not channel:
            raise ConfigurationError("a channel name must not be empty")
        return self.keys.tagged(channel)

    def history_key(self, channel: str) -> str:
        """The stream key backing *channel* when it keeps history."""
        return self.keys.tagged(channel, "history")

    def pattern_name(self, pattern: str) -> str:
        """The Redis glob for a logical *pattern* (``*`` and ``?`` are the wildcards).

        Runs of ``*`` collapse; more than ``MAX_PATTERN_WILDCARDS`` wildcards
        raise ``PatternTooComplex``: Redis matches every pattern against every
        published channel, so an unbounded one would stall the server.
        """
        if not pattern:
            raise ConfigurationError("a pattern must not be empty")
        pattern = bound_pattern(pattern, wildcards="*?", escapes=False, what="pub/sub pattern")
        out: list[str] = []
        for piece in re.split(r"([*?])", pattern):
            if piece in ("*", "?"):
                out.append(piece)
            elif piece:
                out.append(escape(piece))
        return self._pattern_root + "".join(out) + "}"

    def _logical(self, raw: bytes) -> str:
        root = self._root
        if raw.startswith(root) and raw.endswith(b"}"):
            raw = unquote_to_bytes(raw[len(root) : -1])
        return raw.decode("utf-8", "replace")

    def history_length(self, channel: str) -> int:
        """Approximate number of messages kept for *channel* (0: no history)."""
        history = self.history
        return history if isinstance(history, int) else int(history(channel))

    # -- publish ------------------------------------------------------------

    @traced("pubsub.publish", kind="producer", attrs=_publish_attrs)
    async def publish(self, channel: str, message: Any) -> Published:
        """Publish *message* (encoded with the codec) on *channel* to every process.

        One round trip: ``PUBLISH`` (``SPUBLISH`` when sharded), or on a
        history-backed channel one script that appends to the capped stream
        (``XADD MAXLEN ~``, TTL ``history_ttl`` refreshed) and publishes
        atomically. Pub/sub is at-most-once: a process whose link is down
        misses the message (its subscribers get ``Reconnected``; history
        channels replay it). Cancelled mid-flight, the message may or may not
        have been published. Raises ``RedisUnavailable`` when Redis is down
        (or its circuit breaker is open), ``CodecError`` for unencodable values.
        """
        raw = self.channel_name(channel)
        payload = _with_trace(self.codec.encode(message))
        maxlen = self.history_length(channel)
        try:
            with breaker_for(self.client):
                if maxlen > 0:
                    reply = await _PUBLISH(
                        self.client,
                        keys=[self.history_key(channel)],
                        args=[raw, payload, maxlen, self.history_ttl_ms, int(self.sharded)],
                    )
                    result = Published(int(reply[1]), _text(reply[0]))
                elif self.sharded:
                    result = Published(int(await self.client.spublish(raw, payload)), None)
                else:
                    result = Published(int(await self.client.publish(raw, payload)), None)
        except RedisUnavailable:
            self._publish_errors += 1
            raise
        except REFUSED_FOR_NOW as exc:  # refused for now: 503, like an outage
            self._publish_errors += 1
            raise RedisUnavailable(f"publishing to {channel!r} was refused: {exc}") from exc
        except RedisError as exc:
            self._publish_errors += 1
            raise ToolkitError(f"publishing to {channel!r} failed: {exc}") from exc
        self._published += 1
        return result

    # -- subscribe ----------------------------------------------------------

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: None = None,
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[Any]]: ...

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: type[T],
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[T]]: ...

    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: Any = None,
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[Any]]:
        """Subscribe to *channels* and *patterns*: ``async with b.subscribe("a") as sub``.

        Entering returns once Redis has confirmed every subscription (so a
        message published afterwards is received), waiting at most
        ``subscribe_timeout`` (then ``RedisUnavailable``). No extra Redis
        connection is opened: all subscriptions of the process share one.
        Messages are decoded once per type: ``type_=Model`` validates into it
        (undecodable messages are logged, counted and skipped).

        On history-backed channels, ``last_ids`` (logical channel -> stream id)
        replays what was published after that id before live messages; after
        a reconnect the missed messages are replayed automatically.

        Leaving the block (also on cancellation or error) unsubscribes at once
        without waiting for Redis; the Redis channel is released when its last
        local subscriber leaves.
        """
        if not channels and not patterns:
            raise ConfigurationError("subscribe needs at least one channel or pattern")
        if patterns and self.sharded:
            raise ConfigurationError(
                "sharded pub/sub (the default on a Cluster) has no pattern subscriptions; "
                "build the Broadcaster with sharded=False to use patterns"
            )
        policy = self.overflow if overflow is None else overflow
        _check_overflow(policy)
        size = self.queue_size if queue_size is None else queue_size
        if size < 1:
            raise ConfigurationError("queue_size must be at least 1")
        return self._subscription(
            tuple(dict.fromkeys(channels)),
            tuple(dict.fromkeys(patterns)),
            type_,
            dict(last_ids or {}),
            size,
            policy,
        )

    @asynccontextmanager
    async def _subscription(
        self,
        channels: tuple[str, ...],
        patterns: tuple[str, ...],
        type_: Any,
        last_ids: dict[str, str],
        queue_size: int,
        overflow: OverflowPolicy,
    ) -> AsyncIterator[Subscription[Any]]:
        if self._closing:
            raise RuntimeError("this Broadcaster is closed; build a new one")
        keys = [(self._kind, self.channel_name(c).encode(), c) for c in channels]
        keys += [(_PATTERN, self.pattern_name(p).encode(), p) for p in patterns]
        if self._cluster:
            await self._ensure_cluster()
        sub: Subscription[Any] = Subscription(self, channels, patterns, type_, queue_size, overflow)
        self._subs.add(sub)
        try:
            for kind, raw, name in keys:
                self._attach(sub, (kind, raw), name)
            await self._await_active(sub)
            sub._activated_at = asyncio.get_running_loop().time()
            await self._prime_history(sub, last_ids)
            yield sub
        finally:
            self._detach(sub)
            sub._close("exited")
            self._subs.discard(sub)
            if self._drained is not None and not self._subs:
                self._drained.set()

    def _attach(self, sub: Subscription[Any], key: _Key, name: str) -> None:
        topic = self._topics.get(key)
        if topic is None:
            link = self._link_for(key)
            topic = self._topics[key] = _Topic(key, name, link)
            link.add(topic)
            link.start()
        topic.subs = (*topic.subs, sub)
        sub._topics.append(topic)

    def _detach(self, sub: Subscription[Any]) -> None:
        for topic in sub._topics:
            topic.subs = tuple(s for s in topic.subs if s is not sub)
            if not topic.subs and self._topics.get(topic.key) is topic:
                del self._topics[topic.key]
                topic.link.remove(topic)
        sub._topics = []

    async def _await_active(self, sub: Subscription[Any]) -> None:
        try:
            async with asyncio.timeout(self.subscribe_timeout):
                while True:
                    pending = [t for t in sub._topics if not t.active.is_set()]
                    if not pending:
                        return
                    for topic in pending:
                        await topic.active.wait()
        except TimeoutError as exc:
            errors = {t.link.last_error for t in sub._topics if t.link.last_error}
            raise RedisUnavailable(
                f"Redis did not confirm the subscription to {sub._describe()} within "
                f"{self.subscribe_timeout}s" + (f" (last error: {errors.pop()})" if errors else "")
            ) from exc

    # -- dispatch (the reader's hot path) ------------------------------------

    def _deliver(
        self, link: _Link, kind: int, channel: bytes, payload: bytes, pattern: bytes | None
    ) -> None:
        topic = self._topics.get((kind, channel if pattern is None else pattern))
        self._received += 1
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
            name, pattern_name = self._logical(channel), topic.name
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
                    message = self._decode(name, payload, type_, pattern_name, id_, trace)
                    if last_type is not _NO_VALUE:
                        if memo is None:
                            memo = {last_type: last_message}
                        memo[type_] = message
                last_type, last_message = type_, message
            if message is not None:
                sub._push(message)
                self._delivered += 1

    def _decode(
        self,
        channel: str,
        payload: bytes,
        type_: Any,
        pattern: str | None,
        id_: str | None,
        trace: str | None = None,
    ) -> Message[Any] | None:
        try:
            return Message(channel, self.codec.decode(payload, type_), pattern, id_, trace)
        except CodecError as exc:
            self._decode_errors += 1
            self._last_error = f"undecodable message on {channel!r}: {exc}"
            log.warning("pub/sub: skipped an undecodable message on %r: %s", channel, exc)
            return None

    def _overflowed(self, sub: Subscription[Any]) -> None:
        self._overflow_disconnects += 1
        log.warning(
            "pub/sub subscriber on %s exceeded its queue of %d and was disconnected",
            sub._describe(),
            sub.queue_size,
        )
        sub._close("overflow")
        self._detach(sub)

    def _record_error(self, text: str) -> None:
        self._errors += 1
        self._last_error = text

    # -- history --------------------------------------------------------------

    async def _prime_history(self, sub: Subscription[Any], last_ids: dict[str, str]) -> None:
        channels = [c for c in sub.channels if self.history_length(c) > 0]
        if not channels:
            return
        resume = {c: last_ids[c] for c in channels if _valid_id(last_ids.get(c))}
        fresh = [c for c in channels if c not in resume]
        try:
            with breaker_for(self.client):
                pipe = self.client.pipeline(transaction=False)
                for channel in fresh:
                    pipe.xrevrange(self.history_key(channel), count=1)
                baselines = await pipe.execute() if fresh else []
        except _REDIS_DOWN as exc:
            raise RedisUnavailable(f"cannot read pub/sub history: {exc}") from exc
        # Live messages may already be queued: they are delivered even if older than
        # the baseline, which only says where a replay starts if none was seen yet.
        for channel, entries in zip(fresh, baselines, strict=True):
            sub._high[channel] = None
            sub._since[channel] = _parse_id(entries[0][0]) if entries else _ZERO_ID
        if not resume:
            return
        for channel, id_ in resume.items():
            sub._high[channel] = sub._since[channel] = _parse_id(id_)
        replayed, complete = await self._replay_history(
            sub, {channel: sub._since[channel] for channel in resume}
        )
        if not complete:
            sub._replay.append(
                Reconnected(
                    gap=0.0,
                    may_have_missed=True,
                    replayed=len(replayed),
                    reason="history no longer reaches back to the requested id",
                )
            )
        sub._queue_replay(replayed)

    async def _replay_history(
        self, sub: Subscription[Any], since: dict[str, tuple[int, int]]
    ) -> tuple[list[Message[Any]], bool]:
        """Messages after *since* per channel, and whether nothing can be missing."""
        channels = list(since)
        try:
            with breaker_for(self.client):
                pipe = self.client.pipeline(transaction=False)
                for channel in channels:
                    key = self.history_key(channel)
                    ms, seq = since[channel]
                    pipe.xrange(key, min=f"({ms}-{seq}", max="+")
                    pipe.exists(key)
                replies = await pipe.execute()
        except _REDIS_DOWN as exc:
            raise RedisUnavailable(f"cannot read pub/sub history: {exc}") from exc
        messages: list[Message[Any]] = []
        complete = True
        for index, channel in enumerate(channels):
            entries, exists = replies[2 * index], replies[2 * index + 1]
            # MAXLEN ~ N never trims below N entries, so fewer than N entries after our id
            # prove nothing after it was trimmed; an expired stream may have lost some.
            if len(entries) >= self.history_length(channel) or (
                not exists and since[channel] != _ZERO_ID
            ):
                complete = False
            for entry_id, fields in entries:
                data = fields.get(b"d", fields.get("d"))
                if data is None:
                    continue
                trace, data = _untrace(data)
                message = self._decode(channel, data, sub._type, None, _text(entry_id), trace)
                if message is not None:
                    messages.append(message)
        return messages, complete

    # -- links and cluster routing -----------------------------------------

    def _main_link(self) -> _Link:
        link = self._links.get("main")
        if link is None:
            link = self._links["main"] = _Link(self, "main", self._main_factory())
        return link

    def _main_factory(self) -> ConnectionFactory:
        client: Any = self.client
        if self._cluster:

            def from_cluster() -> Any:
                node = random.choice(client.get_primaries() or [client.get_default_node()])
                return _dedicated(node.connection_class, node.connection_kwargs)

            return from_cluster
        pool = client.connection_pool
        return lambda: _dedicated(pool.connection_class, pool.connection_kwargs)

    def _link_for(self, key: _Key) -> _Link:
        if key[0] != _SHARD:
            return self._main_link()
        client: Any = self.client
        node = client.nodes_manager.get_node_from_slot(key_slot(key[1]))
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = _Link(
                self, node.name, lambda: _dedicated(node.connection_class, node.connection_kwargs)
            )
        return link

    async def _ensure_cluster(self) -> None:
        client: Any = self.client
        if not client.nodes_manager.slots_cache:
            await client.initialize()

    async def _before_reconnect(self, link: _Link) -> None:
        """A link failed: on a Cluster, refresh the topology and move shard channels."""
        if not self._cluster:
            return
        try:
            await self._refresh_cluster()
        except Exception as exc:
            self._record_error(f"cluster topology refresh failed: {exc}")
            log.warning("pub/sub: cluster topology refresh failed: %s", exc)

    def _server_unsubscribed(self, link: _Link, key: _Key) -> None:
        log.warning(
            "pub/sub: the server dropped %r on %s (slot moved?); rerouting",
            self._logical(key[1]),
            link.name,
        )
        if self._cluster:
            self._spawn(self._before_reconnect(link))
        else:  # standalone: subscribe again on the same link
            link._dirty.add(key)
            link._wake.set()

    async def _refresh_cluster(self) -> None:
        if self._cluster_lock is None:
            self._cluster_lock = asyncio.Lock()
        async with self._cluster_lock:
            client: Any = self.client
            await client.nodes_manager.initialize()
            if not self.sharded:
                return
            now = asyncio.get_running_loop().time()
            for topic in list(self._topics.values()):
                if topic.key[0] != _SHARD:
                    continue
                target = self._link_for(topic.key)
                if target is topic.link:
                    if topic.key not in target._sent:
                        target._dirty.add(topic.key)
                        target._wake.set()
                    continue
                old = topic.link
                old.mark_lost(topic, now, old.last_alive or now)
                old.remove(topic)
                topic.link = target
                target.add(topic)
                if topic.lost_at is not None:
                    target._recovering.add(topic)
                target.start()
            primaries = {n.name for n in client.get_primaries()}
            for name, link in list(self._links.items()):
                if name != "main" and not link.topics and name not in primaries:
                    del self._links[name]
                    self._spawn(link.stop())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- observability --------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and link states (cheap; safe to serve on a metrics endpoint)."""
        links = [link.stats() for link in self._links.values()]
        states = {link["state"] for link in links}
        return {
            "state": "closed"
            if self._closing
            else (states.pop() if len(states) == 1 else ("mixed" if states else "idle")),
            "sharded": self.sharded,
            "subscribers": len(self._subs),
            "channels": sum(1 for k in self._topics if k[0] != _PATTERN),
            "patterns": sum(1 for k in self._topics if k[0] == _PATTERN),
            "published": self._published,
            "publish_errors": self._publish_errors,
            "received": self._received,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "overflow_disconnects": self._overflow_disconnects,
            "decode_errors": self._decode_errors,
            "reconnects": self._reconnects,
            "errors": self._errors,
            "last_error": self._last_error,
            "last_gap_seconds": self._last_gap,
            "links": links,
        }


def _check_overflow(policy: str) -> None:
    if policy not in ("drop_oldest", "disconnect"):
        raise ConfigurationError(
            f"unknown overflow policy {policy!r}; use 'drop_oldest' or 'disconnect'"
        )


def _valid_id(value: str | None) -> bool:
    return value is not None and _STREAM_ID.match(value) is not None
