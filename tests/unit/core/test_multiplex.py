"""Which client ``build_client`` makes for REDIS_AUTOPIPELINE, and which commands skip the links.

No network: building a client does not connect. The multiplexed path itself
needs a socket and is tested on real servers in
``tests/integration/core/test_multiplex*.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from app.core.config import Settings
from app.core.multiplex import MultiplexedRedis, NodeMultiplexer, goes_to_pool, pack_command
from app.core.multiplex_cluster import ClusterMultiplexing
from app.core.redis import SentinelManagedRedis, build_client


async def test_the_setting_is_on_by_default_and_false_turns_it_off(
    settings_override: Callable[..., None],
) -> None:
    settings_override(redis_url="redis://127.0.0.1:6390/0", redis_autopipeline=None)
    client = build_client()
    try:
        assert isinstance(client, MultiplexedRedis)
        assert client.multiplexer is not None
    finally:
        await client.aclose()
    settings_override(redis_autopipeline=False)
    assert type(build_client()) is Redis


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/2", "rediss://127.0.0.1:6390/0", "unix:///tmp/r.sock"]
)
async def test_on_for_standalone_urls(settings_override: Callable[..., None], url: str) -> None:
    settings_override(
        redis_url=url,
        redis_autopipeline=True,
        redis_autopipeline_links=3,
        redis_autopipeline_max_in_flight=50,
        redis_pool_timeout=1.5,
    )
    client = build_client()
    try:
        assert isinstance(client, MultiplexedRedis)
        mux = client.multiplexer
        assert isinstance(mux, NodeMultiplexer)
        assert (mux.size, mux.max_in_flight, mux.slot_timeout) == (3, 50, 1.5)
        assert mux.pool is client.connection_pool
    finally:
        await client.aclose()


async def test_sentinel_primary_clients_are_multiplexed_and_follow_the_master(
    settings_override: Callable[..., None],
) -> None:
    settings_override(
        redis_url="redis+sentinel://127.0.0.1:26390/mymaster/0", redis_autopipeline=True
    )
    client: Any = build_client()
    try:
        assert isinstance(client, MultiplexedRedis)
        mux = client.multiplexer
        assert mux is not None and mux.follows_master  # READONLY closes the link
        assert isinstance(client, SentinelManagedRedis)  # aclose still closes the sentinels
        assert client.sentinel_manager is not None
    finally:
        await client.aclose()


@pytest.mark.parametrize("on", [False, True])
async def test_cluster_clients_are_multiplexed_per_node_when_on(
    settings_override: Callable[..., None], on: bool
) -> None:
    settings_override(redis_url="redis+cluster://127.0.0.1:7390", redis_autopipeline=on)
    client: Any = build_client()  # a cluster client connects on its first command
    try:
        assert isinstance(client, ClusterMultiplexing) == on
    finally:
        await client.aclose()


async def test_single_connection_clients_do_not_use_the_links(
    settings_override: Callable[..., None],
) -> None:
    settings_override(redis_url="redis://127.0.0.1:6390/0", redis_autopipeline=True)
    client = build_client()
    assert isinstance(client, MultiplexedRedis)
    single: Any = client.client()  # redis-py's own single-connection client (a copy of the class)
    assert single.multiplexer is None
    await client.aclose()


@pytest.mark.parametrize(
    "args",
    [
        ("BLPOP", "q", 0),
        (b"brpop", "q", 0),
        ("BLMOVE", "a", "b", "LEFT", "RIGHT", 1),
        ("BZPOPMIN", "z", 1),
        ("WAIT", 1, 0),
        ("XREAD", "BLOCK", 100, "STREAMS", "s", "$"),
        ("XREADGROUP", "GROUP", "g", "c", "block", 100, "STREAMS", "s", ">"),
        ("CLIENT SETNAME", "x"),
        ("CLIENT", "KILL", "ID", 1),
        ("SELECT", 1),
        ("WATCH", "k"),
        ("MULTI",),
        ("EXEC",),
        ("SUBSCRIBE", "ch"),
        ("MONITOR",),
        ("HELLO", 3),
        ("AUTH", "pw"),
        ("SHUTDOWN", "NOSAVE"),
        ("DEBUG", "SLEEP", 1),
    ],
)
def test_commands_that_own_a_connection_go_to_the_pool(args: tuple[Any, ...]) -> None:
    assert goes_to_pool(args)


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "k"),
        ("SET", "k", "v", "EX", 10),
        ("EVALSHA", "0" * 40, 1, "k"),
        ("XREAD", "COUNT", 10, "STREAMS", "s", "0"),
        ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"),
        ("XREAD", "STREAMS", "block", "0"),  # a stream named "block" is data, not an option
        ("CONFIG GET", "maxmemory"),
        ("SCRIPT LOAD", "return 1"),
        ("PUBLISH", "ch", "m"),
    ],
)
def test_stateless_commands_use_the_links(args: tuple[Any, ...]) -> None:
    assert not goes_to_pool(args)


@pytest.mark.parametrize(
    "values",
    [
        {"redis_autopipeline_links": 0},
        {"redis_autopipeline_links": 17},
        {"redis_autopipeline_max_in_flight": 0},
    ],
)
def test_bad_values_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


_ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
_NAME = st.one_of(
    st.sampled_from(["GET", "EVALSHA", "CLIENT LIST", "SCRIPT LOAD", "XADD"]),
    st.sampled_from([b"GET", b"SCRIPT LOAD"]),
)


@settings(max_examples=300, deadline=None)
@given(name=_NAME, args=st.lists(_ARG, max_size=8))
def test_the_links_send_the_bytes_redis_py_sends(name: Any, args: list[Any]) -> None:
    """The links' packer (hiredis straight on str/bytes/int) against redis-py's own: the
    same bytes for every command, and the same error for what redis-py refuses."""
    command = (name, *args)
    redis_py = Connection(encoding="utf-8", encoding_errors="strict")
    try:
        expected: Any = b"".join(redis_py.pack_command(*command))
    except (DataError, UnicodeEncodeError) as exc:
        expected = type(exc)
    try:
        got: Any = b"".join(pack_command(command))
    except (DataError, UnicodeEncodeError) as exc:
        got = type(exc)
    assert got == expected
