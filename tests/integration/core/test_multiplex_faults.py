"""Faults on the multiplexed path, with many tasks writing and reading their own keys.

Each of 300 tasks repeatedly SETs its own key to its next number and reads it
back, while the connection is stalled, cut, killed by ``CLIENT KILL`` or the
server is killed (``kill -9``, append-only file fsynced on every write) and
restarted. The rules every fault must keep:

* no call waits past the socket timeout by more than a generous margin (a hang
  would be caught by the 10 s bound around each call: the socket timeout is 0.5 s);
* no task ever reads a value it did not write (a reply delivered to the wrong
  caller would show another task's number or another command's reply);
* nothing acknowledged is lost: at the end every key holds the last value its
  task saw acknowledged, or a later one whose SET failed without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis import exceptions as redis_exc
from redis.asyncio import Redis

from app.core.multiplex import MultiplexedRedis
from app.core.redis import build_client
from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer
from app.testing.waiting import eventually

pytestmark = pytest.mark.integration

TASKS = 300
HANG = 10.0  # seconds: 20 socket timeouts; only a hung call reaches it
LINK_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError)


@dataclass
class Ledger:
    """What each task knows about its own key: the values it may now hold."""

    possible: list[set[int]] = field(default_factory=lambda: [{0} for _ in range(TASKS)])
    wrong: list[tuple[int, Any]] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)
    answered: int = 0
    errors: int = 0


@pytest.fixture
async def durable() -> AsyncIterator[tuple[RedisServer, TcpProxy]]:
    """A server of this test that fsyncs every write, behind a proxy that can stall and cut."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    proxy = TcpProxy(server.host, server.port).start()
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.cleanup()


async def _worker(client: MultiplexedRedis, i: int, ledger: Ledger, stop: asyncio.Event) -> None:
    n = 0
    key = f"own:{i}"
    while not stop.is_set():
        n += 1
        ledger.possible[i].add(n)  # from now on the key may hold n, whatever the answer
        try:
            async with asyncio.timeout(HANG):
                if await client.set(key, n) is True:
                    ledger.possible[i] = {n}  # acknowledged: nothing older may come back
                value = await client.get(key)
        except LINK_ERRORS:
            ledger.errors += 1
            await asyncio.sleep(0.01)  # a failing server: do not spin
            continue
        except TimeoutError:
            ledger.hung.append(i)
            continue
        ledger.answered += 1
        if value is None or int(value) not in ledger.possible[i]:
            ledger.wrong.append((i, value))


async def _inject(fault: str, server: RedisServer, proxy: TcpProxy, ledger: Ledger) -> None:
    if fault == "stall":  # bytes stop both ways; the sockets stay open
        errors = ledger.errors
        proxy.stall()
        try:
            await eventually(lambda: ledger.errors > errors, "callers time out on the stall")
        finally:
            proxy.resume()
    elif fault == "cut":
        proxy.cut()
    elif fault == "client_kill":
        admin = Redis(host=server.host, port=server.port)
        try:
            await admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            await admin.aclose()
    else:  # kill -9 and start again on the same port and append-only file
        await asyncio.to_thread(server.restart)


@pytest.mark.parametrize("fault", ["stall", "cut", "client_kill", "kill_restart"])
async def test_every_task_reads_its_own_writes_and_keeps_them_under_faults(
    durable: tuple[RedisServer, TcpProxy], settings_override: Callable[..., None], fault: str
) -> None:
    server, proxy = durable
    settings_override(
        redis_url=proxy.url,
        redis_autopipeline=True,
        redis_socket_timeout=0.5,
        redis_connect_timeout=0.5,
        redis_retry_attempts=0,  # every fault reaches the callers: nothing hides it
    )
    client = build_client()
    assert isinstance(client, MultiplexedRedis)
    ledger = Ledger()
    stop = asyncio.Event()
    plain = Redis(host=server.host, port=server.port)
    try:
        await plain.mset({f"own:{i}": 0 for i in range(TASKS)})
        workers = [asyncio.create_task(_worker(client, i, ledger, stop)) for i in range(TASKS)]
        for _ in range(3):
            await eventually(lambda: ledger.answered > 1000, "the tasks are being answered")
            ledger.answered = 0
            await _inject(fault, server, proxy, ledger)
        await eventually(lambda: ledger.answered > 1000, "the tasks are answered after the faults")
        stop.set()
        await asyncio.gather(*workers)
        final = await plain.mget([f"own:{i}" for i in range(TASKS)])
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await client.aclose()
        await plain.aclose()
    assert ledger.hung == []
    assert ledger.wrong == []
    assert ledger.errors > 0  # the faults did hit commands in flight
    lost = [
        (i, value)
        for i, value in enumerate(final)
        if value is None or int(value) not in ledger.possible[i]
    ]
    assert lost == []
    mux = client.multiplexer
    assert mux is not None and mux.connects >= 2  # the links were replaced, not reused broken
