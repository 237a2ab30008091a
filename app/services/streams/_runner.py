"""The consumer's loop: ``run()`` until ``stop()``, and one round for ``run_once()``.

``_Runner`` owns the loop's state (running, stopping, its wake-up and stop events) and
decides what to do next on every turn, in the order the package docstring gives: due
retries, own pending entries, idle entries of other consumers, then new entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, Final

from app.core.errors import RedisUnavailable, StreamError
from app.core.guard import Duration, as_seconds, as_text
from app.core.telemetry import traced
from app.services.streams._claims import _Renewer
from app.services.streams._common import (
    _consumer_attrs,
    _entries,
    _is_nogroup,
    _received,
    _why,
)
from app.services.streams._models import _Entry

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer

log = logging.getLogger("app.streams")

_ERROR_BACKOFF: Final = (0.05, 2.0)  # loop backoff after a Redis error: base, cap (seconds)
_REDIS_FAILED = (RedisUnavailable, StreamError)  # what the consumer's guard raises


class _Runner:
    """``run``, ``stop`` and ``run_once`` of one ``StreamConsumer``."""

    def __init__(self, consumer: StreamConsumer[Any]) -> None:
        self.consumer = consumer
        self.running = False
        self.stopping = False
        self.stop_requested = False
        self.stop_timeout = consumer.shutdown_timeout
        self.next_janitor = 0.0
        self.backlog = False  # the last read was full: the next one need not block
        self.wake = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.done = asyncio.Event()

    # -- the three verbs ------------------------------------------------------

    async def run(self) -> None:
        c = self.consumer
        if self.running:
            raise StreamError(f"consumer {c.name!r} is already running")
        if self.stop_requested:  # stop() came before this task got to run
            self.stop_requested = False
            return
        self.running = True
        self.stopping = False
        self.stop_timeout = c.shutdown_timeout
        self.stop_event = asyncio.Event()
        self.done = asyncio.Event()
        self.wake = asyncio.Event()
        c._claims.recover = True
        renewer = c._claims.start_renewer()
        graceful = False
        try:
            await self._loop()
            graceful = True
        finally:
            try:
                await self._shutdown(renewer, graceful=graceful)
            finally:
                self.running = False
                self.done.set()

    async def stop(self, timeout: Duration | None) -> None:
        if not self.running:
            self.stop_requested = True
            return
        if timeout is not None:
            self.stop_timeout = as_seconds(timeout, "timeout", allow_zero=True)
        self.stopping = True
        self.stop_event.set()
        self.wake.set()
        await self.done.wait()

    async def run_once(self, block: Duration | None) -> int:
        c = self.consumer
        if self.running:
            raise StreamError("run_once() cannot be used while run() is running")
        before = c.counters.handled
        block_s = None if block is None else min(as_seconds(block, "block"), c.block)
        failure: RedisUnavailable | StreamError | None = None
        try:
            await c._ensure_group_ready()
            try:
                await self._fetch(c.batch_size, block_s)
            except StreamError as exc:
                if not _is_nogroup(exc):
                    raise
                await c._recreate_group()
                await self._fetch(c.batch_size, block_s)
        except _REDIS_FAILED as exc:
            failure = exc  # still finish (and ack) the handlers already started
        delivery = c._delivery
        if delivery.workers:
            renewer = c._claims.start_renewer()
            try:
                await delivery.idle()
            finally:
                if delivery.workers:  # cancelled while waiting: no handler outlives the call
                    delivery.release()
                    for task in delivery.workers:
                        task.cancel()
                await c._claims.stop_renewer(*renewer)
        await c._acks.flush_now()
        if failure is not None:
            raise failure
        return c.counters.handled - before

    # -- the loop -------------------------------------------------------------

    async def _loop(self) -> None:
        c = self.consumer
        loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping:
            try:
                await c._ensure_group_ready()
                await self._step(loop)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_nogroup(exc):
                    with contextlib.suppress(*_REDIS_FAILED):
                        await c._recreate_group()
                        continue
                failures += 1
                await self._sleep(self._after_error(exc, failures))

    def _after_error(self, exc: Exception, failures: int) -> float:
        """Count and log a failed turn; returns how long to wait before the next one."""
        c = self.consumer
        c.counters.redis_errors += 1
        c._claims.recover = True  # a lost XREADGROUP reply may have left entries in our PEL
        base, cap = _ERROR_BACKOFF
        delay: float = min(cap, base * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
        if isinstance(exc, _REDIS_FAILED):
            log.warning(
                "stream %r consumer %r: Redis error (%s); retrying in %.2fs",
                c.stream,
                c.name,
                _why(exc),
                delay,
            )
        else:
            log.exception(
                "stream %r consumer %r: unexpected error; retrying in %.2fs",
                c.stream,
                c.name,
                delay,
            )
        return delay

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.consumer
        claims, delivery = c._claims, c._delivery
        self.wake.clear()
        c._acks.kick()
        now = loop.time()
        if claims.retry_due(now) and c._room():
            delivery.start_all(await claims.take_due_retries(c._room()))
        if claims.recover and c._room():
            delivery.start_all(await claims.recover_own(c._room()))
        if now >= claims.next_claim and c._room():
            delivery.start_all(await claims.autoclaim(c._room()))
        if c.consumer_idle_timeout is not None and now >= self.next_janitor:
            await self._janitor(now, c.consumer_idle_timeout)
        if self.stopping:
            return
        room = c._room()
        if room == 0:
            # Everything this consumer may hold is taken: wait, without calling Redis, for a
            # handler to finish or an ack to be confirmed (or stop) to set wake.
            await self._sleep(c.block)
            return
        count = min(room, c.batch_size)
        # After a full read the stream likely has more: ask without blocking (a multiplexed
        # command, no wait for stop); a short or empty read means the next one may block.
        wait = 0.0 if self.backlog else self._until_next_timer(loop.time())
        entries = await self._read_new(count, wait)
        self.backlog = len(entries) == count
        delivery.start_all(entries)

    async def _janitor(self, now: float, idle: float) -> None:
        c = self.consumer
        self.next_janitor = now + c.janitor_interval * random.uniform(0.8, 1.2)
        try:
            removed = await c.remove_idle_consumers(idle)
        except _REDIS_FAILED as exc:
            log.warning("stream %r: janitor failed: %s", c.stream, _why(exc))
        else:
            if removed:
                log.info(
                    "stream %r group %r: removed idle consumers %s", c.stream, c.group, removed
                )

    def _until_next_timer(self, now: float) -> float:
        c = self.consumer
        claims = c._claims
        due = min(c.block, max(0.0, claims.next_claim - now))
        if claims.retry_heap:
            due = min(due, max(0.0, claims.retry_heap[0][0] - now))
        return due

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()

    # -- reading --------------------------------------------------------------

    @traced("stream.consume", kind="client", attrs=_consumer_attrs, result=_received)
    async def _read_new(self, count: int, wait: float) -> list[_Entry]:
        block_ms = int(wait * 1000)
        if block_ms < 1:
            return await self._xreadgroup(count, None)
        read = asyncio.ensure_future(self._xreadgroup(count, block_ms))
        stopper = asyncio.ensure_future(self.stop_event.wait())
        try:
            done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not read.done():
                read.cancel()  # redis-py drops the connection: the late reply cannot desync it
        if read not in done:
            # The cancel reaches the read whatever step it is in (app.core.pool delivers
            # redis.asyncio's cancellations), so it ends now, not after its whole wait.
            await asyncio.wait({read})
            if read.cancelled() or read.exception() is not None:
                return []  # whatever the server had handed over stays pending for us
        return read.result()  # also a read that finished despite the cancel: handle it

    async def _xreadgroup(self, count: int, block_ms: int | None) -> list[_Entry]:
        c = self.consumer
        guard = c._guard
        if block_ms is not None and guard.breaker.state != "closed":
            # A half-open breaker admits one trial call and holds it until the call ends: a
            # blocking read as that trial would keep every other caller of the client refused
            # for its whole wait. Ask without waiting; the next turn blocks again.
            block_ms = None
        with guard:
            reply = await c.redis.xreadgroup(
                c.group, c.name, {c.keys.stream: ">"}, count=count, block=block_ms
            )
        return [_Entry(as_text(i), f, 1) for i, f in _entries(reply) if i is not None]

    @traced("stream.consume", kind="client", attrs=_consumer_attrs, result=_received)
    async def _fetch(self, limit: int, block: float | None) -> int:
        """Start handlers for up to *limit* entries (retries, own PEL, claims, new)."""
        c = self.consumer
        claims, delivery = c._claims, c._delivery
        started = delivery.start_all(await claims.take_due_retries(limit))
        while started < limit:
            own = await claims.recover_own(limit - started)
            if not own:
                break
            started += delivery.start_all(own)
        if started < limit:
            started += delivery.start_all(await claims.autoclaim(limit - started, full_pass=True))
        if started < limit:
            wait = block if block is not None and started == 0 else 0.0
            block_ms = int(wait * 1000)
            started += delivery.start_all(
                await self._xreadgroup(
                    min(c.batch_size, limit - started), block_ms if block_ms >= 1 else None
                )
            )
        return started

    # -- stopping -------------------------------------------------------------

    async def _shutdown(self, renewer: _Renewer, *, graceful: bool) -> None:
        c = self.consumer
        delivery = c._delivery
        released = delivery.release()  # read ahead, never started: they stay pending for us
        if released:
            c.counters.released += released
            log.info(
                "stream %r consumer %r: %d entries read ahead and not started stay pending",
                c.stream,
                c.name,
                released,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.stop_timeout if graceful else 0.0)
        try:
            workers = list(delivery.workers)
            if workers and graceful:
                await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
        finally:
            # Also when cancelled while draining (a second SIGTERM): no handler outlives run().
            c.counters.released += delivery.release()  # none expected: nothing reads now
            late = [t for t in delivery.workers if not t.done()]
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
                c.stream,
                c.name,
                len(late),
            )
        await c._claims.stop_renewer(*renewer)
        await c._acks.flush_now(timeout=max(1.0, deadline - loop.time()))
        await c._acks.cancel()
        c._claims.clear_retries()
