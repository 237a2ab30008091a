"""Local subscribers: ``Subscription`` (a bounded queue read as an async iterator) and
``_Topic`` (one Redis channel or pattern and the subscribers on it)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from app.core.errors import RedisUnavailable, SubscriberOverflow
from app.services.pubsub._types import Message, OverflowPolicy, Reconnected
from app.services.pubsub._wire import _ZERO_ID, _Key, _parse_id

if TYPE_CHECKING:
    from app.services.pubsub._broadcaster import Broadcaster
    from app.services.pubsub._link import _Link

__all__ = ["Subscription"]

log = logging.getLogger("app.pubsub")

T = TypeVar("T")

_REPLAY_ATTEMPTS: Final = 3


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
                replayed, complete = await self._owner._history.replay(self, since)
                break
            except RedisUnavailable as exc:
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
        self._owner._counters.dropped += 1

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
