"""The process-wide Redis client, its lifecycle, health and circuit breaker.

``redis_client`` is THE client of the process (``redis.asyncio.Redis``, or
``RedisCluster``). Nothing connects at import time:

* ``init_redis()`` builds it from settings (unless one was already set, e.g. a
  fakeredis client put there by a test) and pings it, retrying with capped,
  jittered exponential backoff for ``REDIS_INIT_TIMEOUT`` seconds, then raises
  ``RedisUnavailable`` naming the URL with its password masked.
* ``get_redis()`` returns it, building it on first use (without pinging).
* ``close_redis()`` closes a client this module built; a client someone else
  assigned is theirs to close.
* ``lifespan`` / ``redis_lifespan(inner)`` run init and close around a FastAPI app.

Every dependency and middleware calls ``get_redis()`` per request, so assigning
``app.core.redis.redis_client = fakeredis.FakeAsyncRedis()`` redirects an app.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``,
``redis+cluster://[user:pass@]h1:p1,h2:p2[?opts]``,
``redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db][?opts]`` and
``memory://`` (in-process fakeredis with Lua, shared by every client of the
process).

The connection pool *waits* up to ``REDIS_POOL_TIMEOUT`` for a free connection
when a burst exceeds ``REDIS_POOL_SIZE`` (redis-py's default pool raises
"Too many connections" instead), and costs nothing extra while connections
are free.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit

from redis import exceptions as redis_exc
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff

from app.core.config import Settings, get_settings
from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.keys import bound_pattern
from app.core.multiplex import MultiplexedRedis
from app.core.multiplex_cluster import ClusterMultiplexing

__all__ = [
    "REFUSED_FOR_NOW",
    "AnyRedis",
    "BreakerState",
    "CircuitBreaker",
    "Lifespan",
    "RedisTarget",
    "breaker_for",
    "build_client",
    "client_decodes_responses",
    "close_redis",
    "describe_client",
    "get_redis",
    "health",
    "init_redis",
    "is_cluster",
    "lifespan",
    "mask_url",
    "parse_redis_url",
    "redis_client",
    "redis_lifespan",
    "scan_keys",
    "unlink_matching",
]

log = logging.getLogger("app.redis")

AnyRedis: TypeAlias = "Redis | RedisCluster"
"""Any client the toolkit accepts: standalone, Sentinel-managed or Cluster."""

redis_client: AnyRedis | None = None
"""The process-wide client. Tests may assign a fakeredis client here."""

_owned_client: AnyRedis | None = None  # the client this module built (and will close)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.ClusterDownError,
    redis_exc.RedisClusterUnreachableError,  # no Cluster node answered (not a RedisError)
    redis_exc.TryAgainError,
    redis_exc.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)
"""Errors that mean "Redis is not reachable right now" (the breaker counts these)."""
_INIT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, redis_exc.RedisError)
REFUSED_FOR_NOW: tuple[type[BaseException], ...] = (
    redis_exc.OutOfMemoryError,
    redis_exc.ReadOnlyError,
)
"""The server answered but refuses writes now (maxmemory + noeviction, a read-only
replica after a failover): callers get ``RedisUnavailable``; the breaker stays closed."""


# -- URLs ---------------------------------------------------------------------

TargetKind = Literal["standalone", "cluster", "sentinel", "memory"]


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``REDIS_URL``."""

    kind: TargetKind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)


_STANDALONE = ("redis", "rediss", "unix")


def _split_nodes(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    user = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, pw = creds.partition(":")
        user, password = unquote(user) or None, (unquote(pw) if pw else None)
    nodes: list[tuple[str, int]] = []
    for chunk in netloc.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        if chunk.startswith("["):  # [ipv6]:port
            host, _, rest = chunk[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = chunk.rpartition(":") if ":" in chunk else (chunk, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError as exc:
            raise ConfigurationError(f"bad port in Redis node {chunk!r}") from exc
        if not host:
            raise ConfigurationError(f"missing host in Redis node {chunk!r}")
        nodes.append((host, port))
    if not nodes:
        raise ConfigurationError("the Redis URL names no host")
    return user, password, nodes


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any supported URL; raises ``ConfigurationError`` naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query))
    if scheme == "memory":
        return RedisTarget(kind="memory", url=url, options=options)
    if scheme in _STANDALONE:
        if scheme != "unix" and not parts.hostname:
            raise ConfigurationError(f"{mask_url(url)}: the Redis URL names no host")
        if scheme == "unix" and not parts.path:
            raise ConfigurationError(f"{mask_url(url)}: a unix:// URL needs a socket path")
        db_text = parts.path.lstrip("/") if scheme != "unix" else options.get("db", "0")
        try:
            db = int(db_text or 0)
        except ValueError as exc:
            raise ConfigurationError(f"{mask_url(url)}: database must be a number") from exc
        nodes: tuple[tuple[str, int], ...] = (
            () if scheme == "unix" else ((parts.hostname or "", parts.port or 6379),)
        )
        return RedisTarget(
            kind="standalone",
            url=url,
            nodes=nodes,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=scheme == "rediss",
            options=options,
        )
    if scheme in ("redis+cluster", "rediss+cluster"):
        user, password, node_list = _split_nodes(parts.netloc, 6379)
        return RedisTarget(
            kind="cluster",
            url=url,
            nodes=tuple(node_list),
            username=user,
            password=password,
            tls=scheme.startswith("rediss"),
            options=options,
        )
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        user, password, node_list = _split_nodes(parts.netloc, 26379)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(
                f"{mask_url(url)}: a sentinel URL needs a service name: "
                "redis+sentinel://h1:p1,h2:p2/<service>/<db>"
            )
        try:
            db = int(path[1]) if len(path) > 1 else 0
        except ValueError as exc:
            raise ConfigurationError(f"{mask_url(url)}: database must be a number") from exc
        return RedisTarget(
            kind="sentinel",
            url=url,
            nodes=tuple(node_list),
            service=unquote(path[0]),
            db=db,
            username=user,
            password=password,
            tls=scheme.startswith("rediss"),
            options=options,
        )
    raise ConfigurationError(
        f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
        "redis+cluster://, redis+sentinel:// or memory://"
    )


_SECRET_QUERY_NAMES = ("password", "passwd", "secret", "token")


def mask_url(url: str) -> str:
    """The URL with every password replaced by ``***`` (safe to log).

    Masks the userinfo password (``redis://user:pw@h``, and a lone
    ``redis://pw@h``) and the value of any query parameter whose name, decoded
    and in any case, contains ``password``, ``passwd``, ``secret`` or
    ``token`` (``?password=``, ``?PASSWORD=``, ``?sentinel_password=``):
    redis-py reads a password from the query too.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, hosts = netloc.rsplit("@", 1)
        user, sep, _ = creds.partition(":")
        netloc = f"{user}:***@{hosts}" if sep else f"{quote(unquote(user))}@{hosts}"
        if not sep and user:  # a lone "password@" form (redis://secret@host) is a password too
            netloc = f"***@{hosts}"
    query = "&".join(_mask_query_pair(pair) for pair in parts.query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_query_pair(pair: str) -> str:
    name, sep, _ = pair.partition("=")
    decoded = unquote_plus(name).lower()
    if sep and any(word in decoded for word in _SECRET_QUERY_NAMES):
        return f"{name}=***"
    return pair


# -- pool ---------------------------------------------------------------------


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
        muxed.enable_multiplexing(
            links=s.redis_autopipeline_links,
            max_in_flight=s.redis_autopipeline_max_in_flight,
            slot_timeout=s.redis_pool_timeout,
        )
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
            cluster.enable_multiplexing(
                links=s.redis_autopipeline_links,
                max_in_flight=s.redis_autopipeline_max_in_flight,
                slot_timeout=s.redis_pool_timeout,
            )
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
        master.enable_multiplexing(
            links=s.redis_autopipeline_links,
            max_in_flight=s.redis_autopipeline_max_in_flight,
            slot_timeout=s.redis_pool_timeout,
        )
    return master


def describe_client(client: Any, settings: Settings | None = None) -> str:
    """The masked URL of *client* if this module built it, else ``"<assigned client>"``."""
    if client is not None and client is _owned_client:
        return mask_url((settings or get_settings()).effective_redis_url)
    return "<assigned client>"


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


# -- circuit breaker ----------------------------------------------------------

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed / open / half-open breaker for calls to one Redis client.

    Closed: calls go through; ``failure_threshold`` consecutive connection
    failures open it. Open: ``allow()`` is False for ``reset_timeout``
    seconds, so fail-open paths answer at once instead of waiting a socket
    timeout. Then half-open: one trial call is let through; success closes the
    breaker, failure opens it again. Each transition is logged once.

    Use as ``with breaker: await client.get(...)``: entering raises
    ``RedisUnavailable`` when open; a connection error inside is recorded and
    re-raised as ``RedisUnavailable`` (from the original); an ``OOM`` or
    ``READONLY`` refusal is re-raised as ``RedisUnavailable`` too but counts as
    a success (the server answered), like any other outcome.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 2.0,
        name: str = "redis",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.name = name
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.transitions = 0
        self.rejected = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """May a call go to Redis now? (A half-open breaker admits one trial.)"""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._set("half_open")
            self._trial_in_flight = True
            return True
        self.rejected += 1
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self._state != "closed":
            self._set("closed")

    def record_failure(self, exc: BaseException | None = None) -> None:
        self._trial_in_flight = False
        self._failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._set("open", exc)
        elif self._state == "open":
            self._opened_at = self._clock()

    def _set(self, state: BreakerState, exc: BaseException | None = None) -> None:
        if state == self._state:
            return
        self.transitions += 1
        if state == "open":
            log.error(
                "circuit breaker %r opened after %d failures (%s); fail-open paths skip Redis "
                "for %.1fs",
                self.name,
                self._failures,
                exc,
                self.reset_timeout,
            )
        elif state == "closed":
            log.warning("circuit breaker %r closed: Redis answers again", self.name)
        self._state = state

    def __enter__(self) -> CircuitBreaker:
        if not self.allow():
            raise RedisUnavailable(
                f"circuit breaker {self.name!r} is open after repeated Redis failures; "
                f"next trial in {max(0.0, self.reset_timeout - (self._clock() - self._opened_at)):.1f}s",
                retry_after=self.reset_timeout,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.record_success()
            return
        if isinstance(exc, RedisUnavailable):
            self.record_failure(exc)
            return
        if isinstance(exc, CONNECTION_ERRORS):
            self.record_failure(exc)
            raise RedisUnavailable(f"Redis call failed: {exc}") from exc
        if isinstance(exc, REFUSED_FOR_NOW):
            self.record_success()  # the server answered: no reason to stop trying
            raise RedisUnavailable(f"Redis refused the call for now: {exc}") from exc
        if isinstance(exc, asyncio.CancelledError):
            self._trial_in_flight = False  # a cancelled trial proves nothing either way
            return
        self.record_success()

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self._failures,
            "transitions": self.transitions,
            "rejected": self.rejected,
        }


_breakers: weakref.WeakKeyDictionary[Any, CircuitBreaker] = weakref.WeakKeyDictionary()


def breaker_for(client: Any) -> CircuitBreaker:
    """The breaker of *client* (one per client object, thresholds from settings)."""
    breaker = _breakers.get(client)
    if breaker is None:
        s = get_settings()
        breaker = CircuitBreaker(
            failure_threshold=s.breaker_failure_threshold, reset_timeout=s.breaker_reset_timeout
        )
        _breakers[client] = breaker
    return breaker


# -- lifecycle ----------------------------------------------------------------


def get_redis() -> AnyRedis:
    """The process-wide client, built on first use (no network I/O happens here)."""
    global redis_client, _owned_client
    client = redis_client
    if client is None:
        client = redis_client = _owned_client = build_client()
    return client


async def init_redis(settings: Settings | None = None, *, timeout: float | None = None) -> AnyRedis:
    """Build (if needed) and ping the global client, retrying with capped backoff.

    Raises ``RedisUnavailable`` after ``timeout`` (default ``REDIS_INIT_TIMEOUT``)
    seconds without an answer; a client this call built is closed first.
    """
    global redis_client, _owned_client
    s = settings or get_settings()
    if redis_client is None:
        redis_client = _owned_client = build_client(s)
    client = redis_client
    bound = s.redis_init_timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    delay, attempts = s.redis_retry_backoff_base, 0
    url = mask_url(s.effective_redis_url) if client is _owned_client else "<assigned client>"
    while True:
        attempts += 1
        try:
            remaining = max(0.05, deadline - loop.time())
            async with asyncio.timeout(remaining):
                await client.ping()
            if attempts > 1:
                log.info("Redis at %s answered after %d attempts", url, attempts)
            return client
        except _INIT_ERRORS as exc:
            now = loop.time()
            if now + delay > deadline:
                if client is _owned_client:
                    await close_redis()
                raise RedisUnavailable(
                    f"Redis at {url} did not answer within {bound:.1f}s "
                    f"({attempts} attempts; last error: {exc or type(exc).__name__})",
                    url=url,
                ) from exc
            log.warning("Redis at %s not ready (%s); retrying in %.2fs", url, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, s.redis_retry_backoff_cap * 4)


async def close_redis() -> None:
    """Close the global client if this module built it; forget it either way if built here."""
    global redis_client, _owned_client
    client = _owned_client
    if client is None:
        return
    _owned_client = None
    if redis_client is client:
        redis_client = None
    try:
        await client.aclose()
    except Exception as exc:  # pragma: no cover - closing a dead connection
        log.debug("error while closing Redis client: %s", exc)


async def health(client: Any | None = None, *, details: bool = True) -> dict[str, Any]:
    """Ping latency, and with *details* server version, role and breaker state.

    Raises ``RedisUnavailable`` when Redis is down. With ``details=False`` only
    ``PING`` is sent and the report is ``{"status", "latency_ms"}``: what a
    public health probe may show. Servers without ``INFO``/``ROLE`` (the
    embedded fakeredis) report ``version`` ``None`` and role ``"embedded"``.
    """
    c = client if client is not None else get_redis()
    try:
        start = time.perf_counter()
        await c.ping()
        latency_ms = (time.perf_counter() - start) * 1000
        if not details:
            return {"status": "ok", "latency_ms": round(latency_ms, 3)}
        version, role = await _version_and_role(c)
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable(f"Redis health check failed: {exc}") from exc
    return {
        "status": "ok",
        "latency_ms": round(latency_ms, 3),
        "version": version,
        "role": role,
        "breaker": breaker_for(c).state,
    }


async def _version_and_role(client: Any) -> tuple[str | None, str]:
    try:
        info = await client.info("server")
    except redis_exc.ResponseError:
        return None, "embedded"
    if is_cluster(client):
        versions = {v.get("redis_version") for v in info.values() if isinstance(v, dict)}
        return (
            versions.pop() if len(versions) == 1 else ",".join(sorted(map(str, versions)))
        ), "cluster"
    try:
        reply = await client.execute_command("ROLE")
        first = reply[0]
        role = first.decode() if isinstance(first, bytes) else str(first)
    except redis_exc.ResponseError:
        role = "unknown"
    return info.get("redis_version"), role


Lifespan: TypeAlias = Callable[[Any], AbstractAsyncContextManager[Any]]


def redis_lifespan(inner: Lifespan | None = None) -> Lifespan:
    """A FastAPI lifespan that runs ``init_redis`` / ``close_redis`` around *inner*.

    ``FastAPI(lifespan=redis_lifespan(my_lifespan))``: Redis is up before
    *my_lifespan* starts and closed after it ends; whatever *my_lifespan*
    yields (the lifespan state) is passed through.
    """

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[Any]:
        await init_redis()
        try:
            if inner is None:
                yield None
            else:
                async with inner(app) as state:
                    yield state
        finally:
            await close_redis()

    return _lifespan


lifespan = redis_lifespan()
"""The plain lifespan: ``FastAPI(lifespan=lifespan)``."""
