"""Catch-up for history-backed channels: where a subscriber starts, and what it missed.

A channel with history is backed by a capped stream that the publish script appends to;
a subscriber resumes after the last id it saw (``last_ids`` at subscribe time, or the
last one yielded after a reconnect) and is replayed what came after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core.guard import as_text
from app.services.pubsub._types import Message, Reconnected
from app.services.pubsub._wire import _ZERO_ID, _parse_id, _untrace, _valid_id

if TYPE_CHECKING:
    from app.services.pubsub._broadcaster import Broadcaster
    from app.services.pubsub._subscription import Subscription


class _History:
    """History reads of one broadcaster (two pipelined round trips at most per call).

    Through the broadcaster's history guard: ``RedisUnavailable`` when Redis cannot be
    reached (or the breaker is open), ``RedisCommandError`` when it refuses.
    """

    def __init__(self, owner: Broadcaster) -> None:
        self.owner = owner

    async def prime(self, sub: Subscription[Any], last_ids: dict[str, str]) -> None:
        """Where *sub* starts on each history channel; replays from *last_ids* if given."""
        owner = self.owner
        channels = [c for c in sub.channels if owner.history_length(c) > 0]
        if not channels:
            return
        resume = {c: last_ids[c] for c in channels if _valid_id(last_ids.get(c))}
        fresh = [c for c in channels if c not in resume]
        with owner._history_guard:
            pipe = owner.client.pipeline(transaction=False)
            for channel in fresh:
                pipe.xrevrange(owner.history_key(channel), count=1)
            baselines = await pipe.execute() if fresh else []
        # Live messages may already be queued: they are delivered even if older than
        # the baseline, which only says where a replay starts if none was seen yet.
        for channel, entries in zip(fresh, baselines, strict=True):
            sub._high[channel] = None
            sub._since[channel] = _parse_id(entries[0][0]) if entries else _ZERO_ID
        if not resume:
            return
        for channel, id_ in resume.items():
            sub._high[channel] = sub._since[channel] = _parse_id(id_)
        replayed, complete = await self.replay(
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

    async def replay(
        self, sub: Subscription[Any], since: dict[str, tuple[int, int]]
    ) -> tuple[list[Message[Any]], bool]:
        """Messages after *since* per channel, and whether nothing can be missing."""
        owner = self.owner
        channels = list(since)
        with owner._history_guard:
            pipe = owner.client.pipeline(transaction=False)
            for channel in channels:
                key = owner.history_key(channel)
                ms, seq = since[channel]
                pipe.xrange(key, min=f"({ms}-{seq}", max="+")
                pipe.exists(key)
            replies = await pipe.execute()
        messages: list[Message[Any]] = []
        complete = True
        for index, channel in enumerate(channels):
            entries, exists = replies[2 * index], replies[2 * index + 1]
            # MAXLEN ~ N never trims below N entries, so fewer than N entries after our id
            # prove nothing after it was trimmed; an expired stream may have lost some.
            if len(entries) >= owner.history_length(channel) or (
                not exists and since[channel] != _ZERO_ID
            ):
                complete = False
            for entry_id, fields in entries:
                data = fields.get(b"d", fields.get("d"))
                if data is None:
                    continue
                trace, data = _untrace(data)
                message = owner._dispatcher.decode(
                    channel, data, sub._type, None, as_text(entry_id), trace
                )
                if message is not None:
                    messages.append(message)
        return messages, complete
