"""Building clients: waiting pools, the client classes, and helpers any client needs.

``build_client(settings, url=...)`` makes a new client for a ``REDIS_URL``
(see ``app.core.urls``) without connecting. Its pool *waits* up to
``REDIS_POOL_TIMEOUT`` for a free connection when a burst exceeds
``REDIS_POOL_SIZE`` (redis-py's default pool raises "Too many connections"
instead), and costs nothing extra while connections are free. With
``REDIS_AUTOPIPELINE`` the client is the multiplexed one (``app.core.multiplex``).

Helpers for any client, ours or a caller's: ``is_cluster``,
``client_decodes_responses``, ``scan_keys`` and ``unlink_matching`` (SCAN on
every primary, never ``KEYS``).

Importing this module also makes every redis.asyncio connection, ours or a
caller's, deliver each cancellation to the awaiting caller on Python 3.11 (see
``deliver_cancellations``).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import sys
import types
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeAlias, TypeVar

import redis.asyncio.connection
from redis import exceptions as redis_exc
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff

from app.core.config import Settings, get_settings
from app.core.keys import bound_pattern
from app.core.multiplex import MultiplexedRedis
from app.core.multiplex_cluster import ClusterMultiplexing
from app.core.urls import parse_redis_url

__all__ = [
    "AnyRedis",
    "SentinelManagedRedis",
    "WaitingConnectionPool",
    "WaitingRedisCluster",
    "WaitingSentinelConnectionPool",
    "build_client",
    "client_decodes_responses",
    "is_cluster",
    "scan_keys",
    "unlink_matching",
]

log = logging.getLogger("app.redis")

_T = TypeVar("_T")


async def _wait_for(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    """``asyncio.wait_for`` as Python 3.12 defines it: ``asyncio.timeout`` around the await.

    Python 3.11's own returns the inner result when the caller's cancellation
    arrives as the inner step finishes (CPython gh-86296), so the cancelled
    task runs on. Here the inner step runs in the caller's task: a cancellation
    is always raised in the caller, and a timeout still raises ``TimeoutError``.
    """
    if timeout is None:
        return await awaitable
    async with asyncio.timeout(timeout):
        return await awaitable


class _AsyncioDeliveringCancellations(types.ModuleType):
    """The ``asyncio`` module as one library module sees it: ``wait_for`` replaced."""

    wait_for = staticmethod(_wait_for)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def deliver_cancellations(module: types.ModuleType) -> None:
    """Make *module*'s ``asyncio.wait_for`` calls deliver every cancellation (Python < 3.12).

    redis.asyncio wraps every command it writes in ``asyncio.wait_for`` (when
    a ``socket_timeout`` is set, as the toolkit's clients always have it). On
    Python 3.11 a cancellation that lands as the write completes was lost: the
    command ran on in the cancelled task, which then returned normally. That
    made every caller that cancels a Redis call (a lock release, a stopped
    stream consumer, a pub/sub reader, ``asyncio.timeout`` around a command)
    need a loop that cancels again. Only the name ``asyncio`` inside *module*
    changes; nothing else in the process does. A no-op on Python 3.12 and later,
    whose ``wait_for`` already behaves so.
    """
    if sys.version_info < (3, 12) and not isinstance(
        getattr(module, "asyncio", None), _AsyncioDeliveringCancellations
    ):
        module.asyncio = _AsyncioDeliveringCancellations("asyncio")  # type: ignore[attr-defined]


deliver_cancellations(redis.asyncio.connection)


def deliver_fakeredis_cancellations() -> None:
    """``deliver_cancellations`` for fakeredis, whose async connection waits for a reply in
    ``asyncio.wait_for`` too; called wherever the toolkit makes fakeredis clients (the
    ``memory://`` store, the test plugin), so fakeredis is imported only when used."""
    deliver_cancellations(importlib.import_module("fakeredis._clients._async"))


AnyRedis: TypeAlias = "Redis | RedisCluster"
"""Any client the toolkit accepts: standalone, Sentinel-managed or Cluster."""


class _WaitForConnection:
    """Pool mixin: wait (bounded) for a free connection instead of raising.

    The fast path is the parent pool's own; only when every connection is in
    use does a caller park on a FIFO of futures, woken by ``release``.
    """

    max_connections: int

    def __init__(self, *args: Any, pool_timeout: float | None = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool_timeout = pool_timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        parent: Any = super()
        if not parent.can_get_connection():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.pool_timeout):
                    while True:
                        await waiter
                        if parent.can_get_connection():
                            break
                        waiter = asyncio.get_running_loop().create_future()
                        self._waiters.appendleft(waiter)
            except TimeoutError as exc:
                raise redis_exc.ConnectionError(
                    f"no free Redis connection within {self.pool_timeout}s "
                    f"(pool of {self.max_connections}); raise REDIS_POOL_SIZE or REDIS_POOL_TIMEOUT"
                ) from exc
            finally:
                if not waiter.done():
                    waiter.cancel()
                with _suppress_value_error():
                    self._waiters.remove(waiter)
        return await parent.get_connection()

    async def release(self, connection: Any) -> None:
        parent: Any = super()
        await parent.release(connection)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break


class _suppress_value_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        return exc_type is ValueError


class WaitingConnectionPool(_WaitForConnection, ConnectionPool):
    """``ConnectionPool`` that waits for a free connection (see module docstring)."""


class WaitingSentinelConnectionPool(_WaitForConnection, SentinelConnectionPool):
    """``SentinelConnectionPool`` that waits for a free connection."""


class WaitingRedisCluster(RedisCluster):
    """``RedisCluster`` whose commands wait (bounded) for a slot instead of failing.

    redis-py's cluster nodes raise ``MaxConnectionsError`` once a node has
    ``max_connections`` connections in use. Bounding the commands in flight on
    this client to the same number keeps every node under it, so a burst waits
    up to ``pool_timeout`` for a slot, like the standalone pool does. A command
    that finds no node of the cluster reachable raises ``ConnectionError``.
    """

    def __init__(self, *args: Any, pool_timeout: float | None = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool_timeout = pool_timeout
        self._in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        slots = self._in_flight
        if slots.locked():
            try:
                async with asyncio.timeout(self.pool_timeout):
                    await slots.acquire()
            except TimeoutError as exc:
                raise redis_exc.ConnectionError(
                    f"no free Redis connection within {self.pool_timeout}s; "
                    "raise REDIS_POOL_SIZE or REDIS_POOL_TIMEOUT"
                ) from exc
        else:
            await slots.acquire()
        try:
            return await super().execute_command(*args, **kwargs)
        except redis_exc.RedisClusterUnreachableError as exc:
            # redis-py raises this (not a RedisError) when a topology refresh reached no
            # node; callers handle an unreachable Redis as a ConnectionError.
            raise redis_exc.ConnectionError(str(exc)) from exc
        finally:
            slots.release()


class SentinelManagedRedis(Redis):
    """A Sentinel-managed primary client that also closes its sentinel connections."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for sentinel_client in self.sentinel_manager.sentinels:
                await sentinel_client.aclose()


class _SentinelMultiplexedRedis(MultiplexedRedis, SentinelManagedRedis):  # type: ignore[misc]
    """The Sentinel-managed primary client, auto-pipelined (``REDIS_AUTOPIPELINE``)."""


class _MultiplexedRedisCluster(ClusterMultiplexing, WaitingRedisCluster):  # type: ignore[misc]
    """The Cluster client, auto-pipelined per node (``REDIS_AUTOPIPELINE``)."""


# -- building clients ---------------------------------------------------------

_memory_server: Any = None


def _fake_server() -> Any:
    global _memory_server
    if _memory_server is None:
        import fakeredis

        deliver_fakeredis_cancellations()
        _memory_server = fakeredis.FakeServer()
    return _memory_server


def _retry(settings: Settings) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(
            cap=settings.redis_retry_backoff_cap, base=settings.redis_retry_backoff_base
        ),
        settings.redis_retry_attempts,
    )


def build_client(settings: Settings | None = None, *, url: str | None = None) -> AnyRedis:
    """A new client for *url* (default: the settings' URL). Does not connect."""
    s = settings or get_settings()
    url = url or s.effective_redis_url
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": s.redis_socket_timeout,
        "socket_connect_timeout": s.redis_connect_timeout,
        "retry": _retry(s),
        "decode_responses": False,
    }
    # The auto-pipelined path of every topology (standalone, cluster, sentinel) alike.
    multiplexing: dict[str, Any] = {
        "links": s.redis_autopipeline_links,
        "max_in_flight": s.redis_autopipeline_max_in_flight,
        "slot_timeout": s.redis_pool_timeout,
    }
    if target.kind == "memory":
        import fakeredis

        log.warning("using the embedded in-process Redis (memory://): data is lost on exit")
        client: Any = fakeredis.FakeAsyncRedis(server=_fake_server(), decode_responses=False)
        return client  # type: ignore[no-any-return]
    if target.kind == "standalone":
        pool = WaitingConnectionPool.from_url(
            url,
            max_connections=s.redis_pool_size,
            pool_timeout=s.redis_pool_timeout,
            health_check_interval=s.redis_health_check_interval,
            **common,
        )
        if not s.redis_autopipeline:
            return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
        muxed: MultiplexedRedis = MultiplexedRedis.from_pool(pool)  # type: ignore[assignment]
        muxed.enable_multiplexing(**multiplexing)
        return muxed
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster_class = _MultiplexedRedisCluster if s.redis_autopipeline else WaitingRedisCluster
        cluster = cluster_class(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
            max_connections=s.redis_pool_size,
            pool_timeout=s.redis_pool_timeout,
            ssl=target.tls,
            **auth,
            **common,
        )
        if isinstance(cluster, _MultiplexedRedisCluster):
            cluster.enable_multiplexing(**multiplexing)
        return cluster
    sentinel = Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": s.redis_socket_timeout,
            "socket_connect_timeout": s.redis_connect_timeout,
            "password": target.options.get("sentinel_password"),
        },
        ssl=target.tls,
        **auth,
        **common,
    )
    master: SentinelManagedRedis = sentinel.master_for(
        target.service or "mymaster",
        redis_class=_SentinelMultiplexedRedis if s.redis_autopipeline else SentinelManagedRedis,
        connection_pool_class=WaitingSentinelConnectionPool,
        db=target.db,
        max_connections=s.redis_pool_size,
        pool_timeout=s.redis_pool_timeout,
    )
    master.sentinel_manager = sentinel
    if isinstance(master, _SentinelMultiplexedRedis):
        master.enable_multiplexing(**multiplexing)
    return master


def is_cluster(client: Any) -> bool:
    """True for a ``RedisCluster`` client."""
    return isinstance(client, RedisCluster)


def client_decodes_responses(client: Any) -> bool:
    """True when *client* was built with ``decode_responses=True`` (replies are ``str``)."""
    try:
        return bool(client.get_encoder().decode_responses)
    except AttributeError:
        return False


async def scan_keys(client: Any, match: str, *, count: int = 1000) -> AsyncIterator[bytes | str]:
    """Every key matching *match*, on every primary of a Cluster (never ``KEYS``).

    A key may be yielded twice if the keyspace changes during the walk (SCAN's
    guarantee); callers that delete are idempotent anyway. *match* is a Redis
    glob: runs of ``*`` collapse and more than ``MAX_PATTERN_WILDCARDS``
    wildcards (``*``, ``?``, ``[``) raise ``PatternTooComplex`` before Redis is
    called (its matcher backtracks: CVE-2022-36021, and the embedded store).
    """
    match = bound_pattern(match, wildcards="*?[", what="SCAN pattern")
    if is_cluster(client):
        # redis-py follows one cursor per node; PRIMARIES makes the walk explicit
        async for key in client.scan_iter(
            match=match, count=count, target_nodes=RedisCluster.PRIMARIES
        ):
            yield key
        return
    async for key in client.scan_iter(match=match, count=count):
        yield key


async def unlink_matching(client: Any, match: str, *, batch: int = 500) -> int:
    """UNLINK every key matching *match* (all primaries); returns how many were removed."""
    removed = 0
    pending: list[bytes | str] = []
    async for key in scan_keys(client, match):
        pending.append(key)
        if len(pending) >= batch:
            removed += await _unlink_batch(client, pending)
            pending = []
    if pending:
        removed += await _unlink_batch(client, pending)
    return removed


async def _unlink_batch(client: Any, keys: list[bytes | str]) -> int:
    if is_cluster(client):  # keys of a batch may live in different slots
        return sum([int(await client.unlink(k)) for k in keys])
    return int(await client.unlink(*keys))
