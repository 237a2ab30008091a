"""Acks: handlers that return ack their entries, coalesced into one ``XACK`` at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from app.core.errors import RedisUnavailable, StreamError
from app.services.streams._common import _is_nogroup, _why

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer

log = logging.getLogger("app.streams")


class _Acks:
    """The acks of one ``StreamConsumer``: an id stays in ``acking`` (held, so its lease is
    still renewed) until Redis confirms its XACK."""

    def __init__(self, consumer: StreamConsumer[Any]) -> None:
        self.consumer = consumer
        self.acking: set[str] = set()  # acked by a handler, XACK not yet confirmed
        self.buffer: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def ack(self, entry_id: str) -> None:
        self.acking.add(entry_id)
        self.buffer.append(entry_id)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush(), name="stream-ack")

    def kick(self) -> None:
        """Send acks a flush gave up on (Redis was away): they hold room in the bound."""
        if self.buffer and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._flush(), name="stream-ack")

    async def _flush(self) -> None:
        """Group commit: every id that finished while an XACK was in flight goes in the next."""
        c = self.consumer
        failures = 0
        while self.buffer:
            ids, self.buffer = self.buffer, []
            try:
                with c._guard:
                    await c.redis.xack(c.keys.stream, c.group, *ids)
            except (RedisUnavailable, StreamError) as exc:
                if _is_nogroup(exc):
                    self.acking.difference_update(ids)  # the group (and its PEL) is gone
                    c._runner.wake.set()
                    continue
                failures += 1
                c.counters.redis_errors += 1
                self.buffer[:0] = ids
                if failures > 8:
                    log.warning(
                        "stream %r: %d acks not confirmed (%s); the entries stay pending",
                        c.stream,
                        len(self.buffer),
                        _why(exc),
                    )
                    return
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            self.acking.difference_update(ids)
            c.counters.acked += len(ids)
            c._runner.wake.set()  # room for more entries

    async def flush_now(self, timeout: float | None = None) -> None:
        """Wait (at most *timeout* seconds) until every buffered ack was sent."""
        self.kick()
        task = self.task
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)

    async def cancel(self) -> None:
        """Give up on acks still unsent (their entries stay pending)."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
