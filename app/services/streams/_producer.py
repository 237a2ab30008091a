"""Writing: ``StreamProducer`` appends payloads; ``trim_stream`` bounds a stream safely."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError

from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.redis import AnyRedis, breaker_for, client_decodes_responses
from app.core.scripts import Script
from app.core.telemetry import carrier, traced
from app.services.streams._common import _positive, _text, _wrap_redis_error
from app.services.streams._keys import stream_keys
from app.services.streams._models import PAYLOAD_FIELD

__all__ = ["StreamProducer", "trim_stream"]

_TRIM = Script.from_package("app.services.streams", "lua/streams_trim.lua")


def _producer_attrs(producer: StreamProducer, *args: Any, **kwargs: Any) -> dict[str, str]:
    return {"messaging.system": "redis", "messaging.destination.name": producer.stream}


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
