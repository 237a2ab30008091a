"""Reading: ``StreamConsumer``, a consumer-group worker with at-least-once delivery.

The class holds the options and the public verbs; its parts do the work: ``_Runner`` (the
loop), ``_Claims`` (retries, recovery, XAUTOCLAIM, leases), ``_Delivery`` (handler tasks,
dead letters), ``_Acks`` (coalesced XACK) and ``_admin`` (stats, janitor, dead-letter reads).
"""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter
from redis.exceptions import ResponseError

from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError
from app.core.guard import Duration, as_seconds, block_cap, to_ms
from app.core.redis import AnyRedis, client_decodes_responses
from app.core.telemetry import watch
from app.services.streams._acks import _Acks
from app.services.streams._admin import _read_dead_letters, _read_stats, _remove_idle_consumers
from app.services.streams._claims import _Claims
from app.services.streams._common import _guard, _is_busygroup, _not_negative, _positive
from app.services.streams._delivery import _Delivery
from app.services.streams._keys import default_consumer_name, stream_keys
from app.services.streams._models import (
    PAYLOAD_FIELD,
    ConsumerCounters,
    DeadLetter,
    Handler,
    StreamStats,
)
from app.services.streams._runner import _Runner

__all__ = ["StreamConsumer"]

log = logging.getLogger("app.streams")

T = TypeVar("T")


class StreamConsumer(Generic[T]):
    """A consumer-group worker with at-least-once delivery (see the package docstring).

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
        prefetch: how many entries beyond its free handler slots this consumer may hold
            locally, read ahead and waiting for a slot. The default is ``batch_size``, raised
            so that ``concurrency + prefetch`` holds two full batches (24 with the defaults):
            one batch is handled and acked while the next is read, and reads stay full.
            ``0`` reads only for free slots. The bound is
            strict: entries read and not yet confirmed acked (running, queued, or with their
            XACK in flight) never exceed ``concurrency + prefetch``; when they reach it the
            loop waits without calling Redis. Entries waiting for a retry's backoff are not
            counted. A larger value reads in fewer, fuller round trips; a smaller one leaves
            more of a backlog to the group's other consumers while this one is busy (entries
            queued here are leased to it like running ones). Queued entries not started
            when the consumer stops stay pending (see ``stop()``).
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
        namespace: the key space (``<REDIS_KEY_PREFIX>:<namespace>:{stream}``, default
            ``stream``), the same as the producer's.
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
        prefetch: int | None = None,
        block: Duration = 2.0,
        claim_idle: Duration = 30.0,
        claim_interval: Duration | None = None,
        renew_interval: Duration | None = None,
        max_deliveries: int = 5,
        retry_backoff: Duration = 0.5,
        retry_backoff_max: Duration = 30.0,
        dead_letter_maxlen: int | None = 10_000,
        start_id: str = "0",
        shutdown_timeout: Duration = 10.0,
        consumer_idle_timeout: Duration | None = 3600.0,
        janitor_interval: Duration = 60.0,
        namespace: str = "stream",
    ) -> None:
        if not group:
            raise ConfigurationError("a consumer group name must not be empty")
        self.redis = redis
        self.keys = stream_keys(stream, namespace=namespace)
        self.group = group
        self.name = consumer or default_consumer_name(stream, group)
        self._guard = _guard(redis, stream, group)
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
        self.prefetch = (
            max(self.batch_size, 2 * self.batch_size - self.concurrency)
            if prefetch is None
            else _not_negative(prefetch, "prefetch")
        )
        self.claim_idle = as_seconds(claim_idle, "claim_idle")
        self.claim_interval = as_seconds(
            claim_interval if claim_interval is not None else self.claim_idle / 2,
            "claim_interval",
        )
        self.renew_interval = as_seconds(
            renew_interval if renew_interval is not None else self.claim_idle / 3,
            "renew_interval",
        )
        if self.renew_interval >= self.claim_idle:
            raise ConfigurationError(
                f"renew_interval ({self.renew_interval}s) must be below claim_idle "
                f"({self.claim_idle}s), or other consumers take entries still being worked on"
            )
        self.max_deliveries = _positive(max_deliveries, "max_deliveries")
        self.retry_backoff = as_seconds(retry_backoff, "retry_backoff", allow_zero=True)
        self.retry_backoff_max = as_seconds(retry_backoff_max, "retry_backoff_max", allow_zero=True)
        self.dead_letter_maxlen = (
            0 if dead_letter_maxlen is None else _positive(dead_letter_maxlen, "dead_letter_maxlen")
        )
        self.start_id = start_id
        self.shutdown_timeout = as_seconds(shutdown_timeout, "shutdown_timeout", allow_zero=True)
        self.consumer_idle_timeout = (
            None
            if consumer_idle_timeout is None
            else as_seconds(consumer_idle_timeout, "consumer_idle_timeout")
        )
        self.janitor_interval = as_seconds(janitor_interval, "janitor_interval")
        self.block = block_cap(redis, as_seconds(block, "block"))
        self._claim_idle_ms = to_ms(self.claim_idle)
        self.counters = ConsumerCounters()

        self._group_ready = False
        self._claims = _Claims(self)
        self._acks = _Acks(self)
        self._delivery: _Delivery[T] = _Delivery(self)
        self._runner = _Runner(self)
        watch("stream.consumer", self)  # the lag / pending / dead-letter gauges

    # -- properties -----------------------------------------------------------

    @property
    def stream(self) -> str:
        return self.keys.name

    @property
    def running(self) -> bool:
        return self._runner.running

    @property
    def in_flight(self) -> int:
        return len(self._delivery.inflight)

    # -- public verbs ---------------------------------------------------------

    async def ensure_group(self) -> bool:
        """Create the group at ``start_id`` (``MKSTREAM``: the stream too) if it is missing.

        Returns True when it was created, False when it already existed (``BUSYGROUP`` is
        not an error). Idempotent and safe to race from many workers. Raises
        ``RedisUnavailable`` when Redis cannot be reached (or the breaker is open),
        ``StreamError`` when the key holds something else than a stream.
        """
        created = await self._create_group(self.start_id)
        self._group_ready = True
        return created

    async def run(self) -> None:
        """Consume until ``stop()``; never returns on its own.

        Creates the group if needed, recovers this consumer's own pending entries, then loops
        (see the package docstring). Redis errors are logged and retried with capped backoff;
        ``NOGROUP`` recreates the group. When the task running ``run()`` is cancelled, in-flight
        handlers are cancelled at once and their entries stay pending (redelivered later);
        prefer ``stop()``, which lets them finish.
        """
        await self._runner.run()

    async def stop(self, timeout: Duration | None = None) -> None:
        """Stop ``run()`` gracefully and wait until it has returned.

        Reading stops at once (a blocking read is abandoned; anything it had been handed
        stays pending for this consumer), and so does starting handlers: entries read ahead
        (``prefetch``) and still queued are released, not handled; they stay pending for this
        consumer in Redis (counted in ``counters.released``), so this consumer re-reads them
        on its next start, or another one claims them after ``claim_idle``, each time with
        one more delivery counted. In-flight handlers get up to *timeout* seconds
        (default ``shutdown_timeout``) to finish; those that finish are acked (or retried /
        dead-lettered as usual), those still running at the deadline are cancelled and their
        entries stay pending, so another consumer claims them after ``claim_idle`` (or this
        consumer recovers them on its next start). Entries waiting for a retry stay pending
        too. Called before a freshly created ``run()`` task got to start, it makes that
        ``run()`` return at once. Do not await it from inside a handler (it would wait for
        that handler): use ``asyncio.create_task(consumer.stop())`` there.
        """
        await self._runner.stop(timeout)

    async def run_once(self, *, block: Duration | None = None) -> int:
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
        return await self._runner.run_once(block)

    async def stats(self) -> StreamStats:
        """Length, lag, pending count, oldest pending entry and its idle time, consumers and
        dead-letter size, in one pipelined round trip, plus this object's counters.

        A missing stream or group reads as zeros. Raises ``RedisUnavailable`` when Redis
        cannot be reached.
        """
        return await _read_stats(self)

    async def remove_idle_consumers(self, idle: Duration | None = None) -> list[str]:
        """Delete the group's consumers idle at least *idle* seconds (default
        ``consumer_idle_timeout``, else one hour) that have nothing pending.

        One Lua script: the check and ``XGROUP DELCONSUMER`` are atomic, so a consumer that
        was just handed entries is never removed (which would drop them from the PEL). This
        consumer itself is never removed. Returns the removed names.
        """
        seconds = as_seconds(
            idle if idle is not None else self.consumer_idle_timeout or 3600.0, "idle"
        )
        return await _remove_idle_consumers(self, seconds)

    async def dead_letters(self, count: int = 100, *, start: str = "-") -> list[DeadLetter]:
        """Read up to *count* entries of the dead-letter stream, oldest first, from *start*.

        Payloads are decoded like the handler's (undecodable ones are given raw).
        """
        return await _read_dead_letters(self, count, start)

    # -- shared by the parts: what this consumer holds, its group --------------

    def _held(self) -> set[str]:
        """Ids this consumer holds: running, queued, waiting for a retry, or acked but
        unconfirmed."""
        d = self._delivery
        return {*d.inflight, *d.queued, *self._claims.waiting, *self._acks.acking}

    def _room(self) -> int:
        """How many more entries this consumer may take now (``concurrency + prefetch``
        minus those read and not yet confirmed acked)."""
        held = self._delivery.held() + len(self._acks.acking)
        return max(0, self.concurrency + self.prefetch - held)

    async def _ensure_group_ready(self) -> None:
        if not self._group_ready:
            await self._create_group(self.start_id)
            self._group_ready = True

    async def _create_group(self, start_id: str) -> bool:
        with self._guard:
            try:
                await self.redis.xgroup_create(
                    self.keys.stream, self.group, id=start_id, mkstream=True
                )
            except ResponseError as exc:  # the reply text, read before the guard wraps it
                if _is_busygroup(exc):
                    return False
                raise
        return True

    async def _recreate_group(self) -> None:
        """After NOGROUP: the stream or group vanished (FLUSHALL, restart without persistence,
        XGROUP DESTROY). Recreate it from "0" and forget state that referred to the old PEL."""
        created = await self._create_group("0")
        self._group_ready = True
        self._claims.forget()
        self._delivery.release()  # queued entries of the old PEL: the new group re-delivers them
        self.counters.group_recreated += 1
        log.warning(
            "stream %r: consumer group %r was missing (Redis restarted or flushed?); %s it",
            self.stream,
            self.group,
            "recreated" if created else "another consumer recreated",
        )

    def __repr__(self) -> str:
        return (
            f"StreamConsumer(stream={self.stream!r}, group={self.group!r}, "
            f"consumer={self.name!r}, running={self.running})"
        )
