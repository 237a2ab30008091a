"""Worker processes for the cache's multi-process tests.

Run as ``python -m tests.integration.services._cache_worker <mode> <redis-url> [args]``
from the repository root. Every mode prints JSON lines on stdout.

* ``stampede <url> <calls> <instances> <run-id>``: waits at a barrier, then makes
  *calls* concurrent ``get_or_set("hot", ...)`` calls for one key, spread over
  *instances* ``CacheService`` objects plus a ``@cached(key="hot")`` function;
  the factory counts its runs with ``INCR``. Prints the results and stats.
* ``reader <url>``: keeps key ``k`` in a local tier and reports when an
  invalidation evicts it (``time.monotonic()``, shared by all processes on Linux)
  and what it serves right after.
* ``hold <url>``: takes the lease of key ``held`` (0.5 s, kept alive by the
  lease keeper) with a factory that never finishes, prints ``holding`` and waits
  to be killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from redis.asyncio import Redis

from app.core import redis as core_redis
from app.services.cache import MISSING, CacheService, LocalCache, cached
from app.testing.waiting import pop_signal


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def stampede(url: str, calls: int, instances: int, run_id: str) -> None:
    client = Redis.from_url(url, max_connections=500)
    core_redis.redis_client = client
    services = [CacheService(client) for _ in range(instances)]

    async def origin() -> dict[str, Any]:
        run = int(await client.incr(f"test:{run_id}:factory_runs"))
        await asyncio.sleep(0.3)
        return {"pid": os.getpid(), "run": run}

    @cached(ttl=60, key="hot", wait_timeout=20)
    async def hot() -> dict[str, Any]:
        return await origin()

    await client.incr(f"test:{run_id}:ready")
    await pop_signal(client, f"test:{run_id}:go", "the go signal", timeout=60)
    tasks = []
    for i in range(calls):
        if i % (instances + 1) == instances:
            tasks.append(hot())
        else:
            service = services[i % (instances + 1)]
            tasks.append(service.get_or_set("hot", origin, ttl=60, wait_timeout=20))
    results = await asyncio.gather(*tasks)
    all_services = [*services, hot.cache]
    totals: dict[str, int] = {}
    for service in all_services:
        for name, value in service.stats().items():
            if isinstance(value, int):
                totals[name] = totals.get(name, 0) + value
    emit(pid=os.getpid(), results=results, stats=totals)
    await client.aclose()


async def reader(url: str) -> None:
    client = Redis.from_url(url)
    cache = CacheService(client, local=LocalCache(ttl=60))
    if not await cache.start(timeout=10):
        emit(error="not subscribed")
        return
    local = cache.local
    assert local is not None
    evicted = asyncio.Event()
    evicted_at = 0.0

    def on_invalidate() -> None:
        nonlocal evicted_at
        evicted_at = time.monotonic()
        evicted.set()

    local.on_invalidate = on_invalidate
    emit(ready=True)
    for _ in range(1000):
        # Prime: read until the current value is answered by the local tier itself.
        while True:
            before = cache.stats()["local_hits"]
            value = await cache.get("k", MISSING)
            if value is not MISSING and cache.stats()["local_hits"] > before:
                evicted.clear()
                await asyncio.sleep(0.02)
                if not evicted.is_set():  # no late message for an earlier write
                    break
            await asyncio.sleep(0.005)
        emit(primed=value, local_hits=cache.stats()["local_hits"])
        try:
            await asyncio.wait_for(evicted.wait(), 20)
        except TimeoutError:
            emit(error="no invalidation arrived")
            return
        after = await cache.get("k", MISSING)
        emit(evicted_at=evicted_at, after=None if after is MISSING else after)
        if after == "stop":
            break
    await cache.aclose()
    await client.aclose()


async def hold(url: str) -> None:
    client = Redis.from_url(url)
    cache = CacheService(client)

    async def never() -> str:
        emit(holding=True)
        await asyncio.sleep(3600)
        return "never"

    await cache.get_or_set("held", never, ttl=60, lease=0.5)


def main() -> None:
    mode, url, *rest = sys.argv[1:]
    if mode == "stampede":
        asyncio.run(stampede(url, int(rest[0]), int(rest[1]), rest[2]))
    elif mode == "reader":
        asyncio.run(reader(url))
    elif mode == "hold":
        asyncio.run(hold(url))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
