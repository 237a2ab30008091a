"""One constructor vocabulary: every service names its keys with ``namespace=``.

Locks, semaphores, Redlock, the broadcaster and streams once took a root-prefix override
(``key_prefix=``, ``prefix=``) where the other services take ``namespace=``. These tests
pin the one word: keys land under ``<REDIS_KEY_PREFIX>:<namespace>:``, two namespaces
never share state, and the old argument still builds the old keys but warns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.core.errors import InvalidKey
from app.services.locks import RedisLock, Redlock, Semaphore
from app.services.pubsub import Broadcaster
from app.services.rate_limit import RateLimiter
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer, stream_keys

KeyOf = Callable[..., str]


def _lock(redis: Any, **kw: Any) -> str:
    return RedisLock(redis, "jobs:1", timeout=5, **kw).key


def _semaphore(redis: Any, **kw: Any) -> str:
    return Semaphore(redis, "jobs:1", 2, timeout=5, **kw).key


def _redlock(redis: Any, **kw: Any) -> str:
    return Redlock([redis], "jobs:1", timeout=5, **kw).key


def _channel(redis: Any, **kw: Any) -> str:
    return Broadcaster(redis, **kw).channel_name("jobs:1")


def _stream(redis: Any, **kw: Any) -> str:
    if "key_prefix" in kw:
        kw["prefix"] = kw.pop("key_prefix")
    return stream_keys("jobs:1", **kw).stream


# (builder, the default namespace)
BUILDERS = [
    pytest.param(_lock, "lock", id="RedisLock"),
    pytest.param(_semaphore, "semaphore", id="Semaphore"),
    pytest.param(_redlock, "lock", id="Redlock"),
    pytest.param(_channel, "pubsub", id="Broadcaster"),
    pytest.param(_stream, "stream", id="stream_keys"),
]


@pytest.fixture(autouse=True)
def _prefix(settings_override: Callable[..., None]) -> None:
    settings_override(redis_key_prefix="tenant7")


@pytest.mark.parametrize(("key_of", "default"), BUILDERS)
def test_keys_live_under_the_prefix_and_the_namespace(
    fake_redis: Any, key_of: KeyOf, default: str
) -> None:
    assert key_of(fake_redis) == f"tenant7:{default}:{{jobs%3A1}}"
    assert key_of(fake_redis, namespace="billing") == "tenant7:billing:{jobs%3A1}"


@pytest.mark.parametrize(("key_of", "default"), BUILDERS)
def test_a_namespace_cannot_reach_another_key_space(
    fake_redis: Any, key_of: KeyOf, default: str
) -> None:
    for hostile in ("billing:lock", "a{b}", "*", "", "x" * 65):
        with pytest.raises(InvalidKey):
            key_of(fake_redis, namespace=hostile)


@pytest.mark.parametrize(("key_of", "default"), BUILDERS)
def test_the_old_prefix_argument_still_builds_the_old_keys_and_warns(
    fake_redis: Any, key_of: KeyOf, default: str
) -> None:
    with pytest.warns(DeprecationWarning, match="use namespace="):
        key = key_of(fake_redis, key_prefix="legacy")
    assert key == f"legacy:{default}:{{jobs%3A1}}"


async def test_a_lock_held_in_one_namespace_does_not_block_the_same_name_in_another(
    fake_redis: Any,
) -> None:
    billing = RedisLock(fake_redis, "nightly", timeout=5, namespace="billing")
    reports = RedisLock(fake_redis, "nightly", timeout=5, namespace="reports")
    assert await billing.acquire()
    assert await reports.acquire()
    assert not await RedisLock(fake_redis, "nightly", timeout=5, namespace="billing").acquire()
    await billing.release()
    await reports.release()


async def test_semaphore_permits_are_counted_per_namespace(fake_redis: Any) -> None:
    first = await Semaphore(fake_redis, "gpu", 1, timeout=5, namespace="a").acquire()
    other = await Semaphore(fake_redis, "gpu", 1, timeout=5, namespace="b").acquire()
    assert first is not None and other is not None
    assert await Semaphore(fake_redis, "gpu", 1, timeout=5, namespace="a").acquire() is None
    await first.release()
    await other.release()


async def test_a_consumer_reads_only_its_own_namespace(fake_redis: Any) -> None:
    seen: list[tuple[str, Any]] = []

    async def handler(message: StreamMessage[Any]) -> None:
        seen.append((message.stream, message.payload))

    await StreamProducer(fake_redis, "jobs", namespace="billing").add({"n": 1})
    await StreamProducer(fake_redis, "jobs").add({"n": 2})
    billing = StreamConsumer(
        fake_redis, "jobs", "g", "c1", handler, namespace="billing", block=0.01
    )
    assert await billing.run_once() == 1
    assert seen == [("jobs", {"n": 1})]
    plain = StreamConsumer(fake_redis, "jobs", "g", "c1", handler, block=0.01)
    assert await plain.run_once() == 1
    assert seen[-1] == ("jobs", {"n": 2})


async def test_rate_limit_counters_are_kept_per_namespace(fake_redis: Any) -> None:
    api = RateLimiter(fake_redis, 1, 60, namespace="api")
    assert api.keys_for("alice")[0].startswith("tenant7:api:{alice}")
    assert await api.is_allowed("alice")
    assert not await api.is_allowed("alice")
    # The same policy and caller in another namespace has its own, untouched quota.
    assert await RateLimiter(fake_redis, 1, 60, namespace="webhooks").is_allowed("alice")
    assert not await RateLimiter(fake_redis, 1, 60, namespace="api").is_allowed("alice")
