"""Broadcaster on a real redis-server: one connection, order, kills, half-open links, replay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel
from redis.asyncio import Redis

from app.core.redis import is_cluster
from app.services.pubsub import Broadcaster, Message, Reconnected, Subscription
from app.testing.clients import twin
from app.testing.plugin import RedisServerInfo
from app.testing.proxy import TcpProxy
from app.testing.waiting import DEFAULT_DEADLINE, eventually

FAST = {
    "ping_interval": 0.1,
    "ping_timeout": 0.3,
    "connect_timeout": 0.3,
    "backoff_base": 0.02,
    "backoff_cap": 0.1,
    "subscribe_timeout": 5.0,
    "drain_timeout": 1.0,
}


class Order(BaseModel):
    id: int
    items: list[str]


BroadcasterFactory = Callable[..., Broadcaster]


@pytest_asyncio.fixture
async def broadcasters() -> AsyncIterator[BroadcasterFactory]:
    """``broadcasters(client, **options)``: fast-supervised broadcasters, closed at teardown."""
    made: list[Broadcaster] = []

    def factory(client: Any, **options: Any) -> Broadcaster:
        broadcaster = Broadcaster(client, **{**FAST, **options})
        made.append(broadcaster)
        return broadcaster

    yield factory
    for broadcaster in made:
        await broadcaster.aclose(drain_timeout=0.5)


@pytest.fixture
def make(real_redis: Redis, broadcasters: BroadcasterFactory) -> BroadcasterFactory:
    """``make(client=real_redis, **options)`` (closed before ``real_redis``)."""

    def factory(client: Any = None, **options: Any) -> Broadcaster:
        return broadcasters(real_redis if client is None else client, **options)

    return factory


@pytest.fixture
def client(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


@pytest_asyncio.fixture
async def twins() -> AsyncIterator[Callable[..., Any]]:
    """``twins(client, **options)``: another client on the same topology, closed at teardown."""
    made: list[Any] = []

    def build(client: Any, **options: Any) -> Any:
        made.append(twin(client, **options))
        return made[-1]

    yield build
    for made_client in made:
        await made_client.aclose()


async def primaries(client: Any) -> list[Redis]:
    """Plain clients to every primary: the Cluster's, or the one server behind *client*."""
    if not is_cluster(client):
        return [client]
    await client.initialize()
    return [Redis(host=n.host, port=n.port) for n in client.get_primaries()]


@pytest_asyncio.fixture
async def client_via(redis_server: RedisServerInfo) -> AsyncIterator[Callable[[str], Redis]]:
    """Factory for extra clients (other URLs, decode_responses), closed at teardown."""
    clients: list[Redis] = []

    def build(url: str, **options: Any) -> Redis:
        client = Redis.from_url(url, **options)
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.aclose()


async def next_message(sub: Subscription[Any], timeout: float = DEFAULT_DEADLINE) -> Message[Any]:
    event = await sub.get(timeout)
    assert isinstance(event, Message), f"expected a message, got {event!r}"
    return event


async def pubsub_clients(client: Redis) -> list[dict[str, str]]:
    """``CLIENT LIST`` rows of connections subscribed to anything (flag ``P``)."""
    return [row for row in await client.client_list() if "P" in row["flags"]]


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decoded"])
async def test_json_round_trip_and_patterns(
    make: BroadcasterFactory,
    redis_server: RedisServerInfo,
    client_via: Callable[..., Redis],
    decode: bool,
) -> None:
    b = make(client_via(redis_server.url, decode_responses=decode))
    async with (
        b.subscribe("orders:1") as plain,
        b.subscribe("orders:1", type_=Order) as typed,
        b.subscribe(patterns=["orders:*", "?ews"]) as patterned,
    ):
        receivers = await b.publish("orders:1", {"id": 1, "items": ["é", "☃"]})
        # three local subscribers, one Redis connection: counted once per channel or pattern
        assert receivers.receivers == 2
        await b.publish("news", [1, 2.5, None, True])
        await b.publish("other", "not for anyone")
        assert (await next_message(plain)).data == {"id": 1, "items": ["é", "☃"]}
        assert (await next_message(typed)).data == Order(id=1, items=["é", "☃"])
        first, second = await next_message(patterned), await next_message(patterned)
        assert (first.channel, first.pattern) == ("orders:1", "orders:*")
        assert (second.channel, second.pattern, second.data) == (
            "news",
            "?ews",
            [1, 2.5, None, True],
        )
        assert await patterned.get(0.05) is None


async def test_per_channel_order_over_10000_messages(
    topology_redis: Any, broadcasters: BroadcasterFactory
) -> None:
    """On a Cluster "even" and "odd" are sharded channels, possibly on two shards."""
    b = broadcasters(topology_redis)
    total = 10_000
    async with (
        b.subscribe("even", queue_size=total) as even,
        b.subscribe("odd", queue_size=total) as odd,
        b.subscribe("even", "odd", queue_size=total) as both,
    ):

        async def collect(sub: Subscription[Any], count: int) -> list[Message[Any]]:
            return [await next_message(sub) for _ in range(count)]

        readers = [
            asyncio.create_task(collect(even, total // 2)),
            asyncio.create_task(collect(odd, total // 2)),
            asyncio.create_task(collect(both, total)),
        ]
        for n in range(total):
            await b.publish("even" if n % 2 == 0 else "odd", n)
        got_even, got_odd, got_both = await asyncio.gather(*readers)
    assert [m.data for m in got_even] == list(range(0, total, 2))
    assert [m.data for m in got_odd] == list(range(1, total, 2))
    assert [m.data for m in got_both if m.channel == "even"] == list(range(0, total, 2))
    assert [m.data for m in got_both if m.channel == "odd"] == list(range(1, total, 2))
    assert b.stats()["dropped"] == 0


async def test_1000_local_subscribers_share_one_redis_connection(
    make: BroadcasterFactory, real_redis: Redis
) -> None:
    b = make()
    channels = [f"room:{n}" for n in range(100)]
    async with AsyncExitStack() as stack:
        subs = await asyncio.gather(
            *(stack.enter_async_context(b.subscribe(channels[n % 100])) for n in range(1000))
        )
        watcher = await stack.enter_async_context(b.subscribe(patterns=["room:*"]))
        subscribed = await pubsub_clients(real_redis)
        assert len(subscribed) == 1, subscribed
        connection = subscribed[0]
        assert (connection["sub"], connection["psub"], connection["resp"]) == ("100", "1", "2")
        assert len(await real_redis.client_list(_type="pubsub")) == 1
        for channel in channels:
            await b.publish(channel, channel)
        received = await asyncio.gather(*(next_message(s) for s in subs))
        assert [m.data for m in received] == [channels[n % 100] for n in range(1000)]
        assert sorted([(await next_message(watcher)).channel for _ in channels]) == sorted(channels)
    stats = b.stats()
    assert stats["delivered"] == 1100 and stats["subscribers"] == 0


# -- every topology ---------------------------------------------------------------------


async def test_another_process_reaches_subscribers_with_live_and_history_channels(
    client: Any, twins: Callable[..., Any], broadcasters: BroadcasterFactory
) -> None:
    """Sharded channels on a Cluster (SPUBLISH, also from the history script), plain elsewhere."""
    history = {"log": 100}
    b = broadcasters(client, history=lambda channel: history.get(channel, 0))
    other = broadcasters(
        twins(client), history=lambda channel: history.get(channel, 0)
    )  # "a process"
    assert b.sharded is is_cluster(client) and b.stats()["sharded"] is is_cluster(client)
    first = await other.publish("log", "before")
    assert first.id is not None
    async with (
        b.subscribe("orders:1", "news") as plain,
        b.subscribe("orders:1", type_=Order) as typed,
        b.subscribe("log", last_ids={"log": "0-0"}) as logged,
    ):
        published = await other.publish("orders:1", {"id": 1, "items": ["é"]})
        assert published.receivers == 1  # this process's one connection (on the shard)
        await other.publish("news", [1, None])
        after = await other.publish("log", "after")
        # a dict: on a Cluster the two channels may live on two shards, with no order between
        got = {(m := await next_message(plain)).channel: m.data for _ in range(2)}
        assert got == {"orders:1": {"id": 1, "items": ["é"]}, "news": [1, None]}
        assert (await next_message(typed)).data == Order(id=1, items=["é"])
        replayed, live = await next_message(logged), await next_message(logged)
        assert [(m.data, m.id) for m in (replayed, live)] == [
            ("before", first.id),
            ("after", after.id),
        ]
        assert await plain.get(0.05) is None
    assert b.stats()["dropped"] == 0


@pytest.mark.parametrize("topology_redis", ["cluster"], indirect=True)
@pytest.mark.slow
async def test_sharded_channels_live_on_their_shard_and_any_client_of_it_publishes(
    topology_redis: Any, broadcasters: BroadcasterFactory
) -> None:
    b = broadcasters(topology_redis)
    channels = [f"room:{n}" for n in range(12)]
    async with b.subscribe(*channels) as sub:
        owners = {
            channel: topology_redis.nodes_manager.get_node_from_slot(
                topology_redis.keyslot(b.channel_name(channel))
            )
            for channel in channels
        }
        assert len({node.name for node in owners.values()}) > 1  # spread over shards
        # one pub/sub connection per shard that owns a subscribed channel
        assert {link["name"] for link in b.stats()["links"]} == {
            node.name for node in owners.values()
        }
        for channel, node in owners.items():
            async with Redis(host=node.host, port=node.port) as direct:
                raw = b.channel_name(channel)
                assert dict(await direct.pubsub_shardnumsub(raw))[raw.encode()] == 1
                # SPUBLISH straight to the owning node, by a plain client (any language could)
                assert await direct.spublish(raw, b.codec.encode(channel)) == 1
        received = sorted([(await next_message(sub)).data for _ in channels])
        assert received == sorted(channels)


@pytest.mark.parametrize("topology_redis", ["cluster"], indirect=True)
@pytest.mark.slow
async def test_plain_pubsub_on_a_cluster_crosses_nodes_and_keeps_patterns(
    topology_redis: Any, broadcasters: BroadcasterFactory
) -> None:
    """sharded=False: one connection to one node; PUBLISH on any node reaches it."""
    b = broadcasters(topology_redis, sharded=False)
    nodes = await primaries(topology_redis)
    assert len(nodes) == 3
    async with b.subscribe("feed") as plain, b.subscribe(patterns=["feed*"]) as patterned:
        for n, node in enumerate(nodes):
            async with node:
                await node.publish(b.channel_name("feed"), b.codec.encode(n))
        # messages from different nodes cross different cluster-bus links: no order between them
        assert sorted([(await next_message(plain)).data for _ in nodes]) == [0, 1, 2]
        got = [await next_message(patterned) for _ in nodes]
        assert sorted((m.data, m.pattern) for m in got) == [(n, "feed*") for n in range(3)]


async def test_killed_pubsub_connections_reconnect_and_resubscribe_on_every_topology(
    topology_redis: Any, broadcasters: BroadcasterFactory
) -> None:
    b = broadcasters(topology_redis)
    channels = [f"room:{n}" for n in range(6)]
    async with b.subscribe(*channels) as sub:
        killed = 0
        for node in await primaries(topology_redis):
            # ours only: sentinels hold pub/sub connections to a monitored primary too
            rows = await node.client_list(_type="pubsub")
            for row in rows:
                if not row.get("name", "").startswith("sentinel-"):
                    killed += await node.client_kill_filter(_id=row["id"])
            if node is not topology_redis:
                await node.aclose()
        assert killed == len(b.stats()["links"]) >= 1
        events = [
            await sub.get(DEFAULT_DEADLINE) for _ in range(killed)
        ]  # one per link lost and re-made
        assert all(isinstance(e, Reconnected) and e.may_have_missed for e in events), events
        for channel in channels:
            await b.publish(channel, channel)
        assert sorted([(await next_message(sub)).data for _ in channels]) == sorted(channels)


# -- supervision ----------------------------------------------------------------------


async def test_client_kill_reconnects_resubscribes_and_notifies(
    make: BroadcasterFactory, real_redis: Redis
) -> None:
    b = make()
    async with b.subscribe("a", "b") as sub, b.subscribe(patterns=["c*"]) as other:
        killed = await real_redis.client_kill_filter(_type="pubsub")
        assert killed == 1
        for s in (sub, other):
            event = await s.get(DEFAULT_DEADLINE)
            assert isinstance(event, Reconnected), event
            assert event.may_have_missed and event.gap >= 0 and "closed" in event.reason.lower()
        raw = b.channel_name("a")
        assert dict(await real_redis.pubsub_numsub(raw))[raw.encode()] == 1
        assert await real_redis.pubsub_numpat() == 1
        await b.publish("b", "after")
        await b.publish("c1", "pattern after")
        assert (await next_message(sub)).data == "after"
        assert (await next_message(other)).data == "pattern after"
    stats = b.stats()
    assert stats["reconnects"] == 1 and stats["errors"] == 1
    assert "Connection closed" in str(stats["last_error"])


async def test_half_open_link_is_found_by_unanswered_pings(
    make: BroadcasterFactory,
    tcp_proxy: Callable[..., TcpProxy],
    client_via: Callable[..., Redis],
    real_redis: Redis,
) -> None:
    proxy = tcp_proxy()
    b = make(client_via(proxy.url))
    publisher = make()  # straight to the server
    async with b.subscribe("a") as sub:
        proxy.stall()  # the TCP connection stays open; nothing flows: only a PONG check notices
        await eventually(lambda: b.stats()["errors"] >= 1)
        assert "no PONG within 0.3s" in str(b.stats()["links"][0]["last_error"])
        await asyncio.sleep(0.3)  # reconnect attempts stall too (connect_timeout)
        proxy.resume()
        event = await sub.get(DEFAULT_DEADLINE)
        assert isinstance(event, Reconnected) and event.gap >= 0.5
        await publisher.publish("a", "fresh")
        assert (await next_message(sub)).data == "fresh"


async def test_never_reading_subscriber_does_not_delay_the_others(
    make: BroadcasterFactory,
) -> None:
    b = make()
    count = 5000
    async with (
        b.subscribe("feed", queue_size=100) as stuck,
        b.subscribe("feed", queue_size=count) as reader,
    ):
        for n in range(count):
            await b.publish("feed", n)
        # all of it reaches the reader while the stuck subscriber reads nothing
        assert [(await next_message(reader)).data for _ in range(count)] == list(range(count))
        assert stuck.pending == 100 and stuck.dropped == count - 100
        assert [(await next_message(stuck)).data for _ in range(100)] == list(
            range(count - 100, count)
        )
    assert b.stats()["dropped"] == count - 100


# -- history ---------------------------------------------------------------------------


async def test_history_replays_messages_published_while_the_link_was_down(
    make: BroadcasterFactory,
    tcp_proxy: Callable[..., TcpProxy],
    client_via: Callable[..., Redis],
) -> None:
    proxy = tcp_proxy()
    b = make(client_via(proxy.url), history=100)
    publisher = make(history=100)  # another process, still connected
    async with b.subscribe("log") as sub:
        await publisher.publish("log", 0)
        assert (await next_message(sub)).data == 0
        proxy.refuse = True
        proxy.cut()
        await eventually(lambda: b.stats()["errors"] >= 1)
        for n in (1, 2, 3):
            await publisher.publish("log", n)
        proxy.refuse = False
        event = await sub.get(DEFAULT_DEADLINE)
        assert isinstance(event, Reconnected)
        assert (event.may_have_missed, event.replayed) == (False, 3)
        await publisher.publish("log", 4)
        assert [(await next_message(sub)).data for _ in range(4)] == [1, 2, 3, 4]
        assert await sub.get(0.1) is None  # nothing twice
