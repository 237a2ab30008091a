"""The multiplexed client on Sentinel: it follows the primary across a failover.

Cluster clients are not multiplexed yet (``build_client`` returns the plain
``RedisCluster``); see ``app/core/multiplex.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis import exceptions as redis_exc
from redis.exceptions import RedisError

from app.core.multiplex import MultiplexedRedis
from app.core.redis import build_client
from app.testing.topologies import SERVICE, LocalSentinel
from app.testing.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _healthy(sentinel: LocalSentinel) -> bool:
    """The named primary is a primary streaming to an online replica."""
    try:
        _, port = sentinel.master_address()
        with SyncRedis(port=port, socket_timeout=1) as primary:
            info = primary.info("replication")
        return bool(
            info.get("role") == "master" and info.get("slave0", {}).get("state") == "online"
        )
    except (RedisError, OSError):
        return False


@pytest.fixture
async def sentinel(redis_sentinel: LocalSentinel) -> AsyncIterator[LocalSentinel]:
    await eventually(lambda: _healthy(redis_sentinel), "a primary with a synced replica")
    redis_sentinel.flushall()
    yield redis_sentinel
    await eventually(lambda: _healthy(redis_sentinel), "the setup whole again for later tests")
    redis_sentinel.flushall()


async def test_sentinel_multiplexed_client_follows_the_primary_across_a_failover(
    sentinel: LocalSentinel, settings_override: Callable[..., None]
) -> None:
    settings_override(redis_url=sentinel.url, redis_autopipeline=True)
    client: Any = build_client()
    assert isinstance(client, MultiplexedRedis)
    mux = client.multiplexer
    assert mux is not None
    stop = asyncio.Event()
    wrong: list[tuple[int, Any]] = []
    surfaced: list[BaseException] = []
    count = {"ok": 0}

    async def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async with asyncio.timeout(10):  # bounds a hang; never reached when healthy
                    await client.set(f"own:{i}", f"{i}-{n}")
                    value = await client.get(f"own:{i}")
            except (redis_exc.ConnectionError, redis_exc.TimeoutError):
                await asyncio.sleep(0.01)  # failing over: do not spin
                continue
            except redis_exc.RedisError as exc:
                surfaced.append(exc)
                continue
            count["ok"] += 1
            # a write lost in the failover may show an older value of the SAME key
            if not isinstance(value, bytes) or not value.startswith(f"{i}-".encode()):
                wrong.append((i, value))

    try:
        workers = [asyncio.create_task(worker(i)) for i in range(200)]
        await eventually(lambda: count["ok"] > 1000, "workers are answered")
        old = sentinel.master_address()
        with SyncRedis(port=sentinel.sentinels[0].port, socket_timeout=2) as s:
            await asyncio.to_thread(s.execute_command, "SENTINEL", "FAILOVER", SERVICE)
        await eventually(lambda: sentinel.master_address() != old, "the sentinels name a new one")
        new_port = sentinel.master_address()[1]

        def on_new_primary() -> bool:
            ports = {link.transport.get_extra_info("peername")[1] for link in mux.links}
            return ports == {new_port}

        count["ok"] = 0
        await eventually(
            lambda: count["ok"] > 1000 and on_new_primary(), "workers answered by the new primary"
        )
        stop.set()
        await asyncio.gather(*workers)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await client.aclose()
    assert wrong == []
    assert surfaced == []  # no READONLY reaches a caller: the link moved to the new primary
