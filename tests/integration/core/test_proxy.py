"""The fault-injecting TCP proxy, and the client's bounded behaviour behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from app.core.errors import RedisUnavailable
from app.core.redis import breaker_for, build_client
from app.testing.proxy import TcpProxy

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
