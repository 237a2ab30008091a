"""Redis Cluster failover: a primary dies, its replica takes its slots, the services go on.

The primary owning a session's slot is SIGKILLed under a running workload
(session reads, rate-limit checks, a sharded pub/sub subscriber on that shard).
The cluster promotes its replica; the same client, unchanged, reaches the new
primary: writes replicated before the crash are there, failures meanwhile were
``RedisUnavailable`` (never another exception), and the sharded subscriber is
told ``Reconnected`` and receives messages again through the new primary.
Afterwards the killed node is restarted (it rejoins as a replica).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from redis import Redis as SyncRedis

from app.core.errors import RedisUnavailable
from app.core.redis import build_client
from app.services.pubsub import Broadcaster, Message, Reconnected
from app.services.rate_limit import RateLimiter
from app.services.sessions import SessionStore
from app.testing.topologies import LocalCluster, wait_until
from app.testing.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _info(port: int, section: str) -> dict[str, Any]:
    with SyncRedis(port=port, socket_timeout=1) as r:
        return dict(r.info(section))


def _healthy(cluster: LocalCluster) -> bool:
    """Every node answers, sees cluster_state:ok, and every primary has an online replica."""
    for server in cluster.servers:
        with SyncRedis(port=server.port, socket_timeout=1) as r:
            if r.cluster("INFO").get("cluster_state") != "ok":
                return False
    primaries = _primaries(cluster)
    return len(primaries) == 3 and all(
        _info(port, "replication").get("slave0", {}).get("state") == "online" for port in primaries
    )


def _primaries(cluster: LocalCluster) -> list[int]:
    """Ports of the running nodes that are primaries."""
    return [
        s.port
        for s in cluster.servers
        if s.is_running() and _info(s.port, "replication").get("role") == "master"
    ]


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's Cluster, healthy; the killed node restarted as a replica afterwards."""
    for server in redis_cluster.servers:
        with SyncRedis(port=server.port, socket_timeout=2) as r:
            r.config_set("repl-diskless-sync-delay", 0)  # a (re)joining replica syncs at once
    wait_until("a healthy cluster", lambda: _healthy(redis_cluster))
    redis_cluster.flushall()
    yield redis_cluster
    for server in redis_cluster.servers:
        if not server.is_running():
            server.start()  # its nodes.conf is kept: it rejoins, as a replica of its successor
    wait_until("the killed node to rejoin as a synced replica", lambda: _healthy(redis_cluster))
    redis_cluster.flushall()


@pytest_asyncio.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[Any]:
    made: Any = build_client(url=cluster.url)
    await made.initialize()  # as the app's init_redis does before serving
    try:
        yield made
    finally:
        await made.aclose()


async def test_services_survive_the_failover_of_a_primary(
    cluster: LocalCluster, client: Any
) -> None:
    store = SessionStore(client)
    limiter = RateLimiter(client, max_requests=1000, window_seconds=3600)
    session = await store.create(data={"user": "alice"})
    family = session.id.split(".")[0]
    victim_node = client.get_node_from_key(store._keys.record(family, "x"))
    [victim] = [s for s in cluster.servers if s.port == victim_node.port]
    broadcaster = Broadcaster(
        client, ping_interval=0.2, ping_timeout=0.5, connect_timeout=0.5, backoff_cap=0.2
    )
    channel = next(  # a sharded channel on the victim's shard
        name
        for name in (f"room:{n}" for n in range(1000))
        if client.get_node_from_key(broadcaster.channel_name(name)).port == victim.port
    )
    await asyncio.to_thread(
        wait_until, "the session to reach the replica",
        lambda: _info(victim.port, "replication").get("slave0", {}).get("offset")
        == _info(victim.port, "replication")["master_repl_offset"],
    )  # fmt: skip

    errors: list[BaseException] = []
    answered: list[tuple[float, str]] = []
    stop = asyncio.Event()
    clock = asyncio.get_running_loop().time

    async def workload() -> None:
        while not stop.is_set():
            try:
                record = await store.get(session.id)
                decision = await limiter.hit("alice")
                answered.append((clock(), f"{record and record.subject} {decision.degraded}"))
            except RedisUnavailable:
                pass
            except Exception as exc:  # anything else would be a 500 in the app
                errors.append(exc)
            await asyncio.sleep(0.01)

    try:
        async with broadcaster.subscribe(channel) as sub:
            worker = asyncio.create_task(workload())
            try:
                await asyncio.sleep(0.2)
                victim.kill()
                killed_at = clock()
                await asyncio.to_thread(
                    wait_until, "the replica to take over the slots",
                    lambda: len(_primaries(cluster)) == 3,
                )  # fmt: skip

                async def recovered() -> bool:
                    after = [o for t, o in answered if t > killed_at]
                    return len(after) >= 3 and after[-3:] == ["alice False"] * 3

                await eventually(
                    recovered,
                    "session reads and rate-limit checks succeed again",
                    errors_mean_not_yet=True,
                )
            finally:
                stop.set()
                await worker
            assert not errors, errors

            event = await sub.get(15)
            assert isinstance(event, Reconnected) and event.may_have_missed
            got: list[Any] = []

            async def delivered() -> bool:
                await broadcaster.publish(channel, "after the failover")
                got.append(await sub.get(0.5))
                return isinstance(got[-1], Message)

            await eventually(
                delivered,
                "a message published after the failover is delivered",
                errors_mean_not_yet=True,
            )
    finally:
        await broadcaster.aclose(drain_timeout=0.5)
    new_owner = client.get_node_from_key(store._keys.record(family, "x"))
    assert new_owner.port != victim.port
    assert (await store.get(session.id)) is not None  # replicated before the crash
