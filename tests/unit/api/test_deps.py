"""app.api.deps: the dependencies that keep one service per client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
import pytest_asyncio

from app.api.deps import request_lock, request_semaphore, stream_producer
from app.core import redis as core_redis
from app.core.errors import ConfigurationError


@pytest_asyncio.fixture
async def two_clients() -> AsyncIterator[tuple[fakeredis.FakeAsyncRedis, ...]]:
    clients = tuple(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()) for _ in range(2))
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


async def test_stream_producer_builds_one_producer_per_client(
    two_clients: tuple[fakeredis.FakeAsyncRedis, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_clients
    dependency = stream_producer("events", maxlen=10)
    monkeypatch.setattr(core_redis, "redis_client", first)
    producer = await dependency()
    assert await dependency() is producer and producer.redis is first
    monkeypatch.setattr(core_redis, "redis_client", second)
    other = await dependency()
    assert other is not producer and other.redis is second
    monkeypatch.setattr(core_redis, "redis_client", first)
    assert await dependency() is producer  # kept with its client, not rebuilt
    assert await producer.add({"n": 1})
    assert (await first.dbsize(), await second.dbsize()) == (1, 0)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "30"])
def test_lock_dependencies_refuse_bad_durations_when_declared(timeout: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        request_lock("jobs:{job_id}", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="timeout"):
        request_semaphore("exports", limit=2, timeout=timeout)  # type: ignore[arg-type]
