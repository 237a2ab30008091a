"""The fault-injecting TCP proxy, and the client's bounded behaviour behind it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from app.core.errors import RedisUnavailable
from app.core.redis import breaker_for, build_client
from app.testing.proxy import TcpProxy
from app.testing.waiting import eventually

pytestmark = pytest.mark.integration


def client_through(proxy: TcpProxy, settings_override: Callable[..., None]) -> Any:
    settings_override(
        redis_url=proxy.url,
        redis_socket_timeout=0.3,
        redis_connect_timeout=0.3,
        redis_retry_attempts=1,
        breaker_failure_threshold=2,
        breaker_reset_timeout=0.2,
    )
    return build_client()


async def test_a_stalled_link_times_out_within_the_socket_bound_then_recovers(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> None:
    proxy = tcp_proxy()
    client = client_through(proxy, settings_override)
    try:
        assert await client.ping()
        proxy.stall()
        # bounded by socket timeout x (1 + retries) plus backoff: well under this outer bound
        async with asyncio.timeout(5):
            with pytest.raises(RedisUnavailable), breaker_for(client):
                await client.get("k")
        proxy.resume()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_cut_connections_are_replaced_transparently(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> None:
    proxy = tcp_proxy()
    client = client_through(proxy, settings_override)
    try:
        await client.set("k", b"v")
        accepted = proxy.connections_accepted
        proxy.cut()
        assert await client.get("k") == b"v"  # the retry reconnects
        assert proxy.connections_accepted > accepted
    finally:
        await client.aclose()


async def test_refused_connections_open_the_breaker(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> None:
    proxy = tcp_proxy()
    proxy.refuse = True
    client = client_through(proxy, settings_override)
    breaker = breaker_for(client)
    try:
        for _ in range(2):
            with pytest.raises(RedisUnavailable), breaker:
                await client.ping()
        assert breaker.stats()["state"] == "open"
        proxy.refuse = False
        await asyncio.sleep(0.25)
        with breaker:
            assert await client.ping()
        assert breaker.stats()["state"] == "closed"
    finally:
        await client.aclose()


async def test_latency_is_added_to_every_round_trip(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> None:
    proxy = tcp_proxy()
    proxy.latency = 0.5  # longer than the socket timeout: replies now arrive too late
    client = client_through(proxy, settings_override)
    try:
        with pytest.raises(RedisUnavailable), breaker_for(client):
            await client.ping()
        proxy.latency = 0.0
        assert await client.ping()
    finally:
        await client.aclose()


async def test_counting_sees_commands_sent_not_commands_scripts_run(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> None:
    proxy = tcp_proxy()
    client = client_through(proxy, settings_override)
    try:
        await client.ping()
        async with client.pipeline(transaction=False) as warm:  # pipelines use a pooled
            warm.ping()  # connection: open it too, so no handshake is counted below
            await warm.execute()
        proxy.count = True
        await client.eval("redis.call('SET','a','1'); return redis.call('GET','a')", 0)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.set(f"k{i}", b"x" * 100_000 if i == 50 else b"v")
            await pipe.execute()
        assert proxy.commands == 101  # 1 EVAL + 100 pipelined SETs, none of the script's calls
        assert proxy.writes < 101  # the pipeline went out in bursts, not one write per command
    finally:
        await client.aclose()


async def test_close_leaves_no_socket_open_behind_it(
    tcp_proxy: Callable[..., TcpProxy],
) -> None:
    """Connections open, and connections arriving while it closes, are all reset and freed.

    A socket the proxy's thread left open would warn (``ResourceWarning``) in
    whichever later test the garbage collector happened to run.
    """
    proxy = tcp_proxy()
    live = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(5)]
    for _, writer in live:  # each connection reaches Redis and back
        writer.write(b"PING\r\n")
    for reader, _ in live:
        assert await reader.readline() == b"+PONG\r\n"
    arriving = [
        asyncio.create_task(asyncio.open_connection("127.0.0.1", proxy.port)) for _ in range(20)
    ]
    await asyncio.to_thread(proxy.close)
    late = await asyncio.gather(*arriving, return_exceptions=True)
    try:
        for reader, _ in live + [pair for pair in late if isinstance(pair, tuple)]:
            async with asyncio.timeout(5):  # the proxy's side is closed: end of stream, or reset
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    finally:
        for _, writer in live + [pair for pair in late if isinstance(pair, tuple)]:
            writer.close()


async def test_close_frees_a_connection_whose_upstream_connect_hangs() -> None:
    """Upstream never completes the handshake (its accept queue is full): close() still frees
    the client's connection instead of stopping its loop with the socket open."""
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(0)
    filler = [socket.socket() for _ in range(4)]
    for s in filler:  # fill the accept queue: later handshakes get no answer
        s.setblocking(False)
        s.connect_ex(upstream.getsockname())
    proxy = TcpProxy(*upstream.getsockname()).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await eventually(lambda: proxy.connections_accepted == 1, "the proxy took the connection")
        await asyncio.to_thread(proxy.close)
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        writer.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    finally:
        proxy.close()
        for s in filler:
            s.close()
        upstream.close()
