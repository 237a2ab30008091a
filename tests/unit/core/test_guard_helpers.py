"""The helpers every service shares: durations, reply text, block caps, one service per client."""

from __future__ import annotations

import datetime as dt
import gc
import math
import weakref
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis, RedisCluster

from app.core.errors import ConfigurationError
from app.core.guard import PerClient, as_seconds, as_text, block_cap, socket_timeout, to_ms
from app.testing.servers import free_port

# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0.25, 0.25),
        (dt.timedelta(minutes=2, seconds=30), 150.0),
        (dt.timedelta(microseconds=1), 1e-6),
        (10**9, 1e9),
    ],
)
def test_durations_accept_numbers_and_timedeltas(value: Any, seconds: float) -> None:
    assert as_seconds(value, "ttl") == seconds
    assert type(as_seconds(value, "ttl")) is float


@pytest.mark.parametrize(
    "bad",
    [
        True,
        False,
        None,
        "5",
        b"5",
        [5],
        math.nan,
        -math.nan,
        math.inf,
        -math.inf,
        10**400,  # past float range
        -1,
        -0.001,
        dt.timedelta(seconds=-1),
        0,
        0.0,
        dt.timedelta(0),
    ],
)
def test_durations_refuse_everything_else_with_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^lease must be") as info:
        as_seconds(bad, "lease")
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert repr(bad) in str(info.value)


def test_zero_is_allowed_only_when_asked() -> None:
    assert as_seconds(0, "blocking_timeout", allow_zero=True) == 0.0
    assert as_seconds(dt.timedelta(0), "blocking_timeout", allow_zero=True) == 0.0
    with pytest.raises(ConfigurationError, match=">= 0"):
        as_seconds(-1, "blocking_timeout", allow_zero=True)
    with pytest.raises(ConfigurationError):
        as_seconds(math.nan, "blocking_timeout", allow_zero=True)


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [
        (1.0, 1000),
        (1.1, 1100),  # float noise (1100.0000000000002) is not a millisecond more
        (0.3, 300),
        (86400, 86_400_000),
        (1.0004, 1001),  # up: never shorter than asked
        (1.0015, 1002),
        (0.0001, 1),  # any positive duration is at least 1 ms
        (1e-10, 1),
        (0.0, 0),
    ],
)
def test_milliseconds_round_up(seconds: float, ms: int) -> None:
    assert to_ms(seconds) == ms


# -- text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (b"plain", "plain"),
        ("d\u00e9j\u00e0", "d\u00e9j\u00e0"),
        ("d\u00e9j\u00e0".encode(), "d\u00e9j\u00e0"),
        (b"\xff\xfeok", "\ufffd\ufffdok"),  # invalid UTF-8 is replaced, never raised
        (bytearray(b"ba"), "ba"),
        (memoryview(b"mv"), "mv"),
        (42, "42"),
        (1.5, "1.5"),
        (b"", ""),
    ],
)
def test_replies_become_text(reply: Any, text: str) -> None:
    assert as_text(reply) == text


def test_none_stays_none() -> None:
    assert as_text(None) is None


async def test_text_is_the_same_for_both_kinds_of_client() -> None:
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeAsyncRedis(server=server)
    decoded = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    try:
        await raw.set("k", "caf\u00e9")
        assert as_text(await raw.get("k")) == as_text(await decoded.get("k")) == "caf\u00e9"
        assert as_text(await raw.incr("n")) == "1"
    finally:
        await raw.aclose()
        await decoded.aclose()


# -- block caps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "longest", "cap"),
    [
        (1.0, 5.0, 0.75),  # a quarter of the timeout early
        (0.5, 30.0, 0.35),  # at least 0.15 s early
        (0.1, 1.0, 0.01),  # never below 10 ms
        (10.0, 1.0, 1.0),  # never above the longest wait asked for
        (4.0, 30.0, 3.0),
    ],
)
async def test_a_blocking_wait_ends_before_the_socket_timeout(
    timeout: float, longest: float, cap: float
) -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), socket_timeout=timeout)
    try:
        assert socket_timeout(client) == timeout
        assert block_cap(client, longest) == pytest.approx(cap)
    finally:
        await client.aclose()


async def test_without_a_socket_timeout_the_longest_wait_is_used() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), socket_timeout=None)  # never connects
    try:
        assert socket_timeout(client) is None
        assert block_cap(client) == 1.0
        assert block_cap(client, 7.5) == 7.5
    finally:
        await client.aclose()
    assert socket_timeout(object()) is None and block_cap(object(), 2.0) == 2.0


async def test_a_cluster_client_reports_its_socket_timeout() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=free_port(), socket_timeout=2.0)  # not started
    try:
        assert socket_timeout(cluster) == 2.0
        assert block_cap(cluster, 30.0) == 1.5
    finally:
        await cluster.aclose()


# -- one service per client -----------------------------------------------------------------------


class Service:
    def __init__(self, client: Any) -> None:
        self.client = client


async def test_one_instance_per_client_built_on_first_use() -> None:
    built: list[Any] = []

    def build(client: Any) -> Service:
        built.append(client)
        return Service(client)

    services = PerClient(build)
    a = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    b = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        assert services.get(a) is None  # get builds nothing
        first = services(a)
        assert services(a) is first and services.get(a) is first
        assert services(b) is not first and services(b).client is b
        assert built == [a, b]
        other = PerClient(Service)  # another owner: its own instances on the same client
        assert other(a) is not first
    finally:
        await a.aclose()
        await b.aclose()


async def test_set_and_discard_replace_the_instance() -> None:
    services: PerClient[Service] = PerClient(Service)
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        mine = Service(client)
        services.set(client, mine)
        assert services(client) is mine
        services.discard(client)
        assert services.get(client) is None
        assert services(client) is not mine
        services.discard(object())  # nothing to forget: no error
    finally:
        await client.aclose()


def test_an_instance_lives_as_long_as_its_client_and_no_longer() -> None:
    services: PerClient[Service] = PerClient(Service)
    client = Redis(host="127.0.0.1", port=free_port())  # never connects
    service = weakref.ref(services(client))
    dropped = weakref.ref(client)
    del client
    gc.collect()
    assert dropped() is None and service() is None
    assert services.get(object()) is None


def test_objects_without_a_dict_fall_back_to_a_weak_mapping() -> None:
    class Slotted:
        __slots__ = ("__weakref__",)

    counters: PerClient[list[int]] = PerClient(lambda _client: [])
    key = Slotted()
    counters(key).append(1)
    assert counters(key) == [1]
    counters.set(key, [2])
    assert counters.get(key) == [2]
    counters.discard(key)
    assert counters.get(key) is None
