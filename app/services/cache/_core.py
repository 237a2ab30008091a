"""The parts of one ``CacheService`` that all its concerns share, and how a call fails.

``CacheCore`` holds the client, the guard, the key layout, the entry format,
the local tier and the counters; the readers, writers, invalidation and
stampede control of a service each hold the same core.

Every Redis call of the cache runs inside ``core.guard`` and, when it fails,
goes to ``core.failed``: the cache fails open on any Redis error (a refused
command included: the guard is built with ``refused=RedisUnavailable``), so
the parts catch ``RedisUnavailable`` only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from app.core.errors import CodecError, RedisUnavailable
from app.core.guard import FailOpen, Guard, block_cap
from app.core.telemetry import outcome
from app.services.cache._entries import MISSING, Entry, EntryFormat
from app.services.cache._keys import KeyLayout
from app.services.cache._local import InvalidationListener, LocalCache, encode_message

__all__ = ["CacheCore", "CacheStats"]

log = logging.getLogger("app.cache")


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


class CacheCore:
    """What every part of one service works with; built once by ``CacheService``."""

    __slots__ = (
        "channel",
        "cluster",
        "entries",
        "fail_open",
        "guard",
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
        # Any Redis error fails open like an outage (a refused command included).
        self.guard = Guard(redis, f"cache {namespace!r}", refused=RedisUnavailable)
        self.fail_open = FailOpen(
            self.guard, log, enabled=fail_open, fallback="failing open (misses, skipped writes)"
        )
        self.layout = layout
        self.entries = entries
        self.cluster = cluster
        self.channel = channel
        self.sender = sender
        self.max_block = block_cap(redis)
        self.stats = CacheStats()
        self.local = local
        self.listener: InvalidationListener | None = None
        if local is not None:
            self.listener = InvalidationListener(redis, channel, local, sender=sender)

    # -- failure handling ------------------------------------------------------------

    def failed(self, exc: RedisUnavailable) -> None:
        """Count a failed Redis call, then ``FailOpen``: log once per change; raise if closed."""
        self.stats.errors += 1
        outcome("unavailable", exc)
        self.fail_open.failed(exc)

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
        out["breaker"] = self.guard.breaker.state
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
