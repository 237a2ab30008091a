"""Writing: ``StreamProducer`` appends payloads; ``trim_stream`` bounds a stream safely."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError
from app.core.guard import Guard, as_text
from app.core.redis import AnyRedis, client_decodes_responses
from app.core.scripts import Script
from app.core.telemetry import carrier, traced
from app.services.streams._common import _guard, _positive
from app.services.streams._keys import StreamKeys, stream_keys
from app.services.streams._models import PAYLOAD_FIELD

__all__ = ["StreamProducer", "trim_stream"]

_TRIM = Script.from_package("app.services.streams", "lua/streams_trim.lua")
_ADD_MANY = Script.from_package("app.services.streams", "lua/streams_add_many.lua")
ADD_MANY_CHUNK = 1000
"""Most entries ``add_many`` appends per script call (a bigger batch takes several calls)."""


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
        namespace: the key space (``<REDIS_KEY_PREFIX>:<namespace>:{stream}``, default
            ``stream``); a consumer reads it with the same ``namespace``.
    """

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        *,
        maxlen: int | None = None,
        approximate: bool = True,
        codec: Codec | None = None,
        namespace: str = "stream",
    ) -> None:
        self.redis = redis
        self.keys = stream_keys(stream, namespace=namespace)
        self._guard = _guard(redis, stream)
        decodes = client_decodes_responses(redis)
        self.codec = (codec or default_codec()).with_text_safe(decodes)
        self.maxlen = None if maxlen is None else _positive(maxlen, "maxlen")
        trim: tuple[Any, ...] = ()
        if self.maxlen is not None:
            trim = ("MAXLEN", "~", self.maxlen) if approximate else ("MAXLEN", self.maxlen)
        self._xadd_head: tuple[Any, ...] = ("XADD", self.keys.stream, *trim)
        self._add_many_head: tuple[Any, ...] = (
            "" if self.maxlen is None else self.maxlen,
            "1" if approximate else "0",
            PAYLOAD_FIELD,
        )

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
        last one; Redis's text is in its ``__cause__``), ``CodecError`` when *payload* cannot
        be encoded. Cancellation after the command was sent may still leave the entry appended.
        """
        data = self.codec.encode(payload)
        with self._guard:
            reply: bytes | str = await self.redis.execute_command(
                *self._xadd_head, id, PAYLOAD_FIELD, data, *carrier()
            )
        return as_text(reply)

    @traced("stream.produce", kind="producer", attrs=_producer_attrs)
    async def add_many(self, payloads: Iterable[Any]) -> list[str]:
        """Append several entries, in order, in one command; returns their ids in order.

        One script call per ``ADD_MANY_CHUNK`` (1,000) entries: each call appends its
        entries atomically (all or, when the key holds something else, none) with the same
        ``MAXLEN`` trim as ``add``. Every payload is encoded before anything is sent.
        Errors as for ``add``; a batch over 1,000 entries that fails midway has appended
        its earlier chunks.
        """
        encoded = [self.codec.encode(p) for p in payloads]
        if not encoded:
            return []
        trace = carrier()
        head = (*self._add_many_head, len(trace), *trace)
        ids: list[str] = []
        with self._guard:
            for start in range(0, len(encoded), ADD_MANY_CHUNK):
                chunk = encoded[start : start + ADD_MANY_CHUNK]
                replies = await _ADD_MANY(self.redis, keys=[self.keys.stream], args=[*head, *chunk])
                ids += [as_text(r) for r in replies]
        return ids

    async def length(self) -> int:
        """``XLEN``: entries in the stream (acknowledged ones included until trimmed).

        Raises ``RedisUnavailable`` when Redis cannot be reached (or the breaker is open),
        ``StreamError`` when the key holds something else than a stream.
        """
        with self._guard:
            length = await self.redis.xlen(self.keys.stream)
        return int(length)

    async def trim(
        self,
        *,
        maxlen: int | None = None,
        minid: str | None = None,
        keep_unacknowledged: bool = True,
        approximate: bool = False,
    ) -> int:
        """Trim the stream; see ``trim_stream``. Returns the number of entries removed."""
        return await _trim(
            self.redis,
            self._guard,
            self.keys,
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
    namespace: str = "stream",
) -> int:
    """Trim stream *stream* to *maxlen* entries or to ids >= *minid*, in one Lua script.

    With ``keep_unacknowledged`` (the default) nothing that a consumer group still needs is
    removed: the script computes the lowest id pending in any group or not yet delivered to
    any group, and never trims past it (``XTRIM MINID`` at that floor), so the stream may
    stay longer than *maxlen* while consumers lag. Without it this is a plain ``XTRIM``.
    Atomic. The script walks at most the entries it removes, so call it periodically rather
    than letting millions pile up. Returns the number of entries removed. Raises
    ``ConfigurationError`` for a bad *maxlen* / *minid* pair, ``RedisUnavailable`` when Redis
    cannot be reached (or the breaker is open), ``StreamError`` when Redis refuses.
    """
    return await _trim(
        redis,
        _guard(redis, stream),
        stream_keys(stream, namespace=namespace),
        maxlen=maxlen,
        minid=minid,
        keep_unacknowledged=keep_unacknowledged,
        approximate=approximate,
    )


async def _trim(
    redis: AnyRedis,
    guard: Guard,
    keys: StreamKeys,
    *,
    maxlen: int | None,
    minid: str | None,
    keep_unacknowledged: bool,
    approximate: bool,
) -> int:
    if (maxlen is None) == (minid is None):
        raise ConfigurationError("trim needs exactly one of maxlen or minid")
    if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 0):
        raise ConfigurationError(f"maxlen must be a non-negative integer, got {maxlen!r}")
    with guard:
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
    return int(removed)
