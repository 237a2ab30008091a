"""The toolkit's pytest plugin: real and fake Redis fixtures and an app client.

Enable it in a root ``conftest.py``: ``pytest_plugins = ["app.testing.plugin"]``.

Finding a real server (``redis_server``, session-scoped, sync), in order:

1. ``--redis-url`` or ``REDIS_URL`` (unless ``memory://``): a server the tests
   did not start. It is never flushed wholesale: each test gets its own key
   prefix and only keys under it are removed afterwards.
2. ``redis-server`` on PATH: started on a free port in a temp dir, flushed
   between tests, stopped by pid at the end.
3. A Docker engine that answers: testcontainers' Redis container.
4. None: integration tests are skipped with one reason, or *fail* when
   ``REDIS_REQUIRED=1`` (CI sets it), so they can never be skipped silently.

Fixtures: ``redis_server``, ``real_redis``, ``any_redis`` (runs the test once on
``fake_redis`` and once on ``real_redis``), ``settings_override``,
``make_app_client`` and ``app_client``.

One fixture per kind of client (``app/testing/clients.py`` says more):

- ``fake_client``: fakeredis with Lua on a fresh fake server (``fake_server``),
  once with bytes and once with decoded replies (ids ``bytes``, ``decoded``);
  ``fake_redis`` is its bytes-only form. ``fake_twin(client)`` is another
  client (another "process") on the same fake server.
- ``topology_client``: a real client per topology x decoding (bytes on
  standalone, Cluster and Sentinel; decoded on standalone and Cluster), built
  the way the app builds it; ``topology_redis`` is the client per topology
  (bytes), and ``twin(client)`` another client on the same topology.

Topologies: ``redis_cluster`` (3 primaries x 1 replica) and ``redis_sentinel``
(primary, replica, 3 sentinels) are session-scoped real setups started from the
same binaries. They skip (or fail under ``REDIS_REQUIRED=1``) when the binaries
are missing.
``tcp_proxy`` puts a fault-injecting proxy in front of the real server.
Markers: ``integration`` (added automatically to tests that use a real
server) and ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.core import redis as core_redis
from app.core.background import drain
from app.core.codec import default_codec
from app.core.config import get_settings
from app.core.multiplex import MultiplexedRedis
from app.core.pool import deliver_fakeredis_cancellations
from app.testing.proxy import TcpProxy
from app.testing.servers import PORT_SALT_ENV, RedisServer, redis_server_binary
from app.testing.topologies import LocalCluster, LocalSentinel, topology_binaries_missing

# Every fakeredis client a test makes (through the fixtures or directly) delivers its
# cancellations like redis.asyncio's (see app.core.pool.deliver_cancellations).
deliver_fakeredis_cancellations()

__all__ = ["RedisServerInfo"]

pytest_plugins = ["app.testing.clients"]  # the client fixtures (fake_client, topology_client, ...)

REAL_FIXTURES = frozenset(
    {"redis_server", "real_redis", "real_app_client", "redis_cluster", "redis_sentinel",
     "topology_redis", "topology_client", "tcp_proxy"}
)  # fmt: skip


@dataclass
class RedisServerInfo:
    """Where the real server is, and whether the tests own it."""

    url: str
    owned: bool
    how: str
    server: RedisServer | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        action="store",
        default=None,
        help="Use this Redis for integration tests instead of starting one (never flushed).",
    )
    parser.addini(
        "collect_garbage_after_each_test",
        type="bool",
        default=False,
        help="Run the garbage collector after each integration test, so an unclosed "
        "connection or transport fails the test that leaked it rather than a later one",
    )
    parser.addini(
        "fail_on_leftover_tasks",
        type="bool",
        default=False,
        help="Fail an async test that leaves asyncio tasks running after its fixtures are "
        "torn down: such a task may reconnect a client the test already closed",
    )
    parser.addini(
        "redis_strict_slots",
        type="bool",
        default=False,
        help="fake_redis and fake_client answer CROSSSLOT like Redis Cluster for multi-slot "
        "commands and scripts",
    )


def pytest_configure(config: pytest.Config) -> None:
    # One salt per session, inherited by pytest-xdist's workers: see servers.PORT_SALT_ENV.
    os.environ.setdefault(PORT_SALT_ENV, str(random.randrange(10)))
    config.addinivalue_line("markers", "integration: talks to a real redis-server")
    config.addinivalue_line("markers", "slow: takes seconds (cluster, sentinel, faults)")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Collect garbage after an integration test's teardown (when the ini option is on).

    A connection a test forgets to close warns (``ResourceWarning``) only when the
    garbage collector reaches it, which without this happens at a random later
    moment, in whichever test is running then. Collecting here, before pytest
    gathers unraisable warnings for this teardown, pins the warning on the test
    that leaked. This hook runs before pytest's own (also ``trylast``) collector
    because plugins registered later run first. Only tests that talk to a real
    server open sockets, so only they pay for the collection (tens of ms each).
    """
    if item.config.getini("collect_garbage_after_each_test") and item.get_closest_marker(
        "integration"
    ):
        gc.collect()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        uses_real = bool(names & REAL_FIXTURES) or (
            "any_redis" in names
            and callspec is not None
            and callspec.params.get("any_redis") == "real"
        )
        if uses_real:
            item.add_marker(pytest.mark.integration)


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _no_server(reason: str) -> None:
    if os.environ.get("REDIS_REQUIRED") == "1":
        pytest.fail(f"REDIS_REQUIRED=1 but no real Redis could be found: {reason}", pytrace=False)
    pytest.skip(f"integration tests need a real Redis: {reason}")


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    """A redis-server of this test alone (free port, temp dir): it may be killed, paused,
    filled or restarted without touching any other test. Stopped and removed after it."""
    if redis_server_binary() is None:
        _no_server("private_server needs redis-server on PATH (apt-get install redis-server)")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServerInfo]:
    """A real Redis for the whole session (see the module docstring for the search order)."""
    url = request.config.getoption("--redis-url") or os.environ.get("REDIS_URL")
    if url and not url.startswith("memory://"):
        yield RedisServerInfo(url=url, owned=False, how="REDIS_URL/--redis-url")
        return
    if redis_server_binary():
        server = RedisServer().start()
        try:
            yield RedisServerInfo(url=server.url, owned=True, how="redis-server", server=server)
        finally:
            server.cleanup()
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield RedisServerInfo(url=f"redis://{host}:{port}/0", owned=True, how="testcontainers")
        return
    _no_server(
        "set REDIS_URL or --redis-url, put redis-server on PATH "
        "(apt-get install redis-server), or run a Docker engine"
    )


@pytest.fixture
def settings_override(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Override settings for one test: ``settings_override(redis_key_prefix="t1")``."""

    def apply(**values: Any) -> None:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(name.upper(), raising=False)
            else:
                monkeypatch.setenv(name.upper(), str(value))
        _clear_caches()

    return apply


LEFTOVER_GRACE = 2.0  # seconds a task may take to finish after the test's fixtures closed


@pytest.fixture(autouse=True)
def _leftover_tasks_gate(request: pytest.FixtureRequest) -> None:
    """Check async tests for leftover tasks when ``fail_on_leftover_tasks`` is on.

    A gate so that sync tests do not pay for an event loop they never use.
    """
    if request.config.getini("fail_on_leftover_tasks") and request.node.get_closest_marker(
        "asyncio"
    ):
        request.getfixturevalue("_no_leftover_tasks")


@pytest_asyncio.fixture
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Fail the test if tasks it started still run once its other fixtures are torn down.

    Requested first (through the gate), so it is torn down after every other fixture
    of the test and before the test's event loop closes. A task still running then
    was neither awaited nor cancelled by the test; closing the loop would cancel it,
    and its cleanup (``finally: await lock.release()``) would reconnect a client the
    test already closed, leaving an unclosed connection that warns in a later test.
    Tasks get ``LEFTOVER_GRACE`` seconds to finish on their own (a cancellation the
    code under test requested may need a few loop turns).
    """
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    leftover = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
    if not leftover:
        return
    _, pending = await asyncio.wait(leftover, timeout=LEFTOVER_GRACE)
    if not pending:
        return
    names = sorted(_describe_task(t) for t in pending)
    for task in pending:
        task.cancel()
    await asyncio.wait(pending, timeout=LEFTOVER_GRACE)
    pytest.fail(
        f"{len(pending)} task(s) still running {LEFTOVER_GRACE:.0f}s after the test's "
        f"fixtures were torn down (await or cancel them in the test): {', '.join(names)}",
        pytrace=False,
    )


def _describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", None) or repr(coro)
    return f"{task.get_name()} ({where})"


def _clear_caches() -> None:
    get_settings.cache_clear()
    default_codec.cache_clear()


@pytest.fixture(autouse=True)
def _toolkit_isolation() -> Iterator[None]:
    """Restore the global client and re-read settings around every test."""
    saved = (core_redis.redis_client, core_redis._owned_client)
    _clear_caches()
    yield
    core_redis.redis_client, core_redis._owned_client = saved
    _clear_caches()


def _real_client(url: str) -> Redis:
    if not get_settings().redis_autopipeline:
        return Redis.from_url(url, decode_responses=False)
    client = MultiplexedRedis.from_url(url, decode_responses=False)
    assert isinstance(client, MultiplexedRedis)  # from_url builds cls
    client.enable_multiplexing()
    return client


@pytest_asyncio.fixture
async def real_redis(
    redis_server: RedisServerInfo, settings_override: Callable[..., None]
) -> AsyncIterator[Redis]:
    """A fresh async client to the real server, isolated from other tests.

    Auto-pipelined like the app's client while ``REDIS_AUTOPIPELINE`` is on (the
    default), so every test that hands it to a service runs on the multiplexed path;
    ``REDIS_AUTOPIPELINE=false`` runs the same tests on plain pooled redis.asyncio.
    """
    client = _real_client(redis_server.url)
    prefix = None
    if redis_server.owned:
        await client.flushall()
    else:
        prefix = f"t{uuid.uuid4().hex[:12]}"
        settings_override(redis_key_prefix=prefix)
    try:
        yield client
    finally:
        await drain()  # the test's background clean-ups reach Redis before the client closes
        with contextlib.suppress(Exception):
            if prefix is None:
                await client.flushall()
            else:
                await core_redis.unlink_matching(client, f"{prefix}:*")
        await client.aclose()


@pytest.fixture(params=["fake", "real"])
def any_redis(request: pytest.FixtureRequest) -> Any:
    """The same test on fakeredis (``fake``) and on the real server (``real``)."""
    return request.getfixturevalue("fake_redis" if request.param == "fake" else "real_redis")


AppClientFactory = Callable[..., Awaitable[Any]]


@pytest_asyncio.fixture
async def make_app_client() -> AsyncIterator[AppClientFactory]:
    """Factory: ``client = await make_app_client(app, redis)`` -> httpx.AsyncClient.

    The app's lifespan runs (startup before the first request, shutdown at
    teardown), and ``app.core.redis.redis_client`` is *redis* meanwhile, so
    every dependency and middleware of the app uses the test's client.
    """
    import httpx
    from asgi_lifespan import LifespanManager

    stack = contextlib.AsyncExitStack()

    async def make(app: Any = None, redis: Any = None, **client_kwargs: Any) -> httpx.AsyncClient:
        if app is None:
            from app.main import create_app

            app = create_app()
        if redis is not None:
            core_redis.redis_client = redis
        manager = await stack.enter_async_context(LifespanManager(app, startup_timeout=30))
        transport = httpx.ASGITransport(app=manager.app)
        client_kwargs.setdefault("base_url", "http://testserver")
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, **client_kwargs)
        )

    async with stack:
        yield make


@pytest_asyncio.fixture
async def app_client(fake_redis: Any, make_app_client: AppClientFactory) -> Any:
    """The demo app over ASGI, wired to ``fake_redis``.

    The client fixture comes first so it is torn down last: the app's shutdown
    still has a working Redis client.
    """
    return await make_app_client(None, fake_redis)


@pytest_asyncio.fixture
async def real_app_client(real_redis: Redis, make_app_client: AppClientFactory) -> Any:
    """The demo app over ASGI, wired to ``real_redis`` (torn down after the app)."""
    return await make_app_client(None, real_redis)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster (3 primaries, 3 replicas) for the session."""
    reason = topology_binaries_missing()
    if reason:
        _no_server(f"a Redis Cluster needs redis-server and redis-cli: {reason}")
    cluster = LocalCluster().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A real Sentinel setup (primary, replica, 3 sentinels on ``mymaster``)."""
    reason = topology_binaries_missing()
    if reason:
        _no_server(f"a Sentinel setup needs redis-server and redis-cli: {reason}")
    sentinel = LocalSentinel().start()
    try:
        yield sentinel
    finally:
        sentinel.cleanup()


@pytest.fixture
def tcp_proxy(redis_server: RedisServerInfo) -> Iterator[Callable[..., TcpProxy]]:
    """Factory: ``proxy = tcp_proxy()`` forwards to the real server; faults on demand."""
    proxies: list[TcpProxy] = []

    def make(host: str | None = None, port: int | None = None) -> TcpProxy:
        if host is None or port is None:
            server = redis_server.server
            if server is None:
                pytest.fail("tcp_proxy needs a server the tests started, or an explicit host/port")
            host, port = server.host, server.port
        proxy = TcpProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
