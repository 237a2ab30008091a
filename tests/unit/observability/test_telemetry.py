"""The hook layer (app.core.telemetry) on fakeredis: free while off, complete while on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import fakeredis
import pytest

from app.core import telemetry
from app.core.errors import LockNotAcquired
from app.core.telemetry import outcome, traced
from app.observability.testing import Capture
from app.services.cache import CacheService
from app.services.rate_limit import RateLimiter

_NO_OTEL = textwrap.dedent(
    """
    import builtins
    import sys

    BLOCKED = ("opentelemetry", "prometheus_client")
    attempts = []
    plain_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        # every import statement passes here, also of modules already loaded
        if level == 0 and name.split(".")[0] in BLOCKED:
            attempts.append((name, (globals or {}).get("__name__")))
        return plain_import(name, globals, locals, fromlist, level)

    builtins.__import__ = recording_import

    import asyncio
    import fakeredis
    import app.main  # the demo with TELEMETRY_ENABLED unset
    from app.services.cache import CacheService
    from app.services.rate_limit import RateLimiter
    from app.services.streams import StreamConsumer, StreamProducer
    from app.services.locks import RedisLock

    async def main():
        redis = fakeredis.FakeAsyncRedis()
        cache = CacheService(redis)
        await cache.set("k", 1)
        assert await cache.get("k") == 1
        assert await cache.get_or_set("j", lambda: asyncio.sleep(0, 2)) == 2
        assert await RateLimiter(redis, 5, 1).is_allowed("x")
        async with RedisLock(redis, "l", timeout=5):
            pass
        await StreamProducer(redis, "s").add({"n": 1})
        seen = []
        async def handler(m):
            seen.append(m.fields)
        consumer = StreamConsumer(redis, "s", "g", "w", handler, start_id="0")
        await consumer.run_once()
        assert seen and set(seen[0]) == {b"payload"}, seen

    asyncio.run(main())
    ours = sorted({name for name, importer in attempts if (importer or "").startswith("app")})
    if "app.observability" in sys.modules:
        ours.append("app.observability")
    print("imported by app:", ",".join(ours) or "none")
    """
)


def test_no_toolkit_module_imports_opentelemetry_while_telemetry_is_off() -> None:
    """The services at work and the demo app (telemetry off) never import opentelemetry or
    prometheus_client themselves (FastAPI >= 0.16x and redis-py 8 may: that is theirs)."""
    done = subprocess.run(
        [sys.executable, "-c", _NO_OTEL], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "imported by app: none"


def test_methods_are_the_plain_functions_while_off_and_again_after() -> None:
    plain = CacheService.get
    assert CacheService.get.__qualname__ == "CacheService.get"
    assert not hasattr(plain, "__wrapped__")
    with Capture():
        assert CacheService.get is not plain
        assert CacheService.get.__wrapped__ is plain  # type: ignore[attr-defined]
    assert CacheService.get is plain
    assert telemetry.carrier() == ()


async def test_classes_defined_after_instrument_are_traced_too() -> None:
    with Capture() as otel:

        class Late:
            @traced("late.work", result=lambda value: "done" if value else "nothing")
            async def work(self, value: int) -> int:
                return value

            @traced("late.sync")
            def sync(self) -> str:
                outcome("custom")
                return "x"

        assert await Late().work(1) == 1
        assert await Late().work(0) == 0
        assert Late().sync() == "x"
        assert otel.outcomes("late.work") == ["done", "nothing"]
        assert otel.outcomes("late.sync") == ["custom"]
    assert not hasattr(Late.work, "__wrapped__")


async def test_exceptions_become_outcomes_and_propagate(fake_redis: Any) -> None:
    class Worker:
        @traced("demo.fail")
        async def fail(self) -> None:
            raise LockNotAcquired("lock 'x' is held by another owner", lock_name="x")

    with Capture() as otel:
        with pytest.raises(LockNotAcquired):
            await Worker().fail()
        span = otel.span("demo.fail")
        assert (span.attributes or {})["toolkit.outcome"] == "timeout"
        assert (span.attributes or {})["error.type"] == "LockNotAcquired"
        assert otel.count("demo.fail", outcome="timeout", **{"error.type": "LockNotAcquired"}) == 1


async def test_spans_off_keeps_the_metrics(fake_redis: Any) -> None:
    cache = CacheService(fake_redis)
    with Capture(spans=False) as otel:
        await cache.get("nothing")
        assert otel.spans() == []
        assert otel.count("cache.get", outcome="miss") == 1


async def test_fail_open_paths_report_unavailable_and_degraded() -> None:
    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    server.connected = False  # Redis is down
    cache = CacheService(redis)
    limiter = RateLimiter(redis, 1, 60, failure_mode="open")
    with Capture() as otel:
        assert await cache.get("k") is None  # fail-open: a miss
        assert await limiter.is_allowed("x")  # fail-open: allowed
        assert otel.outcomes("cache.get") == ["unavailable"]
        assert otel.outcomes("ratelimit.check") == ["degraded"]
        span = otel.span("cache.get")
        assert "error.type" in (span.attributes or {})


async def test_gauges_report_pool_and_breaker_of_the_global_client(fake_redis: Any) -> None:
    from app import observability
    from app.core import redis as core_redis

    core_redis.redis_client = fake_redis
    with Capture() as otel:
        await observability.refresh()
        assert otel.gauge("toolkit.breaker.state") == [0]
        states = {
            labels["db.client.connection.state"]
            for labels, _ in otel.points("db.client.connection.count")
        }
        assert states == {"used", "idle"}
        assert otel.gauge("db.client.connection.pending_requests") == [0]


async def test_stream_gauges_sample_running_or_named_consumers_only(fake_redis: Any) -> None:
    from app import observability
    from app.services.streams import StreamConsumer, StreamMessage

    async def handler(message: StreamMessage[Any]) -> None:
        return None

    idle = StreamConsumer(fake_redis, "idle", "g", "w", handler)
    await idle.ensure_group()
    with Capture() as otel:
        await observability.refresh()  # a consumer nobody runs is never asked
        assert otel.gauge("toolkit.stream.lag") == []
        await observability.refresh(idle)
        assert otel.gauge("toolkit.stream.pending", **{"messaging.destination.name": "idle"}) == [0]
        await observability.refresh()  # no longer reported by anyone: it drops out
        assert otel.gauge("toolkit.stream.pending") == []


@pytest.mark.parametrize(
    "planted",
    [b"garbage", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b"\xff\xfe", b"x" * 10_000],
)
async def test_a_planted_traceparent_is_ignored_and_the_entry_still_handled(
    fake_redis: Any, planted: bytes
) -> None:
    from app.services.streams import StreamConsumer, StreamMessage, stream_keys

    handled: list[Any] = []

    async def handler(message: StreamMessage[Any]) -> None:
        handled.append(message.payload)

    consumer = StreamConsumer(fake_redis, "jobs", "g", "w", handler)
    await consumer.ensure_group()
    # a writer that is not our producer plants a trace context of its choosing
    payload = b"\x01j-" + b'{"n":1}'
    await fake_redis.xadd(stream_keys("jobs").stream, {"payload": payload, "traceparent": planted})
    with Capture() as otel:
        assert await consumer.run_once() == 1
        handle = otel.span("stream.handle")
    assert handled == [{"n": 1}]
    assert handle.parent is None  # a new trace: the planted context was not continued
    assert handle.context is not None and handle.context.trace_id != 0
