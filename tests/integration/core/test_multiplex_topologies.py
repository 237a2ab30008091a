"""The multiplexed client on Sentinel (it follows the primary across a failover) and on
Cluster (links per node, every reply to its caller, MOVED followed after a slot moves)."""

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
from app.core.multiplex_cluster import ClusterMultiplexing
from app.core.redis import build_client
from app.core.scripts import Script
from app.testing.topologies import SERVICE, LocalCluster, LocalSentinel
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


@pytest.fixture
async def cluster_client(
    redis_cluster: LocalCluster, settings_override: Callable[..., None]
) -> AsyncIterator[Any]:
    redis_cluster.flushall()
    settings_override(redis_url=redis_cluster.url, redis_autopipeline=True)
    client: Any = build_client()
    assert isinstance(client, ClusterMultiplexing)
    try:
        yield client
    finally:
        await client.aclose()
        redis_cluster.flushall()


async def test_cluster_every_reply_reaches_its_caller_over_per_node_links(
    cluster_client: Any,
) -> None:
    await asyncio.gather(*(cluster_client.set(f"own:{i}", f"value-{i}") for i in range(2000)))
    values = await asyncio.gather(*(cluster_client.get(f"own:{i}") for i in range(2000)))
    assert values == [f"value-{i}".encode() for i in range(2000)]
    muxes = cluster_client.multiplexers
    assert len(muxes) == 3  # one multiplexed path per primary
    assert all(m.max_in_flight_seen > 1 for m in muxes.values())
    script = Script("return redis.call('INCR', KEYS[1])", name="incr")
    keys = [f"n:{i}" for i in range(30)]
    assert await asyncio.gather(*(script(cluster_client, [k]) for k in keys)) == [1] * 30
    await cluster_client.script_flush()  # every primary forgets it: NOSCRIPT per node, reloaded
    assert await asyncio.gather(*(script(cluster_client, [k]) for k in keys)) == [2] * 30


def _node_id(port: int) -> str:
    with SyncRedis(port=port, socket_timeout=2) as r:
        return str(r.execute_command("CLUSTER", "MYID").decode())


def _move_slot(slot: int, to_port: int, ports: list[int]) -> None:
    target = _node_id(to_port)
    for port in [to_port, *(p for p in ports if p != to_port)]:
        with SyncRedis(port=port, socket_timeout=2) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)


async def test_cluster_moved_is_followed_after_a_slot_moves(
    redis_cluster: LocalCluster, cluster_client: Any
) -> None:
    key = "moved:{slot-test}"
    assert await cluster_client.set(key, "before") is True  # the client learns the owner
    slot = int(await cluster_client.cluster_keyslot(key))
    owner = cluster_client.get_node_from_key(key).port
    other = next(p for p in redis_cluster.primary_ports() if p != owner)
    assert await cluster_client.delete(key) == 1  # an empty slot may change owner at once
    _move_slot(slot, other, redis_cluster.primary_ports())
    try:
        # the first attempt goes over the old owner's link and is answered MOVED
        assert await cluster_client.set(key, "after") is True
        assert cluster_client.get_node_from_key(key).port == other
        values = await asyncio.gather(*(cluster_client.get(key) for _ in range(100)))
        assert values == [b"after"] * 100
        with SyncRedis(port=other, socket_timeout=2) as r:
            assert r.get(key) == b"after"  # stored on the new owner
    finally:
        with SyncRedis(port=other, socket_timeout=2) as r:
            r.delete(key)
        _move_slot(slot, owner, redis_cluster.primary_ports())


async def test_cluster_pipelines_survive_a_kill_that_only_the_links_noticed(
    redis_cluster: LocalCluster, settings_override: Callable[..., None]
) -> None:
    """CLIENT KILL between commands: the links see their sockets close, and the node's idle
    pooled connections (dead too, and only used by pipelines) are reconnected on checkout
    rather than handed to a pipeline one dead connection per retry."""
    redis_cluster.flushall()
    settings_override(redis_url=redis_cluster.url, redis_autopipeline=True, redis_retry_attempts=0)
    client: Any = build_client()
    try:
        keys = [f"k:{i}" for i in range(30)]
        await asyncio.gather(*(client.set(k, k) for k in keys))

        async def read_back() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.get(k)
                return list(await pipe.execute())

        await asyncio.gather(*(read_back() for _ in range(4)))  # idle pooled connections exist
        connects = sum(mux.connects for mux in client.multiplexers.values())
        for port in redis_cluster.ports:
            with SyncRedis(port=port, socket_timeout=2) as node:
                node.client_kill_filter(_type="normal", skipme=True)
        await eventually(
            lambda: all(not m.links for m in client.multiplexers.values()), "links closed"
        )
        # No retry allowed: each pipeline must find live connections at once.
        for _ in range(3):
            assert await read_back() == [k.encode() for k in keys]
        assert await client.get("k:1") == b"k:1"  # over a new link
        assert sum(mux.connects for mux in client.multiplexers.values()) > connects
    finally:
        await client.aclose()
        redis_cluster.flushall()
