"""The parts of one ``CacheService`` that all its concerns share, and how a call fails.

``CacheCore`` holds the client, the breaker, the key layout, the entry format,
the local tier and the counters; the readers, writers, invalidation and
stampede control of a service each hold the same core.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Final

from redis.exceptions import RedisError

from app.core.errors import CodecError, RedisUnavailable
from app.core.redis import CircuitBreaker
from app.core.telemetry import outcome
from app.services.cache._entries import MISSING, Entry, EntryFormat
from app.services.cache._keys import KeyLayout
from app.services.cache._local import InvalidationListener, LocalCache, encode_message

__all__ = ["REDIS_ERRORS", "CacheCore", "CacheStats", "max_block"]

log = logging.getLogger("app.cache")

REDIS_ERRORS: Final = (RedisUnavailable, RedisError)
"""What a Redis call of the cache fails with (the breaker raises ``RedisUnavailable``)."""


@dataclass(slots=True)
class CacheStats:
    """Counters of one ``CacheService`` in this process (see ``CacheService.stats``)."""

    hits: int = 0
    local_hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    errors: int = 0
    fail_open: int = 0
    stampede_waits: int = 0
    wakeups: int = 0
    coalesced: int = 0
    factory_calls: int = 0
    refreshes: int = 0
    refresh_errors: int = 0
    early_refreshes: int = 0
    wait_timeouts: int = 0
    stale_if_error: int = 0
    sets: int = 0
    invalidations: int = 0
    decode_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def max_block(client: Any) -> float:
    """Longest single BLPOP wait that stays under the client's socket timeout."""
    timeout: Any = None
    with contextlib.suppress(AttributeError):
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if timeout is None:
        with contextlib.suppress(AttributeError):
            timeout = client.connection_kwargs.get("socket_timeout")
    if not timeout:
        return 1.0
    return max(0.05, min(1.0, float(timeout) / 2))


class CacheCore:
    """What every part of one service works with; built once by ``CacheService``."""

    __slots__ = (
        "_logged_transition",
        "breaker",
        "channel",
        "cluster",
        "entries",
        "fail_open",
        "layout",
        "listener",
        "local",
        "max_block",
        "namespace",
        "redis",
        "sender",
        "stats",
    )

    def __init__(
        self,
        redis: Any,
        *,
        namespace: str,
        breaker: CircuitBreaker,
        layout: KeyLayout,
        entries: EntryFormat,
        fail_open: bool,
        cluster: bool,
        channel: str,
        sender: str,
        local: LocalCache | None,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.breaker = breaker
        self.layout = layout
        self.entries = entries
        self.fail_open = fail_open
        self.cluster = cluster
        self.channel = channel
        self.sender = sender
        self.max_block = max_block(redis)
        self.stats = CacheStats()
        self._logged_transition = -1
        self.local = local
        self.listener: InvalidationListener | None = None
        if local is not None:
            self.listener = InvalidationListener(redis, channel, local, sender=sender)

    # -- failure handling ------------------------------------------------------------

    def redis_failed(self, exc: BaseException) -> None:
        """Count an error; log the first one after each breaker transition; raise if closed."""
        self.stats.errors += 1
        outcome("unavailable", exc)
        transition = self.breaker.transitions
        if transition != self._logged_transition:
            self._logged_transition = transition
            log.warning(
                "cache %r: Redis call failed (%s); %s until Redis answers again",
                self.namespace,
                exc,
                "failing open (misses, skipped writes)" if self.fail_open else "raising 503",
            )
        if not self.fail_open:
            if isinstance(exc, RedisUnavailable):
                raise exc
            raise RedisUnavailable(f"cache {self.namespace!r}: Redis call failed: {exc}") from exc

    # -- counters --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """``CacheService.stats``: the counters, hit ratio, local tier and breaker state."""
        out: dict[str, Any] = {"namespace": self.namespace, **self.stats.as_dict()}
        lookups = out["hits"] + out["local_hits"] + out["stale_hits"] + out["misses"]
        out["hit_ratio"] = (
            round((out["hits"] + out["local_hits"] + out["stale_hits"]) / lookups, 4)
            if lookups
            else None
        )
        out["local"] = self.local.stats() if self.local is not None else None
        if self.listener is not None and out["local"] is not None:
            out["local"]["subscriptions"] = self.listener.subscriptions
            out["local"]["messages"] = self.listener.messages
        out["breaker"] = self.breaker.state
        return out

    def reset_stats(self) -> None:
        # In place: every part of the service holds this same counters object.
        for field in fields(self.stats):
            setattr(self.stats, field.name, 0)

    # -- invalidation messages -------------------------------------------------------

    def message(self, op: str, items: Iterable[str]) -> str:
        """The invalidation message a script publishes ("" when broadcasting is off)."""
        return encode_message(self.sender, op, items) if self.channel else ""

    # -- local tier ------------------------------------------------------------------

    def ensure_listener(self) -> None:
        if self.listener is not None and not self.listener.running:
            self.listener.start()

    def local_hit(self, local: LocalCache, rkey: str, type_: Any) -> Any:
        """The decoded local-tier entry of *rkey*, or MISSING (an undecodable one is dropped)."""
        if not local.active:
            self.ensure_listener()
        found = local.get(rkey)
        if found is not None:
            try:
                value = self.entries.decode(found.payload, type_)
            except CodecError:
                local.invalidate_keys((rkey,))
            else:
                self.stats.local_hits += 1
                return value
        return MISSING

    def local_put(self, rkey: str, entry: Entry, pttl: int, fresh_ms: float, epoch: int) -> None:
        local = self.local
        if local is None or fresh_ms <= 0:
            return
        local.put(
            rkey,
            entry.payload,
            ttl=None if math.isinf(fresh_ms) else fresh_ms / 1000,
            hard_ttl=pttl / 1000 if pttl > 0 else None,
            tags=entry.tags,
            epoch=epoch,
        )
