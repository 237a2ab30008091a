"""The multiplexed command path (REDIS_AUTOPIPELINE) against real redis-server processes.

Every test builds its client the way production does: ``settings_override`` plus
``build_client``. The invariant checked again and again: with many tasks each
reading its own key, no task ever receives another task's reply, whatever
happens to the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from app.core.errors import RedisUnavailable
from app.core.multiplex import MultiplexedRedis, NodeMultiplexer
from app.core.redis import breaker_for, build_client
from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer
from app.testing.waiting import eventually

pytestmark = pytest.mark.integration

MakeClient = Callable[..., Awaitable[MultiplexedRedis]]
LINK_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError)


@pytest.fixture
async def make_client(
    settings_override: Callable[..., None],
) -> AsyncIterator[MakeClient]:
    """Factory: a multiplexed client for *url* built by ``build_client`` with the setting on."""
    made: list[Any] = []

    async def make(url: str, **settings: Any) -> MultiplexedRedis:
        settings_override(redis_url=url, redis_autopipeline=True, **settings)
        client = build_client()
        assert isinstance(client, MultiplexedRedis)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await client.aclose()


def mux_of(client: MultiplexedRedis) -> NodeMultiplexer:
    mux = client.multiplexer
    assert mux is not None
    return mux


def with_query(url: str, protocol: int = 2, decode: bool = False) -> str:
    query = f"protocol={protocol}" + ("&decode_responses=true" if decode else "")
    return f"{url}?{query}" if query else url


def spawn(call: Awaitable[Any]) -> asyncio.Task[Any]:
    """A task awaiting *call* (redis-py types its commands as plain awaitables)."""

    async def run() -> Any:
        return await call

    return asyncio.create_task(run())


async def seed(url: str, count: int, prefix: str = "own") -> None:
    plain = Redis.from_url(url)
    try:
        pipe = plain.pipeline(transaction=False)
        for i in range(count):
            pipe.set(f"{prefix}:{i}", f"value-{i}")
        await pipe.execute()
    finally:
        await plain.aclose()


# -- every reply reaches its own caller ----------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True])
async def test_two_thousand_tasks_each_get_their_own_value(
    redis_server: Any, real_redis: Redis, make_client: MakeClient, protocol: int, decode: bool
) -> None:
    await seed(redis_server.url, 2000)
    client = await make_client(with_query(redis_server.url, protocol, decode))

    async def read(i: int) -> Any:
        return await client.get(f"own:{i}")

    values = await asyncio.gather(*(read(i) for i in range(2000)))
    expected = [f"value-{i}" if decode else f"value-{i}".encode() for i in range(2000)]
    assert values == expected
    stats = mux_of(client).stats()
    assert 1 <= stats["links"] <= 2
    assert stats["max_in_flight_seen"] > 1  # the commands really shared connections


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True])
async def test_results_equal_redis_asyncio(
    redis_server: Any, real_redis: Redis, make_client: MakeClient, protocol: int, decode: bool
) -> None:
    """The same calls on redis.asyncio and on the multiplexed client return equal values."""
    url = with_query(redis_server.url, protocol, decode)
    plain = Redis.from_url(url)
    client = await make_client(url)
    await plain.hset("h", mapping={"a": 1, "b": "two"})
    await plain.zadd("z", {"x": 1.5, "y": 2})
    await plain.set("s", "v", ex=100)
    await plain.xadd("st", {"f": "v"}, id="1-1")
    await plain.sadd("set", "m1", "m2")

    async def calls(r: Any) -> list[Any]:
        return [
            await r.get("missing"),
            await r.set("k", "v", nx=True, get=False),
            await r.get("s"),
            await r.hgetall("h"),
            await r.zrange("z", 0, -1, withscores=True),
            await r.zscore("z", "x"),
            await r.ttl("s") > 0,
            await r.exists("s", "missing"),
            await r.xrange("st"),
            await r.smembers("set"),
            await r.config_get("maxmemory-policy"),
            await r.eval("return {1, 'two', KEYS[1]}", 1, "key"),
            await r.ping(),
            sorted((await r.info("server")).keys()),
            await r.delete("k"),
        ]

    try:
        assert await calls(client) == await calls(plain)
        for r in (plain, client):  # errors: same class, same message
            with pytest.raises(redis_exc.ResponseError, match="WRONGTYPE"):
                await r.incr("h")
            with pytest.raises(redis_exc.NoScriptError):
                await r.evalsha("0" * 40, 0)
        assert mux_of(client).connects >= 1
    finally:
        await plain.aclose()


async def test_commands_that_own_a_connection_use_the_pool(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """A BLPOP waiting on the client does not hold up the multiplexed commands behind it."""
    client = await make_client(redis_server.url)
    await real_redis.set("k", "v")
    blpop = spawn(client.blpop(["queue"], timeout=20))

    async def blocked() -> bool:
        clients = await real_redis.client_list()
        return any(c.get("cmd") == "blpop" for c in clients)

    await eventually(blocked, "the BLPOP is blocked in the server")
    assert await client.get("k") == b"v"  # on the link, FIFO: would wait for BLPOP if it shared
    assert not blpop.done()
    await real_redis.rpush("queue", "job")
    assert tuple(await blpop) == (b"queue", b"job")
    # transactions, pipelines and pub/sub keep working on the same client
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr("n")
        pipe.incr("n")
        assert await pipe.execute() == [1, 2]
    async with client.pubsub() as pubsub:
        await pubsub.subscribe("ch")
        assert await client.publish("ch", "hello") == 1
        message = None
        while message is None or message["type"] != "message":
            message = await pubsub.get_message(timeout=5)
        assert message["data"] == b"hello"


# -- failure rules ------------------------------------------------------------------


async def test_cancelled_callers_do_not_shift_replies(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """400 GETs queue on one link behind a write held by CLIENT PAUSE; half are cancelled."""
    await seed(redis_server.url, 400)
    client = await make_client(
        redis_server.url, redis_socket_timeout=60, redis_autopipeline_links=1
    )
    mux = mux_of(client)
    assert await client.ping()
    await real_redis.client_pause(30_000, all=False)  # holds writes: the link waits behind one
    try:
        head = spawn(client.set("head", 1))
        tasks = [spawn(client.get(f"own:{i}")) for i in range(400)]
        await eventually(
            lambda: len(mux.links[0].pending) == 401, "the write and 400 reads on the link"
        )
        for task in tasks[::2]:  # every other caller gives up while its reply is on the way
            task.cancel()
        await asyncio.wait(tasks[::2])
    finally:
        await real_redis.client_unpause()
    assert await head is True
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == f"value-{i}".encode()
    await eventually(lambda: mux.in_flight == 0, "the dropped replies were consumed")
    after = await asyncio.gather(*(client.get(f"own:{i}") for i in range(400)))
    assert after == [f"value-{i}".encode() for i in range(400)]


async def test_a_silent_link_times_out_callers_and_is_replaced(
    private_server: RedisServer, make_client: MakeClient
) -> None:
    """Nothing arrives for a socket timeout (server stopped): callers get TimeoutError, the
    link is closed, and once the server answers again the next commands get their values."""
    await seed(private_server.url, 100)
    client = await make_client(private_server.url, redis_socket_timeout=0.3, redis_retry_attempts=0)
    mux = mux_of(client)
    assert await client.ping()
    private_server.pause()
    try:
        results = await asyncio.gather(
            *(client.get(f"own:{i}") for i in range(100)), return_exceptions=True
        )
    finally:
        private_server.resume()
    assert all(isinstance(r, redis_exc.TimeoutError) for r in results), results
    assert mux.in_flight == 0
    after = await asyncio.gather(*(client.get(f"own:{i}") for i in range(100)))
    assert after == [f"value-{i}".encode() for i in range(100)]
    assert mux.connects >= 2


async def test_a_killed_link_fails_exactly_its_own_commands(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """Two links with writes held by CLIENT PAUSE; killing one fails only its commands."""
    client = await make_client(redis_server.url, redis_retry_attempts=0, redis_socket_timeout=30)
    mux = mux_of(client)
    await asyncio.gather(*(client.ping() for _ in range(50)))  # opens the second link
    await eventually(lambda: len(mux.links) == 2, "two links open")
    await real_redis.client_pause(30_000, all=False)  # WRITE mode: reads and CLIENT KILL go on
    try:
        writes = [spawn(client.set(f"w:{i}", i)) for i in range(40)]
        await eventually(lambda: mux.in_flight == 40, "40 writes in flight")
        victim = mux.links[0]
        on_victim = len(victim.pending)
        assert 0 < on_victim < 40
        host, port = victim.transport.get_extra_info("sockname")[:2]
        assert await real_redis.client_kill(f"{host}:{port}")
    finally:
        await real_redis.client_unpause()
    results = await asyncio.gather(*writes, return_exceptions=True)
    failed = [r for r in results if isinstance(r, redis_exc.ConnectionError)]
    assert len(failed) == on_victim
    assert [r for r in results if not isinstance(r, redis_exc.ConnectionError)] == [True] * (
        40 - on_victim
    )
    assert await client.set("after", 1) is True  # the next command reconnects
    assert await client.get("after") == b"1"


async def test_commands_lost_with_a_link_are_retried_like_redis_asyncio_retries_them(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """REDIS_RETRY_ATTEMPTS=2: the commands in flight on a killed link are sent again on a
    new link and every caller gets its own value."""
    await seed(redis_server.url, 200)
    client = await make_client(redis_server.url, redis_retry_attempts=2, redis_autopipeline_links=1)
    mux = mux_of(client)
    assert await client.ping()
    await real_redis.client_pause(30_000, all=False)
    try:
        head = spawn(client.set("head", 1))
        reads = [spawn(client.get(f"own:{i}")) for i in range(200)]
        await eventually(lambda: len(mux.links[0].pending) == 201, "201 commands on the link")
        host, port = mux.links[0].transport.get_extra_info("sockname")[:2]
        assert await real_redis.client_kill(f"{host}:{port}")
        await eventually(lambda: mux.connects == 2, "a new link opened for the retries")
    finally:
        await real_redis.client_unpause()
    assert await head is True
    assert await asyncio.gather(*reads) == [f"value-{i}".encode() for i in range(200)]


async def test_client_kill_under_load_never_misroutes_a_reply(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    await seed(redis_server.url, 1000)
    client = await make_client(redis_server.url, redis_retry_attempts=0)
    stop = asyncio.Event()
    wrong: list[tuple[int, Any]] = []
    count = {"answered": 0, "errors": 0}

    async def reader(i: int) -> None:
        while not stop.is_set():
            try:
                value = await client.get(f"own:{i}")
            except LINK_ERRORS:
                count["errors"] += 1
                continue
            count["answered"] += 1
            if value != f"value-{i}".encode():
                wrong.append((i, value))

    readers = [asyncio.create_task(reader(i)) for i in range(1000)]
    for _ in range(5):
        await eventually(lambda: count["answered"] > 2000, "readers are being answered")
        count["answered"] = 0
        await real_redis.client_kill_filter(_type="normal", skipme=True)
    stop.set()
    await asyncio.gather(*readers)
    assert wrong == []
    assert count["errors"] > 0  # the kills did hit commands in flight
    assert mux_of(client).connects >= 2


async def test_kill_and_restart_under_load_never_misroutes_a_reply(
    private_server: RedisServer, make_client: MakeClient
) -> None:
    """1,000 tasks read their own keys while the server is killed and restarted twice."""
    await seed(private_server.url, 1000)
    client = await make_client(
        private_server.url, redis_socket_timeout=0.5, redis_connect_timeout=0.5
    )
    stop = asyncio.Event()
    wrong: list[tuple[int, Any]] = []
    count = {"answered": 0}

    async def reader(i: int) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(10):  # bounds a hang; never reached when healthy
                    value = await client.get(f"own:{i}")
            except LINK_ERRORS:
                await asyncio.sleep(0.01)  # a failing server: do not spin
                continue
            count["answered"] += 1
            if value not in (f"value-{i}".encode(), None):  # None: the restart lost the data
                wrong.append((i, value))

    readers = [asyncio.create_task(reader(i)) for i in range(1000)]
    for _ in range(2):
        await eventually(lambda: count["answered"] > 2000, "readers are being answered")
        await asyncio.to_thread(private_server.restart)
        await seed(private_server.url, 1000)
        count["answered"] = 0
    await eventually(lambda: count["answered"] > 2000, "readers are answered after the restart")
    stop.set()
    await asyncio.gather(*readers)
    assert wrong == []
    values = await asyncio.gather(*(client.get(f"own:{i}") for i in range(1000)))
    assert values == [f"value-{i}".encode() for i in range(1000)]


async def test_ten_thousand_tasks_wait_for_slots_and_memory_stays_bounded(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    await seed(redis_server.url, 10_000)
    client = await make_client(
        redis_server.url,
        redis_autopipeline_links=2,
        redis_autopipeline_max_in_flight=64,
        redis_pool_timeout=120,  # the last of 10,000 FIFO waiters may wait long on a loaded box
    )
    values = await asyncio.gather(*(client.get(f"own:{i}") for i in range(10_000)))
    assert values == [f"value-{i}".encode() for i in range(10_000)]
    stats = mux_of(client).stats()
    assert stats["max_in_flight_seen"] <= 128
    assert stats["max_link_queue"] <= 64
    assert stats["slot_waits"] > 0  # the burst was held back, not buffered
    assert stats["in_flight"] == 0


async def test_noscript_reload_and_breaker_work_above_the_multiplexed_path(
    private_server: RedisServer, make_client: MakeClient
) -> None:
    from app.core.scripts import Script

    client = await make_client(
        private_server.url,
        redis_socket_timeout=0.3,
        redis_connect_timeout=0.3,
        redis_retry_attempts=0,
        breaker_failure_threshold=2,
    )
    script = Script("return redis.call('INCR', KEYS[1])", name="incr")
    assert await script(client, ["n"]) == 1
    await client.script_flush()
    assert await script(client, ["n"]) == 2  # NOSCRIPT seen through the link, EVAL sent
    breaker = breaker_for(client)
    private_server.kill()
    for _ in range(2):
        with pytest.raises(RedisUnavailable), breaker:
            await client.get("n")
    assert breaker.state == "open"
    with pytest.raises(RedisUnavailable, match="circuit breaker"), breaker:
        await client.get("n")


async def test_a_demoted_primary_answering_readonly_closes_the_link(
    private_server: RedisServer, make_client: MakeClient
) -> None:
    """What a Sentinel client does when its primary was demoted but kept the connection:
    the READONLY write fails as a connection error (retried elsewhere) and the link goes."""
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(private_server.port)])
    replica.start()
    try:
        client = await make_client(replica.url, redis_retry_attempts=0)
        mux = mux_of(client)
        mux.follows_master = True  # as for a redis+sentinel:// primary
        assert await client.get("k") is None  # reads work on the replica
        with pytest.raises(redis_exc.ConnectionError, match="previous master"):
            await client.set("k", "v")
        assert mux.links == []
        assert await client.get("k") is None
        assert mux.connects == 2
    finally:
        replica.cleanup()


async def test_aclose_returns_once_the_links_are_closed(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    client = await make_client(redis_server.url)
    mux = mux_of(client)
    await asyncio.gather(*(client.ping() for _ in range(50)))
    links = list(mux.links)
    assert links
    await client.aclose()
    assert all(link.closed.done() for link in links)
    assert mux.links == []


async def test_resp3_push_frames_are_never_taken_for_replies(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """Client-side-caching invalidations arrive on the link between replies; they are dropped
    and every caller still gets its own value."""
    await seed(redis_server.url, 300)
    client = await make_client(with_query(redis_server.url, 3), redis_autopipeline_links=1)
    mux = mux_of(client)
    # CLIENT commands never go to the links through the client; sent here on purpose
    assert await mux.request(("CLIENT", "TRACKING", "ON"), False) == b"OK"
    assert await asyncio.gather(*(client.get(f"own:{i}") for i in range(300))) == [
        f"value-{i}".encode() for i in range(300)
    ]  # every key is now tracked for this link

    async def overwrite() -> None:
        for i in range(0, 300, 3):
            await real_redis.set(f"own:{i}", f"value-{i}")  # same value; still invalidates

    async def read(i: int) -> Any:
        return await client.get(f"own:{i}")

    results = await asyncio.gather(overwrite(), *(read(i) for i in range(300)))
    assert results[1:] == [f"value-{i}".encode() for i in range(300)]
    await eventually(lambda: mux.pushes_dropped > 0, "invalidation pushes reached the link")
    again = await asyncio.gather(*(read(i) for i in range(300)))
    assert again == [f"value-{i}".encode() for i in range(300)]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_links_authenticate_select_the_database_and_name_themselves(
    make_client: MakeClient, protocol: int
) -> None:
    server = RedisServer().start()
    try:
        setup = Redis.from_url(server.url)
        await setup.config_set("requirepass", "s3cret-pw")
        await setup.aclose()
        base = f"redis://:s3cret-pw@{server.host}:{server.port}/3"
        client = await make_client(f"{base}?protocol={protocol}&client_name=mux-test")
        assert await client.set("where", "db3") is True
        assert mux_of(client).connects >= 1
        plain = Redis.from_url(base)
        try:
            assert await plain.get("where") == b"db3"  # AUTH and SELECT 3 ran on the link
            names = [c.get("name") for c in await plain.client_list()]
            assert "mux-test" in names
            await plain.select(0)
        finally:
            await plain.aclose()
        wrong = await make_client(f"redis://:wrong@{server.host}:{server.port}/3")
        with pytest.raises(redis_exc.AuthenticationError):
            await wrong.get("where")
    finally:
        server.cleanup()


async def test_a_timed_out_caller_keeps_its_slot_while_its_reply_is_still_arriving(
    redis_server: Any,
    real_redis: Redis,
    make_client: MakeClient,
    tcp_proxy: Callable[[], TcpProxy],
) -> None:
    """A 4 MB reply dribbles in through a slow proxy for longer than the socket timeout: its
    caller gets TimeoutError, but bytes keep arriving, so the link stays and the reply is
    consumed; the next caller on the same link gets its own value."""
    await real_redis.set("big", b"x" * 4_000_000)
    await real_redis.set("small", b"mine")
    proxy = tcp_proxy()
    client = await make_client(
        proxy.url,
        redis_socket_timeout=0.3,
        redis_retry_attempts=0,
        redis_autopipeline_links=1,
    )
    mux = mux_of(client)
    assert await client.get("small") == b"mine"
    proxy.latency = 0.02  # per chunk read: the big reply takes well over 0.3 s
    with pytest.raises(redis_exc.TimeoutError):
        await client.get("big")
    await eventually(lambda: mux.in_flight == 0, "the big reply consumed and dropped")
    proxy.latency = 0.0
    assert await client.get("small") == b"mine"
    assert mux.connects == 1  # the link that kept receiving was never closed


async def test_callers_waiting_for_a_link_get_connection_error_when_the_client_closes(
    make_client: MakeClient,
) -> None:
    """aclose() while the first link is still connecting: every caller waiting for it gets
    redis' ConnectionError (not a CancelledError it never asked for), and nothing stays open."""
    accepted: list[asyncio.StreamWriter] = []
    hung_up: list[bool] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # the handshake is read and never answered, until EOF
        hung_up.append(True)

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await make_client(
            f"redis://127.0.0.1:{port}/0", redis_retry_attempts=0, redis_connect_timeout=30
        )
        calls = [asyncio.create_task(client.execute_command("GET", f"k{i}")) for i in range(20)]
        await eventually(lambda: bool(accepted), "the link's connect reached the server")
        await client.aclose()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, redis_exc.ConnectionError) for r in results), results
        assert mux_of(client).links == []
        await eventually(lambda: len(hung_up) == len(accepted), "every socket it opened closed")
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_client_with_another_encoding_sends_what_redis_py_sends(
    redis_server: Any, real_redis: Redis, make_client: MakeClient
) -> None:
    """Text is encoded with the client's encoding on the links too (redis-py's packer then)."""
    client = await make_client(
        f"{with_query(redis_server.url, decode=True)}&encoding=latin-1", redis_autopipeline_links=1
    )
    await asyncio.gather(*(client.set(f"word:{i}", f"café-{i}") for i in range(20)))
    assert await real_redis.get("word:3") == "café-3".encode("latin-1")
    assert await asyncio.gather(*(client.get(f"word:{i}") for i in range(20))) == [
        f"café-{i}" for i in range(20)
    ]
    assert mux_of(client).max_in_flight_seen > 1  # these went over the link


async def test_a_silent_link_still_delivers_the_replies_of_its_younger_commands(
    redis_server: Any,
    real_redis: Redis,
    make_client: MakeClient,
    tcp_proxy: Callable[[], TcpProxy],
) -> None:
    """Nothing comes back for a whole socket timeout: the oldest caller gets TimeoutError and
    the link takes no new command, but a command sent later on it keeps its slot, so when the
    server answers after all, that caller gets its reply instead of an error (and a retry
    that would run it twice)."""
    await real_redis.set("k", b"v")
    proxy = tcp_proxy()
    client = await make_client(
        proxy.url, redis_socket_timeout=0.5, redis_retry_attempts=0, redis_autopipeline_links=1
    )
    mux = mux_of(client)
    assert await client.get("k") == b"v"
    proxy.stall()
    old = spawn(client.get("k"))
    await asyncio.sleep(0.35)
    young = spawn(client.incr("counter"))
    await asyncio.sleep(0.3)  # past the old one's deadline, before the young one's
    proxy.resume()
    with pytest.raises(redis_exc.TimeoutError):
        await old
    assert await young == 1
    assert await real_redis.get("counter") == b"1"  # ran once
    await eventually(lambda: not mux.retired, "the retired link closed once answered")
    assert await client.get("k") == b"v"  # over a new link
    assert mux.connects == 2
