"""Observable gauges: stream lag / pending / dead letters, pool use, breaker state.

Gauge callbacks run synchronously inside a metric collection, so they never talk to
Redis: pool and breaker gauges read process state; stream gauges read the snapshot the
last ``refresh()`` took (one pipelined ``stats()`` round trip per watched consumer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, ObservableGauge, Observation

from app.core import telemetry

__all__ = ["BREAKER_STATES", "Gauges"]

log = logging.getLogger("app.observability")

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
"""``toolkit.breaker.state`` values."""

_STREAM_GAUGES = {
    "toolkit.stream.lag": "Entries not yet delivered to the consumer group (at the last refresh).",
    "toolkit.stream.pending": "Entries delivered to the group and not yet acknowledged.",
    "toolkit.stream.dead_letters": "Entries in the stream's dead-letter stream.",
}
"""Per (stream, group) gauges, in the order of a snapshot's values (lag, pending, dead letters)."""


class Gauges:
    """The observable instruments of one meter, and the stream snapshots they report."""

    def __init__(self, meter: Meter) -> None:
        self._streams: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.instruments: list[ObservableGauge] = [
            *(
                meter.create_observable_gauge(
                    name, [partial(self._stream, index)], unit="{entry}", description=text
                )
                for index, (name, text) in enumerate(_STREAM_GAUGES.items())
            ),
            meter.create_observable_gauge(
                "db.client.connection.count",
                [self._pool_count],
                unit="{connection}",
                description="Connections of the global client's pool by state (used, idle).",
            ),
            meter.create_observable_gauge(
                "db.client.connection.pending_requests",
                [self._pool_waiting],
                unit="{request}",
                description="Callers waiting for a free connection of the global client's pool.",
            ),
            meter.create_observable_gauge(
                "toolkit.breaker.state",
                [self._breaker],
                description="Circuit breaker of the global client: 0 closed, 1 half-open, 2 open.",
            ),
        ]

    async def refresh(self, consumers: Iterable[Any] = (), timeout: float = 1.0) -> None:
        """Sample running stream consumers and *consumers* (a failed sample keeps the last).

        Only running consumers (``run()``) are found on their own: a consumer left over
        from a closed app or event loop must not be asked. Streams no consumer reports
        any more drop out of the gauges.
        """
        chosen = {id(c): c for c in telemetry.watched("stream.consumer") if c.running}
        chosen.update((id(c), c) for c in consumers)
        sampled = list(chosen.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(c.stats(), timeout) for c in sampled), return_exceptions=True
        )
        fresh: dict[tuple[str, str], tuple[int, int, int]] = {}
        for consumer, stats in zip(sampled, results, strict=True):
            key = (consumer.stream, consumer.group)
            if isinstance(stats, BaseException):
                log.debug("stream %r: stats for the gauges failed: %s", consumer.stream, stats)
                if key in self._streams:
                    fresh[key] = self._streams[key]
                continue
            fresh[key] = (stats.lag or 0, stats.pending, stats.dead_letters)
        self._streams = fresh

    def _stream(self, index: int, options: CallbackOptions) -> Iterable[Observation]:
        """Item *index* of every snapshot (the order of ``_STREAM_GAUGES``)."""
        for (stream, group), values in list(self._streams.items()):
            yield Observation(
                values[index],
                {"messaging.destination.name": stream, "messaging.consumer.group.name": group},
            )

    @staticmethod
    def _pool() -> Any:
        from app.core import redis as core_redis

        client = core_redis.redis_client
        return None if client is None else getattr(client, "connection_pool", None)

    def _pool_count(self, options: CallbackOptions) -> Iterable[Observation]:
        pool = self._pool()
        if pool is None:
            return []
        used = len(getattr(pool, "_in_use_connections", ()))
        idle = len(getattr(pool, "_available_connections", ()))
        name = {"db.client.connection.pool.name": "redis"}
        return [
            Observation(used, {**name, "db.client.connection.state": "used"}),
            Observation(idle, {**name, "db.client.connection.state": "idle"}),
        ]

    def _pool_waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        pool = self._pool()
        if pool is None:
            return []
        waiting = len(getattr(pool, "_waiters", ()))
        return [Observation(waiting, {"db.client.connection.pool.name": "redis"})]

    def _breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        from app.core import redis as core_redis

        client = core_redis.redis_client
        if client is None:
            return []
        state = core_redis.breaker_for(client).state
        return [Observation(BREAKER_STATES.get(state, 0), {"toolkit.breaker": "redis"})]
