"""Claims: which pending entries a consumer takes, and how it keeps them.

``_Claims`` owns the consumer's view of the PEL beyond its running handlers: failed entries
waiting for their retry (a heap by due time), recovery of its own pending entries after a
start or an error, the ``XAUTOCLAIM`` cursor over idle entries of dead consumers, and the
lease renewal that keeps everything it holds below ``claim_idle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from app.core.guard import as_text
from app.core.scripts import Script
from app.core.telemetry import traced
from app.services.streams._common import _consumer_attrs, _pairs, _why
from app.services.streams._models import _Entry

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer

log = logging.getLogger("app.streams")

_CLAIM = Script.from_package("app.services.streams", "lua/streams_claim.lua")
_AUTOCLAIM = Script.from_package("app.services.streams", "lua/streams_autoclaim.lua")

_IDS_PER_SCRIPT: Final = 500  # ids per claim/renew script call (bounded Lua stack and run time)

_Renewer = tuple[asyncio.Task[None], asyncio.Event]


class _Claims:
    """Retries, recovery, XAUTOCLAIM and lease renewal of one ``StreamConsumer``."""

    def __init__(self, consumer: StreamConsumer[Any]) -> None:
        self.consumer = consumer
        self.waiting: dict[str, float] = {}  # id -> loop time its retry is due
        self.retry_heap: list[tuple[float, str]] = []
        self.cursor = "0-0"
        self.next_claim = 0.0
        self.recover = True  # re-read our own PEL before anything new

    # -- taking entries -------------------------------------------------------

    async def take(self, ids: Sequence[str]) -> list[_Entry]:
        """XCLAIM *ids* for this consumer (delivery count +1), only those still ours."""
        c = self.consumer
        out: list[_Entry] = []
        for chunk_start in range(0, len(ids), _IDS_PER_SCRIPT):
            chunk = ids[chunk_start : chunk_start + _IDS_PER_SCRIPT]
            with c._guard:
                claimed, deleted, foreign = await _CLAIM(
                    c.redis, keys=[c.keys.stream], args=[c.group, c.name, "take", *chunk]
                )
            out += [_Entry(as_text(i), _pairs(f), int(n)) for i, f, n in claimed]
            c.counters.deleted += len(deleted)
            c.counters.lost_claims += len(foreign)
        return out

    def retry_due(self, now: float) -> bool:
        return bool(self.retry_heap) and self.retry_heap[0][0] <= now

    async def take_due_retries(self, limit: int) -> list[_Entry]:
        now = asyncio.get_running_loop().time()
        due: list[str] = []
        while self.retry_heap and self.retry_heap[0][0] <= now and len(due) < limit:
            when, entry_id = heapq.heappop(self.retry_heap)
            if self.waiting.get(entry_id) == when:
                del self.waiting[entry_id]
                due.append(entry_id)
        return await self.take(due) if due else []

    async def recover_own(self, limit: int) -> list[_Entry]:
        c = self.consumer
        held = c._held()
        with c._guard:
            rows = await c.redis.xpending_range(
                c.keys.stream, c.group, "-", "+", limit + len(held), c.name
            )
        pending = [as_text(cast(bytes | str, r["message_id"])) for r in rows]
        ids = [i for i in pending if i not in held][:limit]
        if not ids:
            self.recover = False
            return []
        entries = await self.take(ids)
        c.counters.recovered += len(entries)
        if entries:
            log.info(
                "stream %r consumer %r: recovered %d own pending entries",
                c.stream,
                c.name,
                len(entries),
            )
        elif len(ids) == len(pending):
            self.recover = False
        return entries

    async def autoclaim(self, limit: int, *, full_pass: bool = False) -> list[_Entry]:
        """Follow the XAUTOCLAIM cursor until the end of the PEL or *limit* entries."""
        c = self.consumer
        out: list[_Entry] = []
        held = c._held()
        loop = asyncio.get_running_loop()
        if full_pass:
            self.cursor = "0-0"
        while len(out) < limit:
            with c._guard:
                cursor, claimed, deleted = await _AUTOCLAIM(
                    c.redis,
                    keys=[c.keys.stream],
                    args=[c.group, c.name, c._claim_idle_ms, self.cursor, limit - len(out)],
                )
            self.cursor = as_text(cursor)
            c.counters.deleted += len(deleted)
            for raw_id, fields, count in claimed:
                entry_id = as_text(raw_id)
                if entry_id in held:
                    continue  # ours already and being worked on (its lease ran late)
                out.append(_Entry(entry_id, _pairs(fields), int(count)))
            if self.cursor == "0-0":
                self.next_claim = loop.time() + c.claim_interval
                break
        else:
            self.next_claim = loop.time()  # more PEL to scan as soon as there is capacity
        if out:
            c.counters.claimed += len(out)
            log.info("stream %r consumer %r: claimed %d idle entries", c.stream, c.name, len(out))
        return out

    # -- retries --------------------------------------------------------------

    @traced("stream.retry", attrs=_consumer_attrs)
    def schedule_retry(self, entry_id: str, delay: float) -> None:
        c = self.consumer
        due = asyncio.get_running_loop().time() + delay
        self.waiting[entry_id] = due
        heapq.heappush(self.retry_heap, (due, entry_id))
        c.counters.retried += 1
        c._runner.wake.set()

    def clear_retries(self) -> None:
        self.waiting.clear()
        self.retry_heap.clear()

    def forget(self) -> None:
        """The group was recreated: nothing refers to the old PEL any more."""
        self.clear_retries()
        self.cursor = "0-0"
        self.next_claim = 0.0
        self.recover = True

    # -- leases ---------------------------------------------------------------

    def start_renewer(self) -> _Renewer:
        done = asyncio.Event()
        task = asyncio.create_task(
            self._renew_until(done), name=f"stream-renew:{self.consumer.name}"
        )
        return task, done

    @staticmethod
    async def stop_renewer(task: asyncio.Task[None], done: asyncio.Event) -> None:
        # The flag, then cancel(): the renewer stops at its next check even if it is
        # between awaits when the cancel lands.
        done.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _renew_until(self, done: asyncio.Event) -> None:
        c = self.consumer
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(c.renew_interval):
                    await done.wait()
            if done.is_set():
                return
            try:
                await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c.counters.redis_errors += 1
                log.warning("stream %r: lease renewal failed: %s", c.stream, _why(exc))

    async def _renew(self) -> None:
        """Reset the idle time of every entry this consumer holds, so nobody claims them."""
        c = self.consumer
        ids = sorted(c._held())
        for chunk_start in range(0, len(ids), _IDS_PER_SCRIPT):
            chunk = ids[chunk_start : chunk_start + _IDS_PER_SCRIPT]
            with c._guard:
                renewed, deleted, foreign = await _CLAIM(
                    c.redis, keys=[c.keys.stream], args=[c.group, c.name, "renew", *chunk]
                )
            c.counters.deleted += len(deleted)
            c.counters.lost_claims += len(foreign)
            for raw_id in foreign:
                log.warning(
                    "stream %r: entry %s was claimed by another consumer while %r held it "
                    "(renew_interval too close to claim_idle, or the event loop stalled)",
                    c.stream,
                    as_text(raw_id),
                    c.name,
                )
            kept = {as_text(i) for i in renewed}
            for entry_id in chunk:
                if entry_id not in kept:  # deleted, taken, or acked meanwhile: no retry here
                    self.waiting.pop(entry_id, None)
            # Nor a start for a queued one: it is gone, or another consumer has it now.
            c._delivery.drop({as_text(i) for i in (*deleted, *foreign)})
