"""The same client code on standalone, Cluster and Sentinel; Sentinel failover."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.core.keys import KeySpace
from app.core.redis import build_client, health, is_cluster, scan_keys, unlink_matching
from app.core.scripts import Script
from app.testing.topologies import LocalCluster, LocalSentinel

pytestmark = pytest.mark.integration

INCR_BOTH = Script(
    "redis.call('INCR', KEYS[1]); return redis.call('INCR', KEYS[2])", name="incr_both"
)


async def test_tagged_multi_key_script_runs_on_every_topology(topology_redis: Any) -> None:
    ks = KeySpace("app", "test")
    keys = [ks.tagged("user:42"), ks.tagged("user:42", "fence")]
    assert await INCR_BOTH(topology_redis, keys) == 1
    await topology_redis.script_flush()
    assert await INCR_BOTH(topology_redis, keys) == 2  # NOSCRIPT recovered on the right node


async def test_scan_walks_every_primary(topology_redis: Any) -> None:
    ks = KeySpace("app", "scan")
    for i in range(300):  # untagged: spread over every slot on a cluster
        await topology_redis.set(ks.key("item", i), b"x")
    await topology_redis.set(KeySpace("app", "other").key("item"), b"x")
    seen = {k async for k in scan_keys(topology_redis, ks.pattern())}
    assert len(seen) == 300
    assert await unlink_matching(topology_redis, ks.pattern()) == 300
    assert not [k async for k in scan_keys(topology_redis, ks.pattern())]


async def test_health_names_the_topology(topology_redis: Any) -> None:
    report = await health(topology_redis)
    assert report["role"] == ("cluster" if is_cluster(topology_redis) else "master")


@pytest.mark.slow
async def test_cluster_client_from_url(redis_cluster: LocalCluster) -> None:
    client: Any = build_client(url=redis_cluster.url)
    try:
        assert is_cluster(client)
        await client.initialize()
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_sentinel_failover_keeps_a_running_client_working(
    redis_sentinel: LocalSentinel,
) -> None:
    client: Any = build_client(url=redis_sentinel.url)
    try:
        await client.set("before", b"1")
        await client.wait(1, 2000)  # replicated before we kill the primary
        old_port = redis_sentinel.master_address()[1]
        new = await asyncio.to_thread(redis_sentinel.kill_primary_and_wait_for_failover)
        assert new.port != old_port
        for _ in range(50):  # the client rediscovers the primary through the sentinels
            try:
                await client.set("after", b"2")
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert await client.get("before") == b"1"
        assert await client.get("after") == b"2"
    finally:
        await client.aclose()
        # bring the killed server back as a replica so later tests keep a replica
        for server in (redis_sentinel.primary, redis_sentinel.replica):
            if server is not None and server.port == old_port:
                await asyncio.to_thread(server.start)


@pytest.mark.slow
async def test_cluster_bursts_wait_for_a_connection_instead_of_failing(
    redis_cluster: LocalCluster, settings_override: Any
) -> None:
    settings_override(redis_pool_size=2, redis_pool_timeout=10)
    client: Any = build_client(url=redis_cluster.url)
    try:
        replies = await asyncio.gather(
            *(client.blpop([f"{{t}}:none:{i}"], timeout=0.02) for i in range(40))
        )
        assert (
            replies == [None] * 40
        )  # 40 blocking commands through 2 slots: all waited, none failed
    finally:
        await client.aclose()
