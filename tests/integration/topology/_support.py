"""Helpers for running integration tests on standalone, Cluster and Sentinel alike.

``topology_redis`` (from the plugin) gives the client the app would build from
``REDIS_URL``; ``twin`` builds another client on the *same* topology (another
connection pool, optionally ``decode_responses=True``), e.g. for a second
worker or for the decoded-client variants. ``ON_TOPOLOGIES`` parametrizes a
test over topology x decoding without running every combination: bytes on
every topology (what the app uses) and decoded on standalone and Cluster
(Sentinel talks to a plain primary, so its decoding is standalone's).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import ConnectionPool

from app.core.redis import AnyRedis, SentinelManagedRedis, WaitingRedisCluster, is_cluster

__all__ = ["ON_TOPOLOGIES", "ready", "topology_url", "twin"]

ON_TOPOLOGIES = pytest.mark.parametrize(
    ("topology_redis", "decode_responses"),
    [
        pytest.param("standalone", False, id="standalone-bytes"),
        pytest.param("standalone", True, id="standalone-decoded"),
        pytest.param("cluster", False, id="cluster-bytes", marks=pytest.mark.slow),
        pytest.param("cluster", True, id="cluster-decoded", marks=pytest.mark.slow),
        pytest.param("sentinel", False, id="sentinel-bytes", marks=pytest.mark.slow),
    ],
    indirect=["topology_redis"],
)
"""Use with a module fixture ``client(topology_redis, decode_responses)`` built on ``twin``."""


async def ready(client: Any) -> Any:
    """*client*, initialized the way the app's ``init_redis`` (a PING) leaves it.

    A fresh ``RedisCluster`` loads its slot map on first use; redis-py 8.1 fails
    some of *concurrent* first commands while doing so (``ConnectionError`` or
    ``AttributeError: 'NoneType' object has no attribute 'writelines'``), so
    clients are made ready before a test fires concurrent requests, as the app's
    lifespan does before it serves.
    """
    await client.ping()
    return client


def topology_url(request: pytest.FixtureRequest) -> str:
    """The ``REDIS_URL`` of the topology a ``topology_redis`` test runs on (for subprocesses)."""
    kind = request.node.callspec.params["topology_redis"]
    if kind == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    if kind == "sentinel":
        return str(request.getfixturevalue("redis_sentinel").url)
    return str(request.getfixturevalue("redis_server").url)


def twin(client: Any, *, decode_responses: bool = False, **options: Any) -> AnyRedis:
    """A new client to the same standalone server, Cluster or Sentinel service.

    *options* are connection options (``socket_timeout=0.5``). The twin has its
    own connections; close it with ``aclose()`` (that leaves *client* and its
    sentinels alone). It is built like *client* (which ``build_client`` made):
    same pool size, pool wait, timeouts and retries, so a Cluster twin is a
    ``WaitingRedisCluster`` that waits for a connection under bursts instead of
    failing with redis-py's own pool errors (``MaxConnectionsError``).
    """
    options["decode_responses"] = decode_responses
    if is_cluster(client):
        return _cluster_twin(client, options)
    if isinstance(client, SentinelManagedRedis):
        assert client.sentinel_manager is not None
        service = client.connection_pool.service_name  # type: ignore[attr-defined]
        made: Redis = client.sentinel_manager.master_for(service, **options)
        return made
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, **options}
    return Redis.from_pool(ConnectionPool(connection_class=pool.connection_class, **kwargs))


_CLUSTER_OPTIONS = (
    "max_connections",
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
    "username",
    "password",
)


def _cluster_twin(client: Any, options: dict[str, Any]) -> AnyRedis:
    """A ``WaitingRedisCluster`` with *client*'s settings, overridden by *options*."""
    nodes = [ClusterNode(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()]
    made = client.nodes_manager.connection_kwargs
    settings: dict[str, Any] = {name: made[name] for name in _CLUSTER_OPTIONS if name in made}
    settings["retry"] = copy.deepcopy(client.retry)
    settings["pool_timeout"] = getattr(client, "pool_timeout", 5.0)
    settings.update(options)
    return WaitingRedisCluster(startup_nodes=nodes, **settings)
