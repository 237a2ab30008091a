"""Delivery: a local queue of entries read ahead, and a few worker tasks that run the
handler over it, then ack, retry or dead-letter each entry."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from app.core.errors import CodecError, RedisUnavailable, StreamError
from app.core.guard import as_text
from app.core.scripts import Script
from app.core.telemetry import outcome, traced
from app.services.streams._common import _consumer_attrs, _field_value, _fields, _why
from app.services.streams._models import StreamMessage, _Entry

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer

log = logging.getLogger("app.streams")

T = TypeVar("T")

_DEAD_LETTER = Script.from_package("app.services.streams", "lua/streams_dead_letter.lua")


class _Delivery(Generic[T]):
    """The local queue and the handler workers of one ``StreamConsumer``.

    Entries handed over (read, claimed, recovered, due for a retry) wait in ``queue`` until a
    worker takes them; at most ``concurrency`` workers run, each one entry at a time, so at
    most ``concurrency`` handlers run at once. Workers are started on demand and end when the
    queue is empty: one worker first, more on the next event-loop turn only if the queue is
    still not empty by then (its handlers wait on something), so a batch whose handlers never
    wait costs one task, not one per entry. ``release()`` drops the queue: those entries were
    never started and stay pending for this consumer in Redis.
    """

    def __init__(self, consumer: StreamConsumer[T]) -> None:
        self.consumer = consumer
        self.inflight: dict[str, asyncio.Task[None]] = {}  # running entry -> its worker
        self.queue: deque[_Entry] = deque()
        self.queued: set[str] = set()
        self.workers: set[asyncio.Task[None]] = set()
        self._more_pending = False  # a call_soon(self._more_workers) is scheduled

    def held(self) -> int:
        """Entries read and not yet finished: running or queued."""
        return len(self.inflight) + len(self.queue)

    def start_all(self, entries: Iterable[_Entry]) -> int:
        """Queue *entries* (those not already running or queued); returns how many."""
        added = 0
        for entry in entries:
            if entry.id in self.inflight or entry.id in self.queued:
                continue
            self.queue.append(entry)
            self.queued.add(entry.id)
            added += 1
        if added:
            if not self.workers:
                self._spawn()
            elif len(self.workers) < self.consumer.concurrency:
                self._schedule_more()  # the live workers are busy in their handlers
        return added

    def release(self) -> int:
        """Forget the queued entries (not started); they stay pending in Redis. Returns how many."""
        released = len(self.queue)
        self.queue.clear()
        self.queued.clear()
        return released

    def drop(self, ids: set[str]) -> None:
        """Take *ids* out of the queue (another consumer claimed them, or they were deleted)."""
        if ids & self.queued:
            self.queued -= ids
            kept = [e for e in self.queue if e.id not in ids]
            self.queue.clear()  # in place: the workers hold this deque
            self.queue.extend(kept)
            self.consumer._runner.wake.set()  # room for more

    async def idle(self) -> None:
        """Wait until the queue is empty and every worker has ended."""
        while self.workers:
            await asyncio.wait(set(self.workers))

    def _spawn(self) -> None:
        task = asyncio.create_task(self._work(), name=f"stream-worker:{self.consumer.name}")
        self.workers.add(task)

    def _schedule_more(self) -> None:
        if not self._more_pending:
            self._more_pending = True
            asyncio.get_running_loop().call_soon(self._more_workers)

    def _more_workers(self) -> None:
        """One event-loop turn after a worker took an entry: if the queue is still not empty
        (a handler is waiting on something), start workers for it, up to ``concurrency``."""
        self._more_pending = False
        want = min(len(self.queue), self.consumer.concurrency - len(self.workers))
        for _ in range(want):
            self._spawn()

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        queue, queued, inflight = self.queue, self.queued, self.inflight
        c = self.consumer
        wake, acking = c._runner.wake, c._acks.acking
        try:
            while queue:
                entry = queue.popleft()
                queued.discard(entry.id)
                if queue and not self._more_pending and len(self.workers) < c.concurrency:
                    self._schedule_more()
                inflight[entry.id] = task
                try:
                    await self.process(entry)
                except Exception as exc:  # process() handles handler errors: this is a bug
                    log.error(
                        "stream %r: processing entry %s failed unexpectedly",
                        c.stream,
                        entry.id,
                        exc_info=exc,
                    )
                finally:
                    del inflight[entry.id]
                    if entry.id not in acking:  # an acked entry frees room once confirmed
                        wake.set()
        finally:
            self.workers.discard(task)

    def decode(self, entry: _Entry) -> Any:
        c = self.consumer
        data = entry.fields.get(c._payload_field)
        if data is not None:
            return c.codec.decode(data, c.payload_type)
        fields = {as_text(k): _field_value(v) for k, v in entry.fields.items()}
        if c._fields_adapter is None:
            return fields
        try:
            return c._fields_adapter.validate_python(fields)
        except ValidationError as exc:
            raise CodecError(f"stream entry fields do not match {c.payload_type!r}: {exc}") from exc

    @traced("stream.handle", kind="consumer", attrs=_consumer_attrs, parent=_fields)
    async def process(self, entry: _Entry) -> None:
        c = self.consumer
        if entry.deliveries > c.max_deliveries:
            await self.dead_letter(
                entry,
                f"delivered {entry.deliveries} times (max_deliveries={c.max_deliveries}) without being acknowledged",
            )
            outcome("dead_lettered")
            c.counters.handled += 1
            return
        try:
            payload = self.decode(entry)
        except CodecError as exc:
            await self.dead_letter(entry, f"undecodable payload: {exc}")
            outcome("dead_lettered", exc)
            c.counters.handled += 1
            return
        message: StreamMessage[T] = StreamMessage(
            id=entry.id,
            payload=payload,
            deliveries=entry.deliveries,
            stream=c.stream,
            group=c.group,
            consumer=c.name,
            fields=entry.fields,
        )
        try:
            await c.handler(message)
        except asyncio.CancelledError:
            c.counters.abandoned += 1
            raise
        except Exception as exc:
            outcome("failed", exc)
            c.counters.handled += 1
            c.counters.failed += 1
            await self._failed(entry, exc)
            return
        c.counters.handled += 1
        c._acks.ack(entry.id)

    async def _failed(self, entry: _Entry, exc: Exception) -> None:
        c = self.consumer
        error = f"{type(exc).__name__}: {exc}"
        if entry.deliveries >= c.max_deliveries:
            await self.dead_letter(entry, error)
            return
        delay = min(c.retry_backoff_max, c.retry_backoff * 2 ** (entry.deliveries - 1))
        delay *= random.uniform(0.5, 1.0)
        log.warning(
            "stream %r: handler failed on %s (delivery %d of %d): %s; retrying in %.2fs",
            c.stream,
            entry.id,
            entry.deliveries,
            c.max_deliveries,
            error,
            delay,
        )
        c._claims.schedule_retry(entry.id, delay)

    @traced("stream.dead_letter", attrs=_consumer_attrs)
    async def dead_letter(self, entry: _Entry, error: str) -> None:
        c = self.consumer
        try:
            with c._guard:
                status, dead_id = await _DEAD_LETTER(
                    c.redis,
                    keys=[c.keys.stream, c.keys.dead_letter],
                    args=[
                        c.group,
                        c.name,
                        entry.id,
                        error[:4096],
                        entry.deliveries,
                        c.dead_letter_maxlen,
                        c.stream,
                    ],
                )
        except (RedisUnavailable, StreamError) as exc:
            # Still pending: the next delivery (count > max) dead-letters it again.
            c.counters.redis_errors += 1
            outcome("unavailable", exc)
            log.warning(
                "stream %r: could not dead-letter %s (%s); it stays pending",
                c.stream,
                entry.id,
                _why(exc),
            )
            c._claims.schedule_retry(entry.id, min(c.retry_backoff_max, max(c.retry_backoff, 0.1)))
            return
        status = as_text(status)
        outcome(status)  # moved, deleted (gone from the stream) or lost (not ours)
        if status == "moved":
            c.counters.dead_lettered += 1
            log.error(
                "stream %r: entry %s dead-lettered as %s after %d deliveries: %s",
                c.stream,
                entry.id,
                as_text(dead_id),
                entry.deliveries,
                error,
            )
        elif status == "deleted":
            c.counters.deleted += 1
        else:
            c.counters.lost_claims += 1
