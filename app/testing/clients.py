"""One fixture per kind of client, and the helpers that build more of the same kind.

A pytest plugin of its own, loaded by ``app.testing.plugin``. Its fixtures:

- ``fake_server``: the test's fresh ``fakeredis.FakeServer``; set
  ``fake_server.connected = False`` to cut every client of it off (an outage).
- ``decode_responses``: ``False`` then ``True`` (ids ``bytes``, ``decoded``).
- ``fake_client``: fakeredis with Lua on ``fake_server``, once per
  ``decode_responses``; with ``redis_strict_slots = true`` in the ini file it
  refuses multi-slot commands and scripts with CROSSSLOT, as Redis Cluster would.
- ``fake_redis``: the same, bytes replies only (what the app uses).
- ``topology_redis``: a real client per topology (``standalone``, ``cluster``,
  ``sentinel``), built as the app builds it (``build_client``), flushed per test.
- ``topology_client``: a real client per topology x decoding, the five
  combinations of ``TOPOLOGY_CLIENTS``: bytes on every topology (what the app
  uses), decoded on standalone and Cluster (Sentinel hands out a plain
  primary, so its decoding is standalone's). Any test whose fixtures take both
  ``topology_redis`` and ``decode_responses`` runs on these five, with the two
  agreeing (``pytest_generate_tests`` below), unless it parametrizes
  them itself.

Helpers: ``fake_twin(client)`` is another client (another "process") on the
same fake server; ``twin(client)`` another client on the same real server,
Cluster or Sentinel service; ``ready(client)`` makes a client ready before a
test fires concurrent commands; ``topology_url(request)`` is the ``REDIS_URL``
of the test's topology, for subprocesses.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import ConnectionPool

from app.core.background import drain
from app.core.redis import (
    AnyRedis,
    SentinelManagedRedis,
    WaitingRedisCluster,
    build_client,
    is_cluster,
)

if TYPE_CHECKING:
    import fakeredis

    from app.testing.plugin import RedisServerInfo
    from app.testing.topologies import LocalCluster, LocalSentinel

__all__ = [
    "ON_TOPOLOGIES",
    "TOPOLOGIES",
    "TOPOLOGY_CLIENTS",
    "decode_responses",
    "fake_client",
    "fake_redis",
    "fake_server",
    "fake_twin",
    "ready",
    "topology_client",
    "topology_redis",
    "topology_url",
    "twin",
]


# -- fakeredis -----------------------------------------------------------------------


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """The test's own fake server: every fake client of the test talks to it."""
    import fakeredis

    return fakeredis.FakeServer()


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def decode_responses(request: pytest.FixtureRequest) -> bool:
    """Replies as bytes, then decoded to ``str`` (the test runs once per value)."""
    decoded: bool = request.param
    return decoded


def _new_fake(config: pytest.Config, server: fakeredis.FakeServer, decoded: bool) -> Any:
    import fakeredis

    from app.testing.slots import SlotCheckingRedis

    strict = config.getini("redis_strict_slots")
    make = SlotCheckingRedis if strict else fakeredis.FakeAsyncRedis
    return make(server=server, decode_responses=decoded)


@asynccontextmanager
async def _closed_after(client: Any) -> AsyncIterator[Any]:
    """*client* for the test; then the test's background clean-ups reach Redis, then it closes."""
    try:
        yield client
    finally:
        await drain()
        await client.aclose()


@pytest_asyncio.fixture
async def fake_client(
    request: pytest.FixtureRequest, fake_server: fakeredis.FakeServer, decode_responses: bool
) -> AsyncIterator[Any]:
    """fakeredis with Lua on the test's fake server, with bytes then decoded replies.

    With ``redis_strict_slots = true`` in the ini file it refuses multi-slot
    commands and scripts with CROSSSLOT, as Redis Cluster would.
    """
    async with _closed_after(_new_fake(request.config, fake_server, decode_responses)) as client:
        yield client


@pytest_asyncio.fixture
async def fake_redis(
    request: pytest.FixtureRequest, fake_server: fakeredis.FakeServer
) -> AsyncIterator[Any]:
    """fakeredis with Lua on the test's fake server, bytes replies (as the app's client).

    With ``redis_strict_slots = true`` in the ini file it refuses multi-slot
    commands and scripts with CROSSSLOT, as Redis Cluster would.
    """
    async with _closed_after(_new_fake(request.config, fake_server, False)) as client:
        yield client


def fake_twin(client: Any, **options: Any) -> Any:
    """Another client (another "process") on *client*'s fake server: same class, same
    decoding unless *options* say otherwise. Close it with ``aclose()``."""
    kwargs = client.connection_pool.connection_kwargs
    options.setdefault("decode_responses", kwargs.get("decode_responses", False))
    return type(client)(server=kwargs["server"], **options)


# -- real topologies -----------------------------------------------------------------

TOPOLOGIES = [
    "standalone",
    pytest.param("cluster", marks=pytest.mark.slow),
    pytest.param("sentinel", marks=pytest.mark.slow),
]

TOPOLOGY_CLIENTS = [
    pytest.param("standalone", False, id="standalone-bytes"),
    pytest.param("standalone", True, id="standalone-decoded"),
    pytest.param("cluster", False, id="cluster-bytes", marks=pytest.mark.slow),
    pytest.param("cluster", True, id="cluster-decoded", marks=pytest.mark.slow),
    pytest.param("sentinel", False, id="sentinel-bytes", marks=pytest.mark.slow),
]
"""(topology, decode_responses) pairs: every topology with bytes, decoding where it differs."""

ON_TOPOLOGIES = pytest.mark.parametrize(
    ("topology_redis", "decode_responses"), TOPOLOGY_CLIENTS, indirect=["topology_redis"]
)
"""``TOPOLOGY_CLIENTS`` as a mark. ``pytest_generate_tests`` puts it on every test whose
fixtures take ``topology_redis`` and ``decode_responses``: tests need not write it."""


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test whose fixtures take ``topology_redis`` and ``decode_responses`` (as
    ``topology_client`` does) on the five pairs of ``TOPOLOGY_CLIENTS``, both agreeing.

    Without this, pytest would run every topology with every decoding, and give
    ``topology_redis`` and ``topology_client`` different topologies in one test. A
    test that parametrizes either name itself is left alone. The mark goes on the
    test's definition before pytest reads its marks and its fixtures' params
    (``tryfirst``), exactly as if the test were decorated with ``ON_TOPOLOGIES``.
    """
    names = metafunc.fixturenames
    if "topology_redis" not in names or "decode_responses" not in names:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if {"topology_redis", "decode_responses"} & set(argnames):
            return
    metafunc.definition.add_marker(ON_TOPOLOGIES)


@pytest_asyncio.fixture(params=TOPOLOGIES)
async def topology_redis(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The test once per topology, with a client built the way the app builds it."""
    if request.param == "standalone":
        info: RedisServerInfo = request.getfixturevalue("redis_server")
        url, flush = info.url, None
        if not info.owned:
            pytest.fail("topology_redis needs servers the tests start (unset REDIS_URL)")
    elif request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        url, flush = cluster.url, cluster.flushall
    else:
        sentinel: LocalSentinel = request.getfixturevalue("redis_sentinel")
        url, flush = sentinel.url, sentinel.flushall
    client = build_client(url=url)
    await client.ping()  # discover the topology before the test's first (concurrent) commands
    if flush is None:
        await client.flushall()
    else:
        flush()
    try:
        async with _closed_after(client):
            yield client
    finally:
        if flush is not None:
            flush()


@pytest_asyncio.fixture
async def topology_client(topology_redis: Any, decode_responses: bool) -> AsyncIterator[Any]:
    """Standalone, Cluster or Sentinel with bytes replies, decoded on standalone and Cluster
    (``TOPOLOGY_CLIENTS``); flushed per test, ready for concurrent commands."""
    if not decode_responses:
        yield topology_redis  # already ready: topology_redis pinged it
        return
    async with _closed_after(twin(topology_redis, decode_responses=True)) as client:
        yield await ready(client)


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
    For a fakeredis client use ``fake_twin``.
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
