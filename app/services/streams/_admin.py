"""Looking at a stream and tidying its group: stats, the idle-consumer janitor, and
reading the dead-letter stream. ``StreamConsumer`` exposes these as methods."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from app.core.errors import CodecError, StreamError
from app.core.guard import CONNECTION_ERRORS, as_text, to_ms
from app.core.scripts import Script
from app.services.streams._common import _is_nogroup
from app.services.streams._models import PAYLOAD_FIELD, ConsumerCounters, DeadLetter, StreamStats

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer

_JANITOR = Script.from_package("app.services.streams", "lua/streams_janitor.lua")


async def _read_stats(c: StreamConsumer[Any]) -> StreamStats:
    key = c.keys.stream
    with c._guard:
        async with c.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(key)
            pipe.xinfo_groups(key)
            pipe.xpending(key, c.group)
            pipe.xpending_range(key, c.group, "-", "+", 1)
            pipe.xlen(c.keys.dead_letter)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            # A missing stream or group answers with an error (read as zeros below); a reply
            # lost to the connection means Redis is down: raised here, the guard maps it.
            if isinstance(reply, CONNECTION_ERRORS):
                raise reply
    length, groups, summary, oldest, dead = replies
    info: dict[str, Any] = {}
    if isinstance(groups, list):
        for g in groups:
            if as_text(g.get("name", b"")) == c.group:
                info = g
    lag = info.get("lag")
    last = info.get("last-delivered-id")
    first = oldest[0] if isinstance(oldest, list) and oldest else None
    return StreamStats(
        stream=c.stream,
        group=c.group,
        consumer=c.name,
        length=length if isinstance(length, int) else 0,
        lag=int(lag) if lag is not None else None,
        pending=int(summary["pending"]) if isinstance(summary, dict) else 0,
        oldest_pending_id=as_text(first["message_id"]) if first else None,
        oldest_pending_idle=first["time_since_delivered"] / 1000 if first else None,
        consumers=int(info.get("consumers", 0)),
        last_delivered_id=as_text(last) if last is not None else None,
        dead_letters=dead if isinstance(dead, int) else 0,
        in_flight=len(c._delivery.inflight),
        waiting_retry=len(c._claims.waiting),
        counters=ConsumerCounters(**asdict(c.counters)),
    )


async def _remove_idle_consumers(c: StreamConsumer[Any], seconds: float) -> list[str]:
    try:
        with c._guard:
            removed = await _JANITOR(
                c.redis, keys=[c.keys.stream], args=[c.group, to_ms(seconds), c.name]
            )
    except StreamError as exc:
        if _is_nogroup(exc):
            return []
        raise
    return [as_text(n) for n in removed]


async def _read_dead_letters(c: StreamConsumer[Any], count: int, start: str) -> list[DeadLetter]:
    with c._guard:
        rows = await c.redis.xrange(c.keys.dead_letter, min=start, count=count)
    return [_dead_letter(c, raw_id, raw_fields) for raw_id, raw_fields in rows or ()]


def _dead_letter(c: StreamConsumer[Any], raw_id: Any, raw_fields: Any) -> DeadLetter:
    meta: dict[str, str] = {}
    original: dict[str, Any] = {}
    for k, v in (raw_fields or {}).items():
        name = as_text(k)
        if name.startswith("dlq-"):
            meta[name] = as_text(v)
        else:
            original[name] = v
    payload: Any = original
    if PAYLOAD_FIELD in original:
        try:
            payload = c.codec.decode(original[PAYLOAD_FIELD])
        except CodecError:
            payload = original[PAYLOAD_FIELD]
    return DeadLetter(
        id=as_text(raw_id or b""),
        original_id=meta.get("dlq-id", ""),
        stream=meta.get("dlq-stream", c.stream),
        group=meta.get("dlq-group", ""),
        consumer=meta.get("dlq-consumer", ""),
        error=meta.get("dlq-error", ""),
        deliveries=int(meta.get("dlq-deliveries", "0") or 0),
        failed_at_ms=int(meta.get("dlq-at-ms", "0") or 0),
        payload=payload,
        fields=original,
    )
