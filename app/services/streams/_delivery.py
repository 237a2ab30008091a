"""Delivery: one task per entry runs the handler, then acks, retries or dead-letters it."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
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
    """The handler tasks of one ``StreamConsumer`` (at most ``concurrency`` at once)."""

    def __init__(self, consumer: StreamConsumer[T]) -> None:
        self.consumer = consumer
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(consumer.concurrency)

    def capacity(self) -> int:
        return max(0, self.consumer.concurrency - len(self.inflight))

    def start_all(self, entries: Iterable[_Entry]) -> None:
        for entry in entries:
            self.start(entry)

    def start(self, entry: _Entry) -> None:
        if entry.id in self.inflight:
            return
        task = asyncio.create_task(self.process(entry), name=f"stream-handler:{entry.id}")
        self.inflight[entry.id] = task
        task.add_done_callback(functools.partial(self._finished, entry.id))

    def _finished(self, entry_id: str, task: asyncio.Task[None]) -> None:
        if self.inflight.get(entry_id) is task:
            del self.inflight[entry_id]
        self.consumer._runner.wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "stream %r: processing entry %s failed unexpectedly",
                self.consumer.stream,
                entry_id,
                exc_info=task.exception(),
            )

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
        async with self.slots:
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
