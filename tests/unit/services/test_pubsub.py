"""Broadcaster on fakeredis: fan-out, queues and overflow, supervision, history, HTTP helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import fakeredis
import orjson
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from pydantic import BaseModel
from starlette.websockets import WebSocket

from app.api.streaming import EventStreamResponse, serve_websocket
from app.core import redis as core_redis
from app.core.errors import (
    ConfigurationError,
    PatternTooComplex,
    RedisUnavailable,
    SubscriberOverflow,
)
from app.services.pubsub import Broadcaster, Message, Reconnected
from app.testing.slots import slot_checking_fake_redis
from app.testing.waiting import DEFAULT_DEADLINE, eventually

FAST = {
    "ping_interval": 0.05,
    "ping_timeout": 0.3,
    "backoff_base": 0.02,
    "backoff_cap": 0.1,
    "subscribe_timeout": 2.0,
    "drain_timeout": 1.0,
}


class Chat(BaseModel):
    user: str
    text: str


@pytest.fixture
def client(fake_client: Any) -> Any:
    """A fakeredis client (on the plugin's ``fake_server``) with decode_responses False and True."""
    return fake_client


BroadcasterFactory = Callable[..., Broadcaster]


@pytest_asyncio.fixture
async def make(client: Any) -> AsyncIterator[BroadcasterFactory]:
    made: list[Broadcaster] = []

    def factory(redis: Any = None, **options: Any) -> Broadcaster:
        broadcaster = Broadcaster(client if redis is None else redis, **{**FAST, **options})
        made.append(broadcaster)
        return broadcaster

    yield factory
    for broadcaster in made:
        await broadcaster.aclose(drain_timeout=0.5)


async def next_message(sub: Any, timeout: float = DEFAULT_DEADLINE) -> Message[Any]:
    event = await sub.get(timeout)
    assert isinstance(event, Message), f"expected a message, got {event!r}"
    return event


# -- round trips ----------------------------------------------------------------


async def test_json_round_trip_and_typed_payloads(make: BroadcasterFactory) -> None:
    b = make()
    async with b.subscribe("room") as raw, b.subscribe("room", type_=Chat) as typed:
        await b.publish("room", {"user": "ann", "text": "hi"})
        await b.publish("room", Chat(user="bob", text="yo"))
        first, second = await next_message(raw), await next_message(raw)
        assert (first.channel, first.data) == ("room", {"user": "ann", "text": "hi"})
        assert second.data == {"user": "bob", "text": "yo"}
        assert (await next_message(typed)).data == Chat(user="ann", text="hi")
        assert (await next_message(typed)).data == Chat(user="bob", text="yo")


async def test_undecodable_and_mistyped_messages_are_skipped_and_counted(
    make: BroadcasterFactory, client: Any
) -> None:
    b = make()
    async with b.subscribe("room", type_=Chat) as sub:
        await client.publish(b.channel_name("room"), b"\x01j-{not json")
        await b.publish("room", {"user": 1})  # fails validation as Chat
        await b.publish("room", Chat(user="ann", text="ok"))
        assert (await next_message(sub)).data == Chat(user="ann", text="ok")
    assert b.stats()["decode_errors"] == 2


async def test_patterns_match_logical_names(make: BroadcasterFactory) -> None:
    b = make()
    async with b.subscribe(patterns=["chat:*"]) as sub:
        await b.publish("chat:1", "a")
        await b.publish("news:1", "ignored")
        await b.publish("chat:a b/ü", "b")
        one, two = await next_message(sub), await next_message(sub)
        assert (one.channel, one.pattern, one.data) == ("chat:1", "chat:*", "a")
        assert (two.channel, two.data) == ("chat:a b/ü", "b")
        assert await sub.get(0.05) is None


async def test_untrusted_channel_names_are_escaped_and_namespaced(
    make: BroadcasterFactory, client: Any
) -> None:
    b = make(namespace="tenant1")
    other = make(namespace="tenant2")
    root = b.keys.prefix
    assert b.channel_name("a:b*{x}") == f"{root}:tenant1:{{a%3Ab%2A%7Bx%7D}}"
    assert b.pattern_name("a:*") == f"{root}:tenant1:{{a%3A*}}"
    async with b.subscribe("*", patterns=["*"]) as sub, other.subscribe(patterns=["*"]) as spy:
        await b.publish("room", 1)  # "*" is a channel name here, not a glob
        message = await next_message(sub)
        assert (message.channel, message.pattern) == ("room", "*")
        await b.publish("*", 2)
        got = {(m.channel, m.pattern) for m in [await next_message(sub), await next_message(sub)]}
        assert got == {("*", None), ("*", "*")}
        assert await spy.get(0.05) is None  # another namespace sees nothing
    with pytest.raises(ConfigurationError):
        b.channel_name("")


async def test_pattern_wildcards_collapse_and_are_capped(make: BroadcasterFactory) -> None:
    b = make()
    assert b.pattern_name("a**:?*") == b.pattern_name("a*:?*")
    with pytest.raises(PatternTooComplex, match=r"pub/sub pattern .* has 30 wildcards; at most 4"):
        b.pattern_name("*?" * 15)
    with pytest.raises(PatternTooComplex):
        async with b.subscribe(patterns=["a*" * 5]):
            pass
    async with b.subscribe(patterns=["a***b"]) as sub:  # still matches as a*b
        await b.publish("axxb", 1)
        assert (await next_message(sub)).channel == "axxb"


async def test_leaving_unsubscribes_from_redis(make: BroadcasterFactory, client: Any) -> None:
    b = make()
    raw = b.channel_name("room")
    async with b.subscribe("room"), b.subscribe("room"):
        assert dict(await client.pubsub_numsub(raw))[_same(client, raw)] == 1

    async def unsubscribed() -> bool:
        return bool(dict(await client.pubsub_numsub(raw))[_same(client, raw)] == 0)

    await eventually(unsubscribed, "the link to unsubscribe from Redis")
    assert b.stats()["channels"] == 0
    async with b.subscribe("room") as again:  # subscribe again right away
        await b.publish("room", "back")
        assert (await next_message(again)).data == "back"


async def test_resubscribing_before_the_unsubscribe_is_sent(make: BroadcasterFactory) -> None:
    b = make()
    for n in range(5):
        async with b.subscribe("room") as sub:
            await b.publish("room", n)
            assert (await next_message(sub)).data == n


def _same(client: Any, raw: str) -> Any:
    return raw if core_redis.client_decodes_responses(client) else raw.encode()


# -- bounded queues -------------------------------------------------------------


async def test_drop_oldest_keeps_the_newest_and_counts(make: BroadcasterFactory) -> None:
    b = make()
    async with b.subscribe("feed", queue_size=3) as slow, b.subscribe("feed") as fast:
        for n in range(10):
            await b.publish("feed", n)
        assert [(await next_message(fast)).data for _ in range(10)] == list(range(10))
        assert [(await next_message(slow)).data for _ in range(3)] == [7, 8, 9]
        assert slow.dropped == 7 and fast.dropped == 0
    assert b.stats()["dropped"] == 7


async def test_disconnect_policy_ends_only_the_slow_subscriber(make: BroadcasterFactory) -> None:
    b = make(overflow="disconnect")
    async with b.subscribe("feed", queue_size=2) as slow, b.subscribe("feed") as fast:
        for n in range(5):
            await b.publish("feed", n)
        assert [(await next_message(fast)).data for _ in range(5)] == list(range(5))
        with pytest.raises(SubscriberOverflow) as info:
            await slow.get(DEFAULT_DEADLINE)
        assert info.value.queue_size == 2
        assert slow.closed
    assert b.stats()["overflow_disconnects"] == 1


async def test_reconnected_events_survive_overflow(
    make: BroadcasterFactory, fake_server: fakeredis.FakeServer
) -> None:
    b = make()
    async with b.subscribe("feed", queue_size=2) as sub:
        for n in range(3):
            await b.publish("feed", n)
        # Delivered before the outage (0 dropped to make room for 2): a message still on
        # its way when the link goes down is lost with it, and nothing would be dropped.
        await eventually(lambda: sub.dropped == 1, "messages 0-2 delivered, 0 dropped")
        await _outage(b, fake_server)
        await b.publish("feed", 3)
        await eventually(lambda: sub.dropped == 2, "1 dropped to make room for 3")
        events = [await sub.get(DEFAULT_DEADLINE) for _ in range(3)]
        assert isinstance(events[0], Message) and events[0].data == 2
        assert isinstance(events[1], Reconnected)
        assert isinstance(events[2], Message) and events[2].data == 3


# -- supervision ----------------------------------------------------------------


async def _outage(b: Broadcaster, server: fakeredis.FakeServer, seconds: float = 0.3) -> None:
    """Take the fake server down until the link has noticed, then bring it back; returns once
    the link has reconnected and its subscriptions are active again (a gap is recorded)."""
    reconnects, gap = b.stats()["reconnects"], b.stats()["last_gap_seconds"]
    server.connected = False
    await eventually(lambda: b.stats()["links"][0]["state"] != "connected")
    await asyncio.sleep(seconds)
    server.connected = True
    await eventually(
        lambda: b.stats()["reconnects"] > reconnects and b.stats()["last_gap_seconds"] != gap,
        "the link to reconnect and resubscribe",
    )


async def test_outage_gives_reconnected_with_gap_then_messages_flow(
    make: BroadcasterFactory, fake_server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    b = make()
    async with b.subscribe("a", patterns=["b*"]) as sub, b.subscribe("a") as other:
        await _outage(b, fake_server)
        for s in (sub, other):
            event = await s.get(DEFAULT_DEADLINE)
            assert isinstance(event, Reconnected)
            assert event.may_have_missed and event.gap >= 0.3 and event.reason
        await b.publish("a", 1)
        await b.publish("b1", 2)
        assert (await next_message(sub)).data == 1
        assert (await next_message(sub)).data == 2
        assert (await next_message(other)).data == 1
    stats = b.stats()
    assert stats["reconnects"] == 1 and stats["errors"] >= 1 and stats["last_error"]
    assert stats["last_gap_seconds"] >= 0.3
    assert "pub/sub link main lost" in caplog.text


async def test_subscribe_during_outage_waits_then_raises(
    make: BroadcasterFactory, fake_server: fakeredis.FakeServer
) -> None:
    b = make(subscribe_timeout=0.3)
    fake_server.connected = False
    with pytest.raises(RedisUnavailable, match="did not confirm"):
        async with b.subscribe("a"):
            pass  # pragma: no cover - never entered
    assert b.stats()["subscribers"] == 0 and b.stats()["channels"] == 0
    with pytest.raises(RedisUnavailable):
        await b.publish("a", 1)
    assert b.stats()["publish_errors"] == 1
    fake_server.connected = True
    async with b.subscribe("a") as sub:  # recovers by itself
        await b.publish("a", 1)
        assert (await next_message(sub)).data == 1


async def test_subscriber_joining_during_outage_gets_no_stale_reconnected(
    make: BroadcasterFactory, fake_server: fakeredis.FakeServer
) -> None:
    b = make()
    async with b.subscribe("a") as early:
        fake_server.connected = False
        await eventually(lambda: b.stats()["links"][0]["state"] != "connected")
        joining = asyncio.create_task(_join_and_read(b))
        await eventually(lambda: b.stats()["subscribers"] == 2, "a subscriber to join mid-outage")
        fake_server.connected = True
        assert isinstance(await early.get(DEFAULT_DEADLINE), Reconnected)
        await b.publish("a", "after")
        assert await joining == "after"


async def _join_and_read(b: Broadcaster) -> Any:
    async with b.subscribe("a") as late:
        return (await next_message(late)).data


# -- history (catch-up) -------------------------------------------------------------


async def test_history_replays_after_last_id_without_duplicates(
    make: BroadcasterFactory, client: Any
) -> None:
    b = make(history=100)
    ids = [(await b.publish("log", n)).id for n in range(5)]
    assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, str(i).split("-"))))
    ttl = await client.pttl(b.history_key("log"))
    assert 0 < ttl <= 3_600_000
    async with b.subscribe("log", last_ids={"log": str(ids[1])}) as sub:
        await b.publish("log", 5)
        got = [await next_message(sub) for _ in range(4)]
        assert [m.data for m in got] == [2, 3, 4, 5]
        assert sub.last_ids == {"log": got[-1].id}
        assert await sub.get(0.05) is None


async def test_history_reconnect_replays_what_the_gap_missed(
    make: BroadcasterFactory, client: Any, fake_server: fakeredis.FakeServer
) -> None:
    b = make(history=100)
    publisher = make(history=100)  # another "process": publishes while b's link is down
    async with b.subscribe("log") as sub:
        await b.publish("log", 0)
        assert (await next_message(sub)).data == 0
        fake_server.connected = False
        await eventually(lambda: b.stats()["links"][0]["state"] != "connected")
        fake_server.connected = True
        # Published while b reconnects: live copies (if any) and the replay never double up.
        await publisher.publish("log", 1)
        await publisher.publish("log", 2)
        event = await sub.get(DEFAULT_DEADLINE)
        assert isinstance(event, Reconnected)
        assert event.may_have_missed is False and event.replayed == 2
        await b.publish("log", 3)
        assert [(await next_message(sub)).data for _ in range(3)] == [1, 2, 3]
        assert await sub.get(0.05) is None


async def test_history_trimmed_past_last_id_is_reported(make: BroadcasterFactory) -> None:
    b = make(history=3)
    first = (await b.publish("log", 0)).id
    for n in range(1, 400):
        await b.publish("log", n)
    async with b.subscribe("log", last_ids={"log": str(first)}) as sub:
        event = await sub.get(DEFAULT_DEADLINE)
        assert isinstance(event, Reconnected) and event.may_have_missed
        assert event.replayed >= 3
        rest = [await next_message(sub) for _ in range(event.replayed)]
        assert rest[-1].data == 399


async def test_invalid_last_id_is_ignored(make: BroadcasterFactory) -> None:
    b = make(history=10)
    await b.publish("log", "old")
    async with b.subscribe("log", last_ids={"log": "not-an-id"}) as sub:
        await b.publish("log", "new")
        assert (await next_message(sub)).data == "new"


# -- lifecycle and configuration --------------------------------------------------------


async def test_aclose_drains_queued_messages_then_ends(make: BroadcasterFactory) -> None:
    b = make()
    received: list[Any] = []

    async def consume() -> None:
        async with b.subscribe("a") as sub:
            await b.publish("a", 1)
            await b.publish("a", 2)
            await eventually(lambda: sub.pending == 2)
            await eventually(lambda: b.stats()["state"] == "closed", "aclose() to begin")
            async for event in sub:
                assert isinstance(event, Message)
                received.append(event.data)

    task = asyncio.create_task(consume())
    await eventually(lambda: b.stats()["delivered"] == 2)
    await b.aclose()
    await asyncio.wait_for(task, DEFAULT_DEADLINE)
    assert received == [1, 2]
    assert b.stats()["state"] == "closed"
    with pytest.raises(RuntimeError, match="closed"):
        async with b.subscribe("a"):
            pass  # pragma: no cover


async def test_aclose_is_bounded_by_drain_timeout(make: BroadcasterFactory) -> None:
    b = make()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> None:
        async with b.subscribe("a"):
            entered.set()
            await release.wait()  # ignores the end of its iteration

    task = asyncio.create_task(stubborn())
    await entered.wait()
    await asyncio.wait_for(b.aclose(drain_timeout=0.1), DEFAULT_DEADLINE)
    release.set()
    await task


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"overflow": "block"}, "overflow policy"),
        ({"queue_size": 0}, "queue_size"),
        ({"sharded": True}, "RedisCluster"),
        ({"history_ttl": 0}, "history_ttl"),
    ],
)
def test_bad_options_are_refused(fake_redis: Any, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Broadcaster(fake_redis, **options)


async def test_subscribe_needs_a_channel(make: BroadcasterFactory) -> None:
    with pytest.raises(ConfigurationError):
        make().subscribe()


# -- HTTP helpers through ASGI ------------------------------------------------------


@dataclass
class Demo:
    asgi: Any  # the app as the server calls it (lifespan state included)
    broadcaster: Broadcaster


@pytest_asyncio.fixture
async def demo(fake_server: fakeredis.FakeServer) -> AsyncIterator[Demo]:
    """The demo app with its lifespan running, wired to a fakeredis client."""
    from app.main import create_app

    redis = slot_checking_fake_redis(server=fake_server)
    core_redis.redis_client = redis
    app = create_app()
    async with LifespanManager(app) as manager:
        yield Demo(manager.app, app.state.broadcaster)
    assert app.state.broadcaster is None  # drained and released by the lifespan
    await redis.aclose()


class AsgiCall:
    """Drive one ASGI connection by hand: feed ``receive``, collect ``send``."""

    def __init__(self, app: Any, scope: dict[str, Any], first: dict[str, Any]) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait(first)
        self.task = asyncio.create_task(app(scope, self.inbox.get, self.outbox.put))

    async def sent(self, timeout: float = DEFAULT_DEADLINE) -> dict[str, Any]:
        return await asyncio.wait_for(self.outbox.get(), timeout)

    async def finish(self, message: dict[str, Any]) -> None:
        self.inbox.put_nowait(message)
        await asyncio.wait_for(self.task, DEFAULT_DEADLINE)


def _scope(kind: str, path: str, headers: Iterator[tuple[bytes, bytes]] = iter(())) -> Any:
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
    }


async def _sse_events(call: AsgiCall, count: int) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    buffer = b""
    while len(events) < count:
        message = await call.sent()
        buffer += message.get("body", b"")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                fields[name or "comment"] = value.strip()
            events.append(fields)
    return events


async def test_sse_streams_heartbeats_resumes_and_stops_on_disconnect(demo: Demo) -> None:
    broadcaster = demo.broadcaster
    call = AsgiCall(demo.asgi, _scope("http", "/sse/room"), {"type": "http.request"})
    start = await call.sent()
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache"
    opening = await _sse_events(call, 1)
    assert opening[0]["retry"] == "2000"
    first = (await broadcaster.publish("room", {"n": 1})).id
    await broadcaster.publish("room", {"n": 2})
    events = await _sse_events(call, 2)
    assert [orjson.loads(e["data"])["data"] for e in events] == [{"n": 1}, {"n": 2}]
    assert events[0]["id"] == first
    assert broadcaster.stats()["subscribers"] == 1
    await call.finish({"type": "http.disconnect"})
    await eventually(lambda: broadcaster.stats()["subscribers"] == 0)

    resumed = AsgiCall(
        demo.asgi,
        _scope("http", "/sse/room", iter([(b"last-event-id", str(first).encode())])),
        {"type": "http.request"},
    )
    assert (await resumed.sent())["status"] == 200
    events = await _sse_events(resumed, 2)  # the opening comment, then the replay
    assert orjson.loads(events[1]["data"])["data"] == {"n": 2}
    await resumed.finish({"type": "http.disconnect"})


async def test_sse_heartbeat_comment(demo: Demo) -> None:
    scope = _scope("http", "/sse/quiet")
    scope["query_string"] = b"heartbeat=0.05"
    call = AsgiCall(demo.asgi, scope, {"type": "http.request"})
    assert (await call.sent())["status"] == 200
    events = await _sse_events(call, 3)
    assert events[1] == {"comment": "ping"} and events[2] == {"comment": "ping"}
    await call.finish({"type": "http.disconnect"})


async def test_websocket_streams_json_frames_and_unsubscribes_on_close(demo: Demo) -> None:
    broadcaster = demo.broadcaster
    call = AsgiCall(demo.asgi, _scope("websocket", "/ws/room"), {"type": "websocket.connect"})
    assert (await call.sent())["type"] == "websocket.accept"  # sent once subscribed
    await broadcaster.publish("room", ["hello"])
    frame = orjson.loads((await call.sent())["text"])
    assert (frame["type"], frame["channel"], frame["data"]) == ("message", "room", ["hello"])
    assert frame["id"]  # demo channels keep history: the stream id resumes a socket
    call.inbox.put_nowait({"type": "websocket.receive", "text": "ignored"})
    await call.finish({"type": "websocket.disconnect", "code": 1000})
    await eventually(lambda: broadcaster.stats()["subscribers"] == 0)


async def test_publish_route_and_stats(demo: Demo) -> None:
    import httpx

    transport = httpx.ASGITransport(app=demo.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        broadcaster = demo.broadcaster
        async with broadcaster.subscribe("orders:eu") as sub:
            response = await http.post("/publish/orders:eu", json={"id": 7})
            assert response.status_code == 200
            body = response.json()
            assert body["channel"] == "orders:eu" and body["receivers"] == 1 and body["id"]
            assert (await next_message(sub)).data == {"id": 7}
        stats = (await http.get("/pubsub/stats")).json()
        assert stats["published"] == 1 and stats["state"] == "connected"


async def test_websocket_helper_closes_a_slow_socket_with_1013(make: BroadcasterFactory) -> None:
    b = make()
    gate = asyncio.Event()
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await gate.wait()  # a client that does not read: sends never complete
        sent.append(message)

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    socket = WebSocket(_scope("websocket", "/ws/room"), inbox.get, send)
    task = asyncio.create_task(
        serve_websocket(socket, b, "room", queue_size=2, overflow="disconnect")
    )
    await eventually(lambda: bool(sent))
    assert sent[0]["type"] == "websocket.accept"
    async with b.subscribe("room") as healthy:
        for n in range(10):
            await b.publish("room", n)
        assert [(await next_message(healthy)).data for _ in range(10)] == list(range(10))
    await eventually(lambda: b.stats()["overflow_disconnects"] == 1)
    gate.set()
    await asyncio.wait_for(task, DEFAULT_DEADLINE)
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] == 1013


async def test_sse_answers_503_problem_when_redis_is_down(
    make: BroadcasterFactory, fake_server: fakeredis.FakeServer
) -> None:
    b = make(subscribe_timeout=0.2)
    fake_server.connected = False
    call = AsgiCall(
        EventStreamResponse(b, "room"), _scope("http", "/sse/room"), {"type": "http.request"}
    )
    start = await call.sent()
    assert start["status"] == 503
    assert dict(start["headers"])[b"content-type"] == b"application/problem+json"
    body = orjson.loads((await call.sent())["body"])
    assert body["status"] == 503 and body["instance"] == "/sse/room"
    await asyncio.wait_for(call.task, DEFAULT_DEADLINE)
