"""Circuit breaker: opens after failures, rejects fast, half-opens, closes on recovery."""

from __future__ import annotations

import contextlib
import logging

import pytest
from redis import exceptions as redis_exc

from app.core.errors import RedisUnavailable
from app.core.redis import CircuitBreaker
from app.testing.waiting import ManualClock


def state(breaker: CircuitBreaker) -> str:
    return breaker.state  # read through a function so mypy does not narrow across calls


def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(RedisUnavailable), breaker:
        raise redis_exc.ConnectionError("refused")


def test_opens_after_threshold_and_rejects_without_calling() -> None:
    clock = ManualClock(100.0)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5, clock=clock)
    for _ in range(3):
        assert state(breaker) == "closed"
        fail(breaker)
    assert state(breaker) == "open"
    calls = 0
    with pytest.raises(RedisUnavailable, match="circuit breaker 'redis' is open") as info, breaker:
        calls += 1
    assert calls == 0
    assert info.value.retry_after == 5
    assert breaker.stats()["rejected"] == 1


def test_half_open_admits_one_trial_then_closes_on_success() -> None:
    clock = ManualClock(100.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=2, clock=clock)
    fail(breaker)
    clock.now += 2.5
    assert state(breaker) == "half_open"
    assert breaker.allow() is True  # the trial
    assert breaker.allow() is False  # everyone else waits for it
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.allow() is True


def test_failed_trial_reopens_for_a_full_period() -> None:
    clock = ManualClock(100.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=2, clock=clock)
    fail(breaker)
    clock.now += 2.1
    fail(breaker)  # the trial fails
    assert state(breaker) == "open"
    clock.now += 1.9
    assert state(breaker) == "open"
    clock.now += 0.2
    assert state(breaker) == "half_open"


def test_server_answers_with_an_error_count_as_success() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(redis_exc.ResponseError), breaker:
        raise redis_exc.ResponseError("WRONGTYPE")
    assert state(breaker) == "closed"


def test_connection_errors_are_wrapped_with_their_cause() -> None:
    breaker = CircuitBreaker(failure_threshold=10)
    original = redis_exc.TimeoutError("read timed out")
    with pytest.raises(RedisUnavailable) as info, breaker:
        raise original
    assert info.value.__cause__ is original


def test_transitions_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(100.0)
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=1, clock=clock)
    with caplog.at_level(logging.WARNING, logger="app.redis"):
        for _ in range(10):
            with contextlib.suppress(RedisUnavailable):  # rejected while open
                fail(breaker)
        clock.now += 1.5
        with breaker:
            pass
    opened = [r for r in caplog.records if "opened" in r.getMessage()]
    closed = [r for r in caplog.records if "closed" in r.getMessage()]
    assert len(opened) == 1 and len(closed) == 1


@pytest.mark.parametrize(
    "refusal",
    [redis_exc.OutOfMemoryError("OOM command not allowed"), redis_exc.ReadOnlyError("READONLY")],
)
def test_write_refusals_become_unavailable_without_opening_the_breaker(
    refusal: redis_exc.RedisError,
) -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(RedisUnavailable, match="refused the call for now") as info, breaker:
        raise refusal
    assert info.value.__cause__ is refusal
    assert state(breaker) == "closed"
