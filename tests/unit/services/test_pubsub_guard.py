"""Pub/sub through the guard (fakeredis with Lua): refused and rejected publishes, history
reads behind the breaker, the closed state, and duration validation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ResponseError

from app.core.breaker import breaker_for
from app.core.errors import (
    ConfigurationError,
    RedisCommandError,
    RedisUnavailable,
    StateError,
    ToolkitError,
)
from app.services.pubsub import Broadcaster
from app.testing.slots import slot_checking_fake_redis

FAST = {"ping_interval": 0.05, "ping_timeout": 0.3, "backoff_base": 0.02, "backoff_cap": 0.1}

Make = Callable[..., Broadcaster]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Any, fakeredis.FakeServer]]:
    server = fakeredis.FakeServer()
    client = slot_checking_fake_redis(server=server)
    yield client, server
    server.connected = True
    await client.aclose()


@pytest.fixture
async def make(fake: tuple[Any, fakeredis.FakeServer]) -> AsyncIterator[Make]:
    made: list[Broadcaster] = []

    def factory(**options: Any) -> Broadcaster:
        made.append(Broadcaster(fake[0], **{**FAST, **options}))
        return made[-1]

    yield factory
    for broadcaster in made:
        await broadcaster.aclose(drain_timeout=0.5)


async def _open_the_breaker(client: Any, server: fakeredis.FakeServer) -> None:
    """Fail until the client's breaker opens, then let Redis answer again."""
    breaker = breaker_for(client)
    server.connected = False
    while breaker.state != "open":
        with pytest.raises(RedisUnavailable):
            await Broadcaster(client).publish("probe", 0)
    server.connected = True


async def test_a_refused_publish_is_a_command_error_without_the_redis_text(
    make: Make, fake: tuple[Any, fakeredis.FakeServer]
) -> None:
    client, _ = fake
    b = make(history=10)
    await client.set(b.history_key("room"), "not a stream")
    with pytest.raises(RedisCommandError) as caught:
        await b.publish("room", {"n": 1})
    assert str(caught.value) == "pub/sub publish: Redis refused the command"
    assert isinstance(caught.value.__cause__, ResponseError)  # Redis's text, for the logs
    assert isinstance(caught.value, ToolkitError)  # what callers caught before
    assert b.stats()["publish_errors"] == 1 and b.stats()["published"] == 0
    assert breaker_for(client).state == "closed"  # Redis answered: not an outage


@pytest.mark.parametrize("history", [0, 10], ids=["plain", "history"])
async def test_publish_is_refused_at_once_while_the_breaker_is_open(
    make: Make, fake: tuple[Any, fakeredis.FakeServer], history: int
) -> None:
    client, server = fake
    b = make(history=history)
    await _open_the_breaker(client, server)
    with pytest.raises(RedisUnavailable, match=r"^pub/sub publish: circuit breaker") as caught:
        await b.publish("room", 1)
    assert caught.value.retry_after == breaker_for(client).reset_timeout
    assert b.stats()["publish_errors"] == 1


async def test_history_reads_go_through_the_breaker(
    make: Make, fake: tuple[Any, fakeredis.FakeServer]
) -> None:
    client, server = fake
    b = make(history=10)
    first = await b.publish("room", 1)
    await _open_the_breaker(client, server)
    # The subscription itself is confirmed on the broadcaster's own link; the replay from
    # last_ids is a read through the client, refused while its breaker is open.
    with pytest.raises(RedisUnavailable, match=r"^pub/sub history: circuit breaker"):
        async with b.subscribe("room", last_ids={"room": first.id or ""}):
            pass  # pragma: no cover - never entered


async def test_a_closed_broadcaster_raises_state_error(make: Make) -> None:
    b = make()
    await b.aclose()
    with pytest.raises(StateError, match="closed") as caught:
        await b.start()
    assert isinstance(caught.value, RuntimeError)  # `except RuntimeError` keeps working
    with pytest.raises(StateError):
        async with b.subscribe("room"):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "options",
    [
        {"ping_interval": 0},
        {"ping_timeout": float("nan")},
        {"connect_timeout": -1},
        {"backoff_base": "0.1"},
        {"backoff_cap": float("inf")},
        {"subscribe_timeout": True},
        {"history_ttl": timedelta(0)},
        {"drain_timeout": -0.5},
    ],
    ids=str,
)
def test_bad_durations_are_configuration_errors(
    fake: tuple[Any, fakeredis.FakeServer], options: dict[str, Any]
) -> None:
    name = next(iter(options))
    with pytest.raises(ConfigurationError, match=name):
        Broadcaster(fake[0], **options)


async def test_durations_accept_timedelta(make: Make) -> None:
    b = make(
        ping_interval=timedelta(milliseconds=50),
        history_ttl=timedelta(seconds=1.0004),
        drain_timeout=timedelta(0),
    )
    assert b.ping_interval == 0.05 and b.drain_timeout == 0.0
    assert b.history_ttl_ms == 1001  # rounded up: history never expires earlier than asked
    with pytest.raises(ConfigurationError, match="drain_timeout"):
        await b.aclose(drain_timeout=float("nan"))
