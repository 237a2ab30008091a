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
3. new entries (``XREADGROUP >``), at most ``batch_size`` and never more than there are free
   handler slots (``concurrency``).

A handler that returns acks its entry (acks are coalesced into one ``XACK``). One that raises
is retried after a capped, jittered exponential backoff; after ``max_deliveries`` deliveries
the entry goes to the dead-letter stream (original id, fields, error, delivery count) and is
acked, atomically, in one Lua script. Delivery counts come from the PEL, so a message that
crashes its worker (OOM, SIGKILL) is dead-lettered after ``max_deliveries`` crashes instead of
looping forever. While a handler runs, its claim is renewed (``XCLAIM ... JUSTID`` to itself,
owner-checked in Lua) every ``renew_interval``, so a job longer than ``claim_idle`` is not
taken by another consumer. Blocking reads stay below the client's ``socket_timeout``. A
``NOGROUP`` error (Redis restarted or flushed) recreates the group instead of stopping, and
connection errors are retried with backoff forever, until ``stop()``.

Keys: the stream is ``<prefix>:stream:{<name>}`` and its dead-letter stream
``<prefix>:stream:{<name>}:dlq``: one hash tag, one Cluster slot, so the dead-letter script
touches both atomically. Streams are durable on purpose and carry no TTL; bound them with
``maxlen`` or ``trim()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Generic, TypeVar, cast

from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError, ResponseError

from app.core.codec import Codec, default_codec
from app.core.config import get_settings
from app.core.errors import CodecError, ConfigurationError, RedisUnavailable, StreamError
from app.core.keys import KeySpace
from app.core.redis import (
    CONNECTION_ERRORS,
    REFUSED_FOR_NOW,
    AnyRedis,
    breaker_for,
    client_decodes_responses,
)
from app.core.scripts import Script
from app.core.telemetry import carrier, outcome, traced, watch

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

log = logging.getLogger("app.streams")

T = TypeVar("T")

PAYLOAD_FIELD: Final = "payload"
"""The stream field that holds the codec envelope of a payload written by ``StreamProducer``."""

_CLAIM = Script.from_package("app.services.streams", "lua/streams_claim.lua")
_AUTOCLAIM = Script.from_package("app.services.streams", "lua/streams_autoclaim.lua")
_DEAD_LETTER = Script.from_package("app.services.streams", "lua/streams_dead_letter.lua")
_JANITOR = Script.from_package("app.services.streams", "lua/streams_janitor.lua")
_TRIM = Script.from_package("app.services.streams", "lua/streams_trim.lua")

_SOCKET_MARGIN: Final = (0.25, 0.15)  # a blocking read ends this share (at least s) early
_IDS_PER_SCRIPT: Final = 500  # ids per claim/renew script call (bounded Lua stack and run time)
_ERROR_BACKOFF: Final = (0.05, 2.0)  # loop backoff after a Redis error: base, cap (seconds)


# -- keys and names -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one logical stream (one hash tag: one Cluster slot)."""

    name: str
    stream: str
    dead_letter: str


def stream_keys(name: str, *, prefix: str | None = None) -> StreamKeys:
    """Keys of stream *name*: ``<prefix>:stream:{<name>}`` and ``...:dlq``.

    *name* is escaped (any text is safe); the prefix defaults to ``REDIS_KEY_PREFIX``.
    """
    space = KeySpace(prefix or get_settings().redis_key_prefix, "stream")
    return StreamKeys(name, space.tagged(name), space.tagged(name, "dlq"))


_default_names: dict[tuple[str, str], int] = {}


def default_consumer_name(stream: str = "", group: str = "") -> str:
    """A stable consumer name: ``<hostname>-<pid>`` (``-2``, ``-3``... for more consumers of
    the same stream and group in this process).

    Stable names keep the PEL attributable (a restarted worker with a fixed hostname and
    pid, as in a container, finds its own pending entries again); the janitor
    (``remove_idle_consumers``) removes names that never come back.
    """
    base = f"{socket.gethostname()}-{os.getpid()}"
    if not (stream or group):
        return base
    n = _default_names.get((stream, group), 0) + 1
    _default_names[(stream, group)] = n
    return base if n == 1 else f"{base}-{n}"


# -- small helpers ------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_nogroup(exc: BaseException) -> bool:
    """NOGROUP, or a blocked read woken because its stream was deleted (FLUSHALL, DEL)."""
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return "NOGROUP" in text or ("UNBLOCKED" in text and "no longer exists" in text)


def _seconds(value: float, name: str, *, allow_zero: bool = False) -> float:
    seconds = float(value)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _socket_timeout(client: Any) -> float | None:
    try:
        timeout = client.get_connection_kwargs().get("socket_timeout")
    except AttributeError:
        return None
    return float(timeout) if timeout else None


def _field_value(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _entries(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """Entries of a one-stream XREADGROUP reply, RESP2 list or redis-py's unified dict shape."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [e for entries in reply.values() for e in entries or ()]
    return [e for _stream, entries in reply for e in entries or ()]


def _wrap_redis_error(exc: BaseException, action: str) -> Exception:
    if isinstance(exc, CONNECTION_ERRORS):
        return RedisUnavailable(f"could not {action}: Redis is unreachable ({exc})")
    if isinstance(exc, REFUSED_FOR_NOW):  # refused for now: 503, like an outage
        return RedisUnavailable(f"could not {action}: Redis refused it for now ({exc})")
    return StreamError(f"could not {action}: {exc}")


# -- data ---------------------------------------------------------------------


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


def _received(got: int | list[Any]) -> str:
    return "received" if got else "empty"


def _fields(consumer: Any, entry: _Entry) -> Mapping[Any, Any]:
    return entry.fields


Handler = Callable[[StreamMessage[T]], Awaitable[Any]]
"""``async def handler(message: StreamMessage[T]) -> None``: raise to fail the delivery."""


# -- producer -----------------------------------------------------------------


def _producer_attrs(producer: StreamProducer, *args: Any, **kwargs: Any) -> dict[str, str]:
    return {"messaging.system": "redis", "messaging.destination.name": producer.stream}


def _consumer_attrs(consumer: StreamConsumer[Any], *args: Any, **kwargs: Any) -> dict[str, str]:
    attrs = {
        "messaging.system": "redis",
        "messaging.destination.name": consumer.stream,
        "messaging.consumer.group.name": consumer.group,
    }
    first = args[0] if args else None
    if isinstance(first, _Entry | str):
        attrs["messaging.message.id"] = first if isinstance(first, str) else first.id
    return attrs


class StreamProducer:
    """Appends payloads to a stream.

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` True or False), fakeredis or
            ``RedisCluster``.
        stream: the logical stream name (``stream_keys(stream)`` gives the Redis keys).
        maxlen: trim to about this many entries on every add (``XADD MAXLEN ~``). This trim
            does not look at consumer groups: entries nobody acknowledged are dropped too.
            Leave it ``None`` and call ``trim(keep_unacknowledged=True)`` periodically when
            that matters.
        approximate: ``MAXLEN ~`` (fast, trims whole nodes) instead of an exact ``MAXLEN``.
        codec: the payload codec (default: the shared JSON codec, text-safe when the client
            decodes responses).
    """

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        *,
        maxlen: int | None = None,
        approximate: bool = True,
        codec: Codec | None = None,
    ) -> None:
        self.redis = redis
        self.keys = stream_keys(stream)
        decodes = client_decodes_responses(redis)
        self.codec = (codec or default_codec()).with_text_safe(decodes)
        self.maxlen = None if maxlen is None else _positive(maxlen, "maxlen")
        trim: tuple[Any, ...] = ()
        if self.maxlen is not None:
            trim = ("MAXLEN", "~", self.maxlen) if approximate else ("MAXLEN", self.maxlen)
        self._xadd_head: tuple[Any, ...] = ("XADD", self.keys.stream, *trim)

    @property
    def stream(self) -> str:
        return self.keys.name

    @traced("stream.produce", kind="producer", attrs=_producer_attrs)
    async def add(self, payload: Any, *, id: str = "*") -> str:
        """Append one entry whose ``payload`` field is the codec envelope of *payload*.

        *payload* is anything the codec encodes: dicts, lists, pydantic models, dataclasses.
        One ``XADD`` round trip (trimming included when ``maxlen`` is set); returns the entry
        id. Raises ``RedisUnavailable`` when Redis cannot be reached (or the circuit breaker
        is open), ``StreamError`` when Redis refuses (e.g. an explicit *id* not above the
        last one), ``CodecError`` when *payload* cannot be encoded. Cancellation after the
        command was sent may still leave the entry appended.
        """
        data = self.codec.encode(payload)
        try:
            with breaker_for(self.redis):
                reply = await self.redis.execute_command(
                    *self._xadd_head, id, PAYLOAD_FIELD, data, *carrier()
                )
        except RedisUnavailable:
            raise
        except RedisError as exc:
            raise _wrap_redis_error(exc, f"append to stream {self.stream!r}") from exc
        return _text(reply)

    @traced("stream.produce", kind="producer", attrs=_producer_attrs)
    async def add_many(self, payloads: Iterable[Any]) -> list[str]:
        """Append several entries in one pipelined round trip; returns their ids in order.

        Not atomic (a pipeline, not MULTI): if Redis fails midway some entries may be
        appended; every payload is encoded before anything is sent. Errors as for ``add``.
        """
        encoded = [self.codec.encode(p) for p in payloads]
        if not encoded:
            return []
        trace = carrier()
        try:
            with breaker_for(self.redis):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for data in encoded:
                        pipe.execute_command(*self._xadd_head, "*", PAYLOAD_FIELD, data, *trace)
                    replies = await pipe.execute()
        except RedisUnavailable:
            raise
        except RedisError as exc:
            raise _wrap_redis_error(exc, f"append to stream {self.stream!r}") from exc
        return [_text(r) for r in replies]

    async def length(self) -> int:
        """``XLEN``: entries in the stream (acknowledged ones included until trimmed)."""
        try:
            return int(await self.redis.xlen(self.keys.stream))
        except RedisError as exc:
            raise _wrap_redis_error(exc, f"read the length of stream {self.stream!r}") from exc

    async def trim(
        self,
        *,
        maxlen: int | None = None,
        minid: str | None = None,
        keep_unacknowledged: bool = True,
        approximate: bool = False,
    ) -> int:
        """Trim the stream; see ``trim_stream``. Returns the number of entries removed."""
        return await trim_stream(
            self.redis,
            self.stream,
            maxlen=maxlen,
            minid=minid,
            keep_unacknowledged=keep_unacknowledged,
            approximate=approximate,
        )


async def trim_stream(
    redis: AnyRedis,
    stream: str,
    *,
    maxlen: int | None = None,
    minid: str | None = None,
    keep_unacknowledged: bool = True,
    approximate: bool = False,
) -> int:
    """Trim stream *stream* to *maxlen* entries or to ids >= *minid*, in one Lua script.

    With ``keep_unacknowledged`` (the default) nothing that a consumer group still needs is
    removed: the script computes the lowest id pending in any group or not yet delivered to
    any group, and never trims past it (``XTRIM MINID`` at that floor), so the stream may
    stay longer than *maxlen* while consumers lag. Without it this is a plain ``XTRIM``.
    Atomic. The script walks at most the entries it removes, so call it periodically rather
    than letting millions pile up. Returns the number of entries removed.
    """
    if (maxlen is None) == (minid is None):
        raise ConfigurationError("trim needs exactly one of maxlen or minid")
    if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 0):
        raise ConfigurationError(f"maxlen must be a non-negative integer, got {maxlen!r}")
    keys = stream_keys(stream)
    try:
        removed = await _TRIM(
            redis,
            keys=[keys.stream],
            args=[
                "" if maxlen is None else maxlen,
                minid or "",
                "1" if keep_unacknowledged else "0",
                "1" if approximate else "0",
            ],
        )
    except RedisError as exc:
        raise _wrap_redis_error(exc, f"trim stream {stream!r}") from exc
    return int(removed)


# -- consumer -----------------------------------------------------------------


class StreamConsumer(Generic[T]):
    """A consumer-group worker with at-least-once delivery (see the module docstring).

    Args:
        redis: any ``redis.asyncio`` client, fakeredis or ``RedisCluster``.
        stream: the logical stream name (as given to ``StreamProducer``).
        group: the consumer group.
        consumer: this consumer's name; ``None`` for ``default_consumer_name()``. Keep it
            stable across restarts so a restarted worker finds its own pending entries.
        handler: ``async handler(message)``; returning acks, raising retries.
        payload_type: decode payloads into this type (pydantic ``TypeAdapter``); ``None``
            gives the plain decoded value.
        codec: the payload codec (default: the shared JSON codec).
        batch_size: most entries fetched per read (and per ``run_once``).
        concurrency: most handlers running at once.
        block: longest blocking read, in seconds. Clamped to end a margin (a quarter of
            the client's ``socket_timeout``, at least 0.15 s) before that timeout, so a quiet
            stream never raises ``TimeoutError``; a client without a socket timeout keeps it.
        claim_idle: entries pending longer than this (seconds) in another consumer's PEL are
            taken over (XAUTOCLAIM). Lease renewal keeps this consumer's own entries below it,
            so it need not exceed the slowest handler; it bounds how long a crashed worker's
            entries wait.
        claim_interval: seconds between XAUTOCLAIM passes (default ``claim_idle / 2``).
        renew_interval: seconds between lease renewals of in-flight and waiting entries
            (default ``claim_idle / 3``; must be below ``claim_idle``).
        max_deliveries: deliveries before an entry is dead-lettered.
        retry_backoff / retry_backoff_max: backoff after a failed delivery:
            ``min(max, backoff * 2**(deliveries-1))`` with jitter (seconds; 0 retries at once).
        dead_letter_maxlen: approximate cap of the dead-letter stream (``None``: unbounded).
        start_id: where a new group starts (``"0"``: the whole stream, ``"$"``: new entries).
            A group recreated after NOGROUP always starts at ``"0"`` so entries added since
            the flush are not skipped.
        shutdown_timeout: default seconds ``stop()`` waits for in-flight handlers.
        consumer_idle_timeout: the janitor of ``run()`` deletes consumers of the group idle
            this long with nothing pending (``None`` disables it).
        janitor_interval: seconds between janitor passes in ``run()``.
    """

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        consumer: str | None,
        handler: Handler[T],
        *,
        payload_type: Any = None,
        codec: Codec | None = None,
        batch_size: int = 16,
        concurrency: int = 8,
        block: float = 2.0,
        claim_idle: float = 30.0,
        claim_interval: float | None = None,
        renew_interval: float | None = None,
        max_deliveries: int = 5,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 30.0,
        dead_letter_maxlen: int | None = 10_000,
        start_id: str = "0",
        shutdown_timeout: float = 10.0,
        consumer_idle_timeout: float | None = 3600.0,
        janitor_interval: float = 60.0,
    ) -> None:
        if not group:
            raise ConfigurationError("a consumer group name must not be empty")
        self.redis = redis
        self.keys = stream_keys(stream)
        self.group = group
        self.name = consumer or default_consumer_name(stream, group)
        self.handler = handler
        self._decodes = client_decodes_responses(redis)
        self.codec = (codec or default_codec()).with_text_safe(self._decodes)
        self.payload_type = payload_type
        self._fields_adapter: TypeAdapter[Any] | None = (
            TypeAdapter(payload_type) if payload_type is not None else None
        )
        self._payload_field: bytes | str = PAYLOAD_FIELD if self._decodes else b"payload"
        self.batch_size = _positive(batch_size, "batch_size")
        self.concurrency = _positive(concurrency, "concurrency")
        self.claim_idle = _seconds(claim_idle, "claim_idle")
        self.claim_interval = _seconds(
            claim_interval if claim_interval is not None else self.claim_idle / 2,
            "claim_interval",
        )
        self.renew_interval = _seconds(
            renew_interval if renew_interval is not None else self.claim_idle / 3,
            "renew_interval",
        )
        if self.renew_interval >= self.claim_idle:
            raise ConfigurationError(
                f"renew_interval ({self.renew_interval}s) must be below claim_idle "
                f"({self.claim_idle}s), or other consumers take entries still being worked on"
            )
        self.max_deliveries = _positive(max_deliveries, "max_deliveries")
        self.retry_backoff = _seconds(retry_backoff, "retry_backoff", allow_zero=True)
        self.retry_backoff_max = _seconds(retry_backoff_max, "retry_backoff_max", allow_zero=True)
        self.dead_letter_maxlen = (
            0 if dead_letter_maxlen is None else _positive(dead_letter_maxlen, "dead_letter_maxlen")
        )
        self.start_id = start_id
        self.shutdown_timeout = _seconds(shutdown_timeout, "shutdown_timeout", allow_zero=True)
        self.consumer_idle_timeout = (
            None
            if consumer_idle_timeout is None
            else _seconds(consumer_idle_timeout, "consumer_idle_timeout")
        )
        self.janitor_interval = _seconds(janitor_interval, "janitor_interval")
        requested = _seconds(block, "block")
        socket_timeout = _socket_timeout(redis)
        if socket_timeout is not None:
            share, least = _SOCKET_MARGIN
            margin = max(socket_timeout * share, least)
            requested = min(requested, max(0.01, socket_timeout - margin))
        self.block = requested
        self._claim_idle_ms = max(1, round(self.claim_idle * 1000))
        self.counters = ConsumerCounters()

        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, float] = {}  # id -> loop time its retry is due
        self._retry_heap: list[tuple[float, str]] = []
        self._acking: set[str] = set()  # acked by a handler, XACK not yet confirmed
        self._ack_buffer: list[str] = []
        self._ack_task: asyncio.Task[None] | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_janitor = 0.0
        self._recover = True
        self._group_ready = False
        self._running = False
        self._stopping = False
        self._stop_requested = False
        self._stop_timeout = self.shutdown_timeout
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._done = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        watch("stream.consumer", self)  # the lag / pending / dead-letter gauges

    # -- properties -----------------------------------------------------------

    @property
    def stream(self) -> str:
        return self.keys.name

    @property
    def running(self) -> bool:
        return self._running

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- public verbs ---------------------------------------------------------

    async def ensure_group(self) -> bool:
        """Create the group at ``start_id`` (``MKSTREAM``: the stream too) if it is missing.

        Returns True when it was created, False when it already existed (``BUSYGROUP`` is
        not an error). Idempotent and safe to race from many workers. Raises
        ``RedisUnavailable`` when Redis cannot be reached, ``StreamError`` when the key
        holds something else than a stream.
        """
        try:
            created = await self._create_group(self.start_id)
        except RedisError as exc:
            raise _wrap_redis_error(exc, f"create group {self.group!r}") from exc
        self._group_ready = True
        return created

    async def run(self) -> None:
        """Consume until ``stop()``; never returns on its own.

        Creates the group if needed, recovers this consumer's own pending entries, then loops
        (see the module docstring). Redis errors are logged and retried with capped backoff;
        ``NOGROUP`` recreates the group. When the task running ``run()`` is cancelled, in-flight
        handlers are cancelled at once and their entries stay pending (redelivered later);
        prefer ``stop()``, which lets them finish.
        """
        if self._running:
            raise StreamError(f"consumer {self.name!r} is already running")
        if self._stop_requested:  # stop() came before this task got to run
            self._stop_requested = False
            return
        self._running = True
        self._stopping = False
        self._stop_timeout = self.shutdown_timeout
        self._stop_event = asyncio.Event()
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._recover = True
        renewer = self._start_renewer()
        graceful = False
        try:
            await self._loop()
            graceful = True
        finally:
            try:
                await self._shutdown(renewer, graceful=graceful)
            finally:
                self._running = False
                self._done.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop ``run()`` gracefully and wait until it has returned.

        Reading stops at once (a blocking read is abandoned; anything it had been handed
        stays pending for this consumer). In-flight handlers get up to *timeout* seconds
        (default ``shutdown_timeout``) to finish; those that finish are acked (or retried /
        dead-lettered as usual), those still running at the deadline are cancelled and their
        entries stay pending, so another consumer claims them after ``claim_idle`` (or this
        consumer recovers them on its next start). Entries waiting for a retry stay pending
        too. Called before a freshly created ``run()`` task got to start, it makes that
        ``run()`` return at once. Do not await it from inside a handler (it would wait for
        that handler): use ``asyncio.create_task(consumer.stop())`` there.
        """
        if not self._running:
            self._stop_requested = True
            return
        if timeout is not None:
            self._stop_timeout = _seconds(timeout, "timeout", allow_zero=True)
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        await self._done.wait()

    async def run_once(self, *, block: float | None = None) -> int:
        """Process what is available now, wait for those handlers, and return how many ran.

        One round, up to ``batch_size`` entries in this order: retries whose backoff is over,
        this consumer's own pending entries, entries idle over ``claim_idle`` elsewhere
        (XAUTOCLAIM), then new entries (waiting up to *block* seconds for them when given,
        never past the socket-timeout margin). Handlers run with at most ``concurrency`` at
        once and their claims are renewed while they run; acks are flushed before returning.
        Failed entries are scheduled for a later round (a retry is due after its backoff).
        Creates the group if missing. Returns the number of entries processed (handler calls
        plus entries dead-lettered without a call). Raises ``RedisUnavailable`` or
        ``StreamError`` when Redis fails; not usable while ``run()`` runs.
        """
        if self._running:
            raise StreamError("run_once() cannot be used while run() is running")
        before = self.counters.handled
        block_s = None if block is None else min(_seconds(block, "block"), self.block)
        failure: BaseException | None = None
        try:
            if not self._group_ready:
                await self._create_group(self.start_id)
                self._group_ready = True
            try:
                await self._fetch(self.batch_size, block_s)
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                await self._recreate_group()
                await self._fetch(self.batch_size, block_s)
        except (RedisError, OSError) as exc:
            failure = exc  # still finish (and ack) the handlers already started
        tasks = list(self._inflight.values())
        if tasks:
            renewer = self._start_renewer()
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await self._stop_renewer(*renewer)
        await self._flush_acks_now()
        if failure is not None:
            raise _wrap_redis_error(failure, f"read stream {self.stream!r}") from failure
        return self.counters.handled - before

    async def stats(self) -> StreamStats:
        """Length, lag, pending count, oldest pending entry and its idle time, consumers and
        dead-letter size, in one pipelined round trip, plus this object's counters.

        A missing stream or group reads as zeros. Raises ``RedisUnavailable`` when Redis
        cannot be reached.
        """
        key = self.keys.stream
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(key)
                pipe.xinfo_groups(key)
                pipe.xpending(key, self.group)
                pipe.xpending_range(key, self.group, "-", "+", 1)
                pipe.xlen(self.keys.dead_letter)
                length, groups, summary, oldest, dead = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise _wrap_redis_error(exc, f"read stats of stream {self.stream!r}") from exc
        for reply in (length, groups, summary, oldest, dead):
            if isinstance(reply, BaseException) and isinstance(reply, CONNECTION_ERRORS):
                raise _wrap_redis_error(reply, f"read stats of stream {self.stream!r}")
        info: dict[str, Any] = {}
        if isinstance(groups, list):
            for g in groups:
                if _text(g.get("name", b"")) == self.group:
                    info = g
        lag = info.get("lag")
        last = info.get("last-delivered-id")
        first = oldest[0] if isinstance(oldest, list) and oldest else None
        return StreamStats(
            stream=self.stream,
            group=self.group,
            consumer=self.name,
            length=length if isinstance(length, int) else 0,
            lag=int(lag) if lag is not None else None,
            pending=int(summary["pending"]) if isinstance(summary, dict) else 0,
            oldest_pending_id=_text(first["message_id"]) if first else None,
            oldest_pending_idle=first["time_since_delivered"] / 1000 if first else None,
            consumers=int(info.get("consumers", 0)),
            last_delivered_id=_text(last) if last is not None else None,
            dead_letters=dead if isinstance(dead, int) else 0,
            in_flight=len(self._inflight),
            waiting_retry=len(self._waiting),
            counters=ConsumerCounters(**asdict(self.counters)),
        )

    async def remove_idle_consumers(self, idle: float | None = None) -> list[str]:
        """Delete the group's consumers idle at least *idle* seconds (default
        ``consumer_idle_timeout``, else one hour) that have nothing pending.

        One Lua script: the check and ``XGROUP DELCONSUMER`` are atomic, so a consumer that
        was just handed entries is never removed (which would drop them from the PEL). This
        consumer itself is never removed. Returns the removed names.
        """
        seconds = _seconds(
            idle if idle is not None else self.consumer_idle_timeout or 3600.0, "idle"
        )
        try:
            removed = await _JANITOR(
                self.redis,
                keys=[self.keys.stream],
                args=[self.group, max(0, round(seconds * 1000)), self.name],
            )
        except ResponseError as exc:
            if _is_nogroup(exc):
                return []
            raise _wrap_redis_error(exc, "remove idle consumers") from exc
        except RedisError as exc:
            raise _wrap_redis_error(exc, "remove idle consumers") from exc
        return [_text(n) for n in removed]

    async def dead_letters(self, count: int = 100, *, start: str = "-") -> list[DeadLetter]:
        """Read up to *count* entries of the dead-letter stream, oldest first, from *start*.

        Payloads are decoded like the handler's (undecodable ones are given raw).
        """
        try:
            rows = await self.redis.xrange(self.keys.dead_letter, min=start, count=count)
        except RedisError as exc:
            raise _wrap_redis_error(exc, "read the dead-letter stream") from exc
        out: list[DeadLetter] = []
        for raw_id, raw_fields in rows or ():
            meta: dict[str, str] = {}
            original: dict[str, Any] = {}
            for k, v in (raw_fields or {}).items():
                name = _text(k)
                if name.startswith("dlq-"):
                    meta[name] = _text(v)
                else:
                    original[name] = v
            payload: Any = original
            if PAYLOAD_FIELD in original:
                try:
                    payload = self.codec.decode(original[PAYLOAD_FIELD])
                except CodecError:
                    payload = original[PAYLOAD_FIELD]
            out.append(
                DeadLetter(
                    id=_text(raw_id or b""),
                    original_id=meta.get("dlq-id", ""),
                    stream=meta.get("dlq-stream", self.stream),
                    group=meta.get("dlq-group", ""),
                    consumer=meta.get("dlq-consumer", ""),
                    error=meta.get("dlq-error", ""),
                    deliveries=int(meta.get("dlq-deliveries", "0") or 0),
                    failed_at_ms=int(meta.get("dlq-at-ms", "0") or 0),
                    payload=payload,
                    fields=original,
                )
            )
        return out

    # -- the loop -------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping:
            try:
                if not self._group_ready:
                    await self._create_group(self.start_id)
                    self._group_ready = True
                await self._step(loop)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_nogroup(exc):
                    with contextlib.suppress(RedisError, OSError):
                        await self._recreate_group()
                        continue
                failures += 1
                self.counters.redis_errors += 1
                self._recover = True  # a lost XREADGROUP reply may have left entries in our PEL
                base, cap = _ERROR_BACKOFF
                delay = min(cap, base * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
                if isinstance(exc, RedisError | OSError):
                    log.warning(
                        "stream %r consumer %r: Redis error (%s); retrying in %.2fs",
                        self.stream,
                        self.name,
                        exc,
                        delay,
                    )
                else:
                    log.exception(
                        "stream %r consumer %r: unexpected error; retrying in %.2fs",
                        self.stream,
                        self.name,
                        delay,
                    )
                await self._sleep(delay)

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake.clear()
        now = loop.time()
        if self._capacity() and self._retry_heap and self._retry_heap[0][0] <= now:
            self._start_all(await self._take_due_retries(self._capacity()))
        if self._capacity() and self._recover:
            self._start_all(await self._recover_own(self._capacity()))
        if self._capacity() and now >= self._next_claim:
            self._start_all(await self._autoclaim(self._capacity()))
        if self.consumer_idle_timeout is not None and now >= self._next_janitor:
            self._next_janitor = now + self.janitor_interval * random.uniform(0.8, 1.2)
            try:
                removed = await self.remove_idle_consumers(self.consumer_idle_timeout)
            except (RedisUnavailable, StreamError) as exc:
                log.warning("stream %r: janitor failed: %s", self.stream, exc)
            else:
                if removed:
                    log.info(
                        "stream %r group %r: removed idle consumers %s",
                        self.stream,
                        self.group,
                        removed,
                    )
        if self._stopping:
            return
        capacity = self._capacity()
        if capacity == 0:
            await self._sleep(self.block)  # a finishing handler (or stop) sets _wake
            return
        wait = self._until_next_timer(loop.time())
        self._start_all(await self._read_new(min(capacity, self.batch_size), wait))

    def _until_next_timer(self, now: float) -> float:
        due = min(self.block, max(0.0, self._next_claim - now))
        if self._retry_heap:
            due = min(due, max(0.0, self._retry_heap[0][0] - now))
        return due

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    @traced("stream.consume", kind="client", attrs=_consumer_attrs, result=_received)
    async def _read_new(self, count: int, wait: float) -> list[_Entry]:
        block_ms = int(wait * 1000)
        if block_ms < 1:
            return await self._xreadgroup(count, None)
        read = asyncio.ensure_future(self._xreadgroup(count, block_ms))
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not read.done():
                read.cancel()  # redis-py drops the connection: the late reply cannot desync it
        if read not in done:
            await asyncio.wait({read})  # raises only if *this* task is cancelled meanwhile
            if read.cancelled() or read.exception() is not None:
                return []  # whatever the server had handed over stays pending for us
        return read.result()  # also a read that finished despite the cancel: handle it

    async def _xreadgroup(self, count: int, block_ms: int | None) -> list[_Entry]:
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        return [_Entry(_text(i), f, 1) for i, f in _entries(reply) if i is not None]

    # -- fetching (shared by run and run_once) --------------------------------

    @traced("stream.consume", kind="client", attrs=_consumer_attrs, result=_received)
    async def _fetch(self, limit: int, block: float | None) -> int:
        """Start handlers for up to *limit* entries (retries, own PEL, claims, new)."""
        started = len(self._inflight)
        self._start_all(await self._take_due_retries(limit))
        while len(self._inflight) - started < limit:
            own = await self._recover_own(limit - (len(self._inflight) - started))
            if not own:
                break
            self._start_all(own)
        room = limit - (len(self._inflight) - started)
        if room > 0:
            self._start_all(await self._autoclaim(room, full_pass=True))
        room = limit - (len(self._inflight) - started)
        if room > 0:
            wait = block if block is not None and len(self._inflight) == started else 0.0
            block_ms = int(wait * 1000)
            self._start_all(
                await self._xreadgroup(
                    min(self.batch_size, room), block_ms if block_ms >= 1 else None
                )
            )
        return len(self._inflight) - started

    def _held(self) -> set[str]:
        return {*self._inflight, *self._waiting, *self._acking}

    def _capacity(self) -> int:
        return max(0, self.concurrency - len(self._inflight))

    async def _take(self, ids: Sequence[str]) -> list[_Entry]:
        """XCLAIM *ids* for this consumer (delivery count +1), only those still ours."""
        out: list[_Entry] = []
        for chunk_start in range(0, len(ids), _IDS_PER_SCRIPT):
            chunk = ids[chunk_start : chunk_start + _IDS_PER_SCRIPT]
            claimed, deleted, foreign = await _CLAIM(
                self.redis, keys=[self.keys.stream], args=[self.group, self.name, "take", *chunk]
            )
            out += [_Entry(_text(i), _pairs(f), int(n)) for i, f, n in claimed]
            self.counters.deleted += len(deleted)
            self.counters.lost_claims += len(foreign)
        return out

    async def _take_due_retries(self, limit: int) -> list[_Entry]:
        now = asyncio.get_running_loop().time()
        due: list[str] = []
        while self._retry_heap and self._retry_heap[0][0] <= now and len(due) < limit:
            when, entry_id = heapq.heappop(self._retry_heap)
            if self._waiting.get(entry_id) == when:
                del self._waiting[entry_id]
                due.append(entry_id)
        return await self._take(due) if due else []

    async def _recover_own(self, limit: int) -> list[_Entry]:
        held = self._held()
        rows = await self.redis.xpending_range(
            self.keys.stream, self.group, "-", "+", limit + len(held), self.name
        )
        pending = [_text(cast(bytes | str, r["message_id"])) for r in rows]
        ids = [i for i in pending if i not in held][:limit]
        if not ids:
            self._recover = False
            return []
        entries = await self._take(ids)
        self.counters.recovered += len(entries)
        if entries:
            log.info(
                "stream %r consumer %r: recovered %d own pending entries",
                self.stream,
                self.name,
                len(entries),
            )
        elif len(ids) == len(pending):
            self._recover = False
        return entries

    async def _autoclaim(self, limit: int, *, full_pass: bool = False) -> list[_Entry]:
        """Follow the XAUTOCLAIM cursor until the end of the PEL or *limit* entries."""
        out: list[_Entry] = []
        held = self._held()
        loop = asyncio.get_running_loop()
        if full_pass:
            self._claim_cursor = "0-0"
        while len(out) < limit:
            cursor, claimed, deleted = await _AUTOCLAIM(
                self.redis,
                keys=[self.keys.stream],
                args=[
                    self.group,
                    self.name,
                    self._claim_idle_ms,
                    self._claim_cursor,
                    limit - len(out),
                ],
            )
            self._claim_cursor = _text(cursor)
            self.counters.deleted += len(deleted)
            for raw_id, fields, count in claimed:
                entry_id = _text(raw_id)
                if entry_id in held:
                    continue  # ours already and being worked on (its lease ran late)
                out.append(_Entry(entry_id, _pairs(fields), int(count)))
            if self._claim_cursor == "0-0":
                self._next_claim = loop.time() + self.claim_interval
                break
        else:
            self._next_claim = loop.time()  # more PEL to scan as soon as there is capacity
        if out:
            self.counters.claimed += len(out)
            log.info(
                "stream %r consumer %r: claimed %d idle entries", self.stream, self.name, len(out)
            )
        return out

    # -- handling -------------------------------------------------------------

    def _start_all(self, entries: Iterable[_Entry]) -> None:
        for entry in entries:
            self._start(entry)

    def _start(self, entry: _Entry) -> None:
        if entry.id in self._inflight:
            return
        task = asyncio.create_task(self._process(entry), name=f"stream-handler:{entry.id}")
        self._inflight[entry.id] = task
        task.add_done_callback(functools.partial(self._finished, entry.id))

    def _finished(self, entry_id: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(entry_id) is task:
            del self._inflight[entry_id]
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "stream %r: processing entry %s failed unexpectedly",
                self.stream,
                entry_id,
                exc_info=task.exception(),
            )

    def _decode(self, entry: _Entry) -> Any:
        data = entry.fields.get(self._payload_field)
        if data is not None:
            return self.codec.decode(data, self.payload_type)
        fields = {_text(k): _field_value(v) for k, v in entry.fields.items()}
        if self._fields_adapter is None:
            return fields
        try:
            return self._fields_adapter.validate_python(fields)
        except ValidationError as exc:
            raise CodecError(
                f"stream entry fields do not match {self.payload_type!r}: {exc}"
            ) from exc

    @traced("stream.handle", kind="consumer", attrs=_consumer_attrs, parent=_fields)
    async def _process(self, entry: _Entry) -> None:
        async with self._slots:
            if entry.deliveries > self.max_deliveries:
                await self._dead_letter(
                    entry,
                    f"delivered {entry.deliveries} times (max_deliveries={self.max_deliveries}) without being acknowledged",
                )
                outcome("dead_lettered")
                self.counters.handled += 1
                return
            try:
                payload = self._decode(entry)
            except CodecError as exc:
                await self._dead_letter(entry, f"undecodable payload: {exc}")
                outcome("dead_lettered", exc)
                self.counters.handled += 1
                return
            message: StreamMessage[T] = StreamMessage(
                id=entry.id,
                payload=payload,
                deliveries=entry.deliveries,
                stream=self.stream,
                group=self.group,
                consumer=self.name,
                fields=entry.fields,
            )
            try:
                await self.handler(message)
            except asyncio.CancelledError:
                self.counters.abandoned += 1
                raise
            except Exception as exc:
                outcome("failed", exc)
                self.counters.handled += 1
                self.counters.failed += 1
                await self._failed(entry, exc)
                return
            self.counters.handled += 1
            self._ack(entry.id)

    async def _failed(self, entry: _Entry, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if entry.deliveries >= self.max_deliveries:
            await self._dead_letter(entry, error)
            return
        delay = min(self.retry_backoff_max, self.retry_backoff * 2 ** (entry.deliveries - 1))
        delay *= random.uniform(0.5, 1.0)
        log.warning(
            "stream %r: handler failed on %s (delivery %d of %d): %s; retrying in %.2fs",
            self.stream,
            entry.id,
            entry.deliveries,
            self.max_deliveries,
            error,
            delay,
        )
        self._schedule_retry(entry.id, delay)

    @traced("stream.retry", attrs=_consumer_attrs)
    def _schedule_retry(self, entry_id: str, delay: float) -> None:
        due = asyncio.get_running_loop().time() + delay
        self._waiting[entry_id] = due
        heapq.heappush(self._retry_heap, (due, entry_id))
        self.counters.retried += 1
        self._wake.set()

    @traced("stream.dead_letter", attrs=_consumer_attrs)
    async def _dead_letter(self, entry: _Entry, error: str) -> None:
        try:
            status, dead_id = await _DEAD_LETTER(
                self.redis,
                keys=[self.keys.stream, self.keys.dead_letter],
                args=[
                    self.group,
                    self.name,
                    entry.id,
                    error[:4096],
                    entry.deliveries,
                    self.dead_letter_maxlen,
                    self.stream,
                ],
            )
        except (RedisError, OSError) as exc:
            # Still pending: the next delivery (count > max) dead-letters it again.
            self.counters.redis_errors += 1
            outcome("unavailable", exc)
            log.warning(
                "stream %r: could not dead-letter %s (%s); it stays pending",
                self.stream,
                entry.id,
                exc,
            )
            self._schedule_retry(
                entry.id, min(self.retry_backoff_max, max(self.retry_backoff, 0.1))
            )
            return
        status = _text(status)
        outcome(status)  # moved, deleted (gone from the stream) or lost (not ours)
        if status == "moved":
            self.counters.dead_lettered += 1
            log.error(
                "stream %r: entry %s dead-lettered as %s after %d deliveries: %s",
                self.stream,
                entry.id,
                _text(dead_id),
                entry.deliveries,
                error,
            )
        elif status == "deleted":
            self.counters.deleted += 1
        else:
            self.counters.lost_claims += 1

    # -- acks and leases ------------------------------------------------------

    def _ack(self, entry_id: str) -> None:
        self._acking.add(entry_id)
        self._ack_buffer.append(entry_id)
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._flush_acks(), name="stream-ack")

    async def _flush_acks(self) -> None:
        """Group commit: every id that finished while an XACK was in flight goes in the next."""
        failures = 0
        while self._ack_buffer:
            ids, self._ack_buffer = self._ack_buffer, []
            try:
                await self.redis.xack(self.keys.stream, self.group, *ids)
            except (RedisError, OSError) as exc:
                if _is_nogroup(exc):
                    self._acking.difference_update(ids)  # the group (and its PEL) is gone
                    continue
                failures += 1
                self.counters.redis_errors += 1
                self._ack_buffer[:0] = ids
                if failures > 8:
                    log.warning(
                        "stream %r: %d acks not confirmed (%s); the entries stay pending",
                        self.stream,
                        len(self._ack_buffer),
                        exc,
                    )
                    return
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            self._acking.difference_update(ids)
            self.counters.acked += len(ids)

    async def _flush_acks_now(self, timeout: float | None = None) -> None:
        if self._ack_buffer and (self._ack_task is None or self._ack_task.done()):
            self._ack_task = asyncio.create_task(self._flush_acks(), name="stream-ack")
        task = self._ack_task
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)

    def _start_renewer(self) -> tuple[asyncio.Task[None], asyncio.Event]:
        done = asyncio.Event()
        task = asyncio.create_task(self._renew_until(done), name=f"stream-renew:{self.name}")
        return task, done

    @staticmethod
    async def _stop_renewer(task: asyncio.Task[None], done: asyncio.Event) -> None:
        # The flag, not only cancel(): Python 3.11's wait_for (used by some clients, fakeredis
        # among them) can swallow a cancellation that races with a reply.
        done.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _renew_until(self, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_interval):
                    await done.wait()
            if done.is_set():
                return
            try:
                await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.redis_errors += 1
                log.warning("stream %r: lease renewal failed: %s", self.stream, exc)

    async def _renew(self) -> None:
        """Reset the idle time of every entry this consumer holds, so nobody claims them."""
        ids = sorted(self._held())
        for chunk_start in range(0, len(ids), _IDS_PER_SCRIPT):
            chunk = ids[chunk_start : chunk_start + _IDS_PER_SCRIPT]
            renewed, deleted, foreign = await _CLAIM(
                self.redis, keys=[self.keys.stream], args=[self.group, self.name, "renew", *chunk]
            )
            self.counters.deleted += len(deleted)
            self.counters.lost_claims += len(foreign)
            for raw_id in foreign:
                log.warning(
                    "stream %r: entry %s was claimed by another consumer while %r held it "
                    "(renew_interval too close to claim_idle, or the event loop stalled)",
                    self.stream,
                    _text(raw_id),
                    self.name,
                )
            kept = {_text(i) for i in renewed}
            for entry_id in chunk:
                if entry_id not in kept:  # deleted, taken, or acked meanwhile: no retry here
                    self._waiting.pop(entry_id, None)

    # -- group lifecycle ------------------------------------------------------

    async def _create_group(self, start_id: str) -> bool:
        try:
            await self.redis.xgroup_create(self.keys.stream, self.group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def _recreate_group(self) -> None:
        """After NOGROUP: the stream or group vanished (FLUSHALL, restart without persistence,
        XGROUP DESTROY). Recreate it from "0" and forget state that referred to the old PEL."""
        created = await self._create_group("0")
        self._group_ready = True
        self._waiting.clear()
        self._retry_heap.clear()
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._recover = True
        self.counters.group_recreated += 1
        log.warning(
            "stream %r: consumer group %r was missing (Redis restarted or flushed?); %s it",
            self.stream,
            self.group,
            "recreated" if created else "another consumer recreated",
        )

    async def _shutdown(
        self, renewer: tuple[asyncio.Task[None], asyncio.Event], *, graceful: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._stop_timeout if graceful else 0.0)
        try:
            tasks = list(self._inflight.values())
            if tasks and graceful:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        finally:
            # Also when cancelled while draining (a second SIGTERM): no handler outlives run().
            late = [t for t in self._inflight.values() if not t.done()]
            for task in late:
                task.cancel()
            renewer[1].set()
            renewer[0].cancel()
        if late:
            # Bounded: a handler that swallows its cancellation is left behind, not awaited.
            await asyncio.wait(late, timeout=1.0)
            log.warning(
                "stream %r consumer %r: %d handlers still running at the stop deadline were "
                "cancelled; their entries stay pending",
                self.stream,
                self.name,
                len(late),
            )
        await self._stop_renewer(*renewer)
        await self._flush_acks_now(timeout=max(1.0, deadline - loop.time()))
        if self._ack_task is not None and not self._ack_task.done():
            self._ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task
        self._waiting.clear()
        self._retry_heap.clear()

    def __repr__(self) -> str:
        return (
            f"StreamConsumer(stream={self.stream!r}, group={self.group!r}, "
            f"consumer={self.name!r}, running={self._running})"
        )
