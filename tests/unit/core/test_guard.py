"""The guard: the one way a service calls Redis and fails, and its fail-open helper.

Failures are real: a client pointed at a closed port, fakeredis answering
WRONGTYPE, or a Lua script answering OOM / READONLY. No mock stands in for Redis.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.core.breaker import CircuitBreaker, breaker_for
from app.core.errors import (
    LockError,
    RedisCommandError,
    RedisUnavailable,
    StreamError,
    ToolkitError,
)
from app.core.guard import FailOpen, Guard
from app.testing.servers import free_port
from app.testing.waiting import ManualClock

OOM = "return redis.error_reply('OOM command not allowed when used memory > maxmemory')"
READONLY = "return redis.error_reply('READONLY You cannot write against a read only replica.')"

log = logging.getLogger("tests.guard")


@pytest_asyncio.fixture
async def dead_redis() -> AsyncIterator[Redis]:
    """A client of a port nobody listens on: every command fails to connect, at once."""
    client = Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield client
    finally:
        await client.aclose()


class SilentServer:
    """A TCP server that accepts commands and never answers: a hung Redis, for real."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            self.received.set()
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest_asyncio.fixture
async def hung_redis() -> AsyncIterator[tuple[Redis, asyncio.Event]]:
    """A client of a server that never answers, and an event set once a command reached it."""
    silent = SilentServer()
    port = await silent.start()
    client = Redis(host="127.0.0.1", port=port, socket_timeout=None, retry=Retry(NoBackoff(), 0))
    try:
        yield client, silent.received
    finally:
        await client.aclose()
        assert silent.server is not None
        silent.server.close()
        await silent.server.wait_closed()


def guard_with(
    client: Any, clock: ManualClock, *, threshold: int = 1, reset: float = 2.0, **options: Any
) -> Guard:
    breaker = CircuitBreaker(failure_threshold=threshold, reset_timeout=reset, clock=clock)
    return Guard(client, "thing 'x'", breaker=breaker, **options)


def state(guard: Guard) -> str:
    return guard.breaker.state  # through a function so mypy does not narrow across calls


# -- (a) an open breaker refuses at once ------------------------------------------------------


async def test_an_open_breaker_refuses_before_calling_redis(dead_redis: Redis) -> None:
    guard = guard_with(dead_redis, ManualClock(), threshold=1, reset=5.0, hint="; retry later")
    with pytest.raises(RedisUnavailable), guard:
        await dead_redis.get("k")
    assert state(guard) == "open"
    ran = False
    with pytest.raises(RedisUnavailable) as info, guard:
        ran = True
    assert not ran
    assert info.value.retry_after == 5.0
    assert str(info.value).startswith("thing 'x': circuit breaker")
    assert str(info.value).endswith("; retry later")
    assert guard.breaker.rejected == 1


async def test_the_guard_uses_the_breaker_of_its_client(fake_redis: Any) -> None:
    guard = Guard(fake_redis, "thing")
    assert guard.breaker is breaker_for(fake_redis)
    with guard:
        assert await fake_redis.set("k", b"v")
    assert state(guard) == "closed"


# -- (b) connection errors ----------------------------------------------------------------------


async def test_connection_errors_become_unavailable_and_count_as_failures(
    dead_redis: Redis,
) -> None:
    guard = guard_with(dead_redis, ManualClock(), threshold=3)
    for expected in ("closed", "closed", "open"):
        with pytest.raises(RedisUnavailable) as info, guard:
            await dead_redis.get("k")
        assert isinstance(info.value.__cause__, redis_exc.ConnectionError)
        assert str(info.value).startswith("thing 'x': Redis is unreachable (")
        assert state(guard) == expected


async def test_a_timeout_inside_the_block_counts_as_a_failure(
    hung_redis: tuple[Redis, asyncio.Event],
) -> None:
    client, _ = hung_redis
    guard = guard_with(client, ManualClock(), threshold=1)
    with pytest.raises(RedisUnavailable, match=r"unreachable \(TimeoutError\)") as info, guard:
        async with asyncio.timeout(0.05):
            await client.get("k")
    assert isinstance(info.value.__cause__, TimeoutError)
    assert state(guard) == "open"


async def test_a_nested_unavailable_counts_as_a_failure_and_passes_through(
    dead_redis: Redis,
) -> None:
    clock = ManualClock()
    inner = guard_with(dead_redis, clock, threshold=5)
    outer = guard_with(dead_redis, clock, threshold=1)
    with pytest.raises(RedisUnavailable) as info, outer, inner:
        await dead_redis.get("k")
    assert str(info.value).startswith("thing 'x': Redis is unreachable")
    assert state(outer) == "open"


async def test_a_half_open_trial_that_succeeds_closes_the_breaker(fake_redis: Any) -> None:
    clock = ManualClock()
    guard = guard_with(fake_redis, clock, threshold=1, reset=2.0)
    guard.breaker.record_failure()
    clock.advance(2.5)
    assert state(guard) == "half_open"
    with guard:
        await fake_redis.ping()
    assert state(guard) == "closed"


# -- (c) refused for now --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "cause"),
    [(OOM, redis_exc.OutOfMemoryError), (READONLY, redis_exc.ReadOnlyError)],
)
async def test_oom_and_readonly_are_unavailable_but_a_success_for_the_breaker(
    fake_redis: Any, script: str, cause: type[Exception]
) -> None:
    guard = guard_with(fake_redis, ManualClock(), threshold=1)
    with pytest.raises(RedisUnavailable, match="refused the call for now") as info, guard:
        await fake_redis.eval(script, 0)
    assert isinstance(info.value.__cause__, cause)
    assert state(guard) == "closed"


# -- (d) other Redis errors -------------------------------------------------------------------------


async def test_other_redis_errors_become_a_toolkit_error_without_redis_text(
    fake_redis: Any,
) -> None:
    guard = guard_with(fake_redis, ManualClock(), threshold=2)
    guard.breaker.record_failure()  # one failure so far: the refusal must reset the count
    await fake_redis.set("k", b"a string")
    with pytest.raises(RedisCommandError) as info, guard:
        await fake_redis.lpush("k", b"x")
    assert isinstance(info.value, ToolkitError)
    assert isinstance(info.value.__cause__, redis_exc.ResponseError)
    assert "WRONGTYPE" in str(info.value.__cause__)
    assert str(info.value) == "thing 'x': Redis refused the command"
    assert info.value.status_code == 500
    assert state(guard) == "closed"
    assert guard.breaker.stats()["consecutive_failures"] == 0


async def test_a_script_error_does_not_leak_the_script(fake_redis: Any) -> None:
    guard = Guard(fake_redis, "thing")
    with pytest.raises(RedisCommandError) as info, guard:
        await fake_redis.eval("return redis.call('NOPE', KEYS[1])", 1, "k")
    assert "NOPE" not in str(info.value) and "script" not in str(info.value)


async def test_a_service_chooses_its_own_class_for_refused_commands(fake_redis: Any) -> None:
    await fake_redis.set("k", b"a string")
    as_stream = Guard(fake_redis, "stream 's'", refused=StreamError)
    with pytest.raises(StreamError, match=r"^stream 's': Redis refused the command$"), as_stream:
        await fake_redis.xadd("k", {"f": "v"})
    as_lock = Guard(fake_redis, "lock 'k'", refused=functools.partial(LockError, lock_name="k"))
    with pytest.raises(LockError) as info, as_lock:
        await fake_redis.hset("k", "f", "v")
    assert info.value.lock_name == "k"
    as_outage = Guard(fake_redis, "cache 'c'", refused=RedisUnavailable)
    with pytest.raises(RedisUnavailable), as_outage:
        await fake_redis.lpush("k", b"x")
    assert state(as_outage) == "closed"


async def test_errors_that_are_not_redis_pass_through_as_a_success(fake_redis: Any) -> None:
    guard = guard_with(fake_redis, ManualClock(), threshold=2)
    guard.breaker.record_failure()
    with pytest.raises(KeyError), guard:
        await fake_redis.ping()
        raise KeyError("decoding failed")
    assert guard.breaker.stats()["consecutive_failures"] == 0


# -- (e) cancellation -----------------------------------------------------------------------------


async def test_a_cancelled_trial_is_neutral_and_frees_the_trial_slot(
    hung_redis: tuple[Redis, asyncio.Event], fake_redis: Any
) -> None:
    client, received = hung_redis
    clock = ManualClock()
    guard = guard_with(client, clock, threshold=1, reset=2.0)
    guard.breaker.record_failure()
    clock.advance(2.5)

    async def trial() -> None:
        with guard:
            await client.get("k")

    task = asyncio.create_task(trial())
    await received.wait()  # the GET is on the wire, waiting for a reply that never comes
    assert not guard.breaker.allow()  # the trial is in flight: everyone else is refused
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(guard) == "half_open"  # neither a success nor a failure
    assert guard.breaker.stats()["consecutive_failures"] == 1
    with guard:  # the next call is the trial
        await fake_redis.ping()
    assert state(guard) == "closed"


# -- fail-open ------------------------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


async def test_fail_open_returns_the_default_and_logs_once_per_change(
    dead_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    guard = guard_with(dead_redis, clock, threshold=3, reset=1000.0)
    fail_open = FailOpen(guard, log, fallback="serving misses", interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(20):
            assert await fail_open.call(lambda: dead_redis.get("k"), "default") == "default"
        lines = warnings_of(caplog)
        assert fail_open.failures == 20
        assert state(guard) == "open"
        assert len(lines) == 1  # not one per call; the breaker opening came inside the interval
        assert lines[0].startswith("thing 'x': Redis call failed (Redis is unreachable (")
        assert lines[0].endswith("; serving misses until Redis answers again")

        clock.advance(61)  # the change (breaker open) is logged with the next failure
        assert await fail_open.call(lambda: dead_redis.get("k"), None) is None
        lines = warnings_of(caplog)
        assert len(lines) == 2 and "circuit breaker 'redis' is open" in lines[1]

        clock.advance(61)  # nothing changed since: no reminder
        for _ in range(5):
            assert await fail_open.call(lambda: dead_redis.get("k"), None) is None
        assert len(warnings_of(caplog)) == 2
    assert fail_open.failures == 26


async def test_fail_open_returns_the_result_when_redis_answers(fake_redis: Any) -> None:
    fail_open = FailOpen(Guard(fake_redis, "thing"), log)
    await fake_redis.set("k", b"v")
    assert await fail_open.call(lambda: fake_redis.get("k"), None) == b"v"
    assert fail_open.failures == 0


async def test_fail_closed_raises_after_logging_once(
    dead_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    fail_closed = FailOpen(guard_with(dead_redis, clock, threshold=100), log, enabled=False)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                await fail_closed.call(lambda: dead_redis.get("k"), None)
    lines = warnings_of(caplog)
    assert len(lines) == 1 and lines[0].endswith("raising 503 until Redis answers again")
    assert fail_closed.failures == 3


async def test_failed_serves_hand_written_except_blocks(
    fake_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(fake_redis, "cache 'c'", refused=RedisUnavailable)
    fail_open = FailOpen(guard, log, clock=ManualClock())
    await fake_redis.set("k", b"a string")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            try:
                with guard:
                    await fake_redis.lpush("k", b"x")
            except RedisUnavailable as exc:
                fail_open.failed(exc)
    assert fail_open.failures == 3 and len(warnings_of(caplog)) == 1
    assert state(guard) == "closed"


async def test_fail_open_can_catch_more_than_outages(fake_redis: Any) -> None:
    fail_open = FailOpen(Guard(fake_redis, "http cache"), log, catch=(Exception,))

    async def broken() -> bytes:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    assert await fail_open.call(broken, b"fallback") == b"fallback"
    assert fail_open.failures == 1


async def test_fail_open_lets_cancellation_through(
    hung_redis: tuple[Redis, asyncio.Event],
) -> None:
    client, received = hung_redis
    fail_open = FailOpen(Guard(client, "thing"), log, catch=(Exception,))
    task = asyncio.create_task(fail_open.call(lambda: client.get("k"), None))
    await received.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fail_open.failures == 0
