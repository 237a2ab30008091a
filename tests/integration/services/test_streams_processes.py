"""Stream workers as OS processes (``python -m app.worker``): SIGKILL mid-batch, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.core.config import get_settings
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer, stream_keys
from app.testing.plugin import RedisServerInfo
from app.testing.waiting import eventually
from tests.integration.services._streams_handlers import PROCESSED_KEY, STARTED_KEY

ROOT = Path(__file__).resolve().parents[3]
HANDLER = "tests.integration.services._streams_handlers:record"

WorkerFactory = Callable[..., subprocess.Popen[bytes]]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def start_worker(redis_server: RedisServerInfo) -> Iterator[WorkerFactory]:
    """Start ``python -m app.worker`` processes; any still alive are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str, delay: float = 0.05) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "REDIS_KEY_PREFIX": get_settings().redis_key_prefix,
            "STREAMS_TEST_DELAY": str(delay),
        }
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "app.worker",
                "--stream", "jobs", "--group", "workers", "--name", name,
                "--handler", HANDLER, "--block", "0.2", "--log-level", "WARNING",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def processed(redis: Redis) -> list[tuple[str, str, int]]:
    rows = await redis.lrange(PROCESSED_KEY, 0, -1)
    out = []
    for row in rows:
        entry_id, consumer, deliveries = _text(row).split(" ")
        out.append((entry_id, consumer, int(deliveries)))
    return out


async def pending_for(redis: Redis, consumer: str | None = None) -> list[str]:
    try:
        rows = await redis.xpending_range(
            stream_keys("jobs").stream, "workers", "-", "+", 10_000, consumername=consumer
        )
    except ResponseError:  # NOGROUP: the worker has not created its group yet
        return []
    return [_text(r["message_id"]) for r in rows]


async def test_sigkilled_consumer_loses_nothing(
    real_redis: Redis, start_worker: WorkerFactory
) -> None:
    total = 300
    ids = await StreamProducer(real_redis, "jobs").add_many({"n": i} for i in range(total))
    victim = start_worker("victim", "--concurrency", "8", "--batch-size", "8", delay=0.05)

    async def mid_batch() -> bool:
        return len(await processed(real_redis)) >= 40 and bool(
            await pending_for(real_redis, "victim")
        )

    await eventually(mid_batch)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    orphaned = await pending_for(real_redis, "victim")
    assert orphaned  # the kill left entries delivered to the victim and never acked

    async def record(message: StreamMessage[Any]) -> None:
        await real_redis.rpush(
            PROCESSED_KEY, f"{message.id} {message.consumer} {message.deliveries}"
        )

    survivor = StreamConsumer(
        real_redis, "jobs", "workers", "survivor", record, claim_idle=0.3, block=0.1
    )
    task = asyncio.create_task(survivor.run())

    async def all_done() -> bool:
        done = {entry_id for entry_id, _, _ in await processed(real_redis)}
        return done == set(ids) and not await pending_for(real_redis)

    try:
        await eventually(all_done)
    finally:
        await survivor.stop()
        await task
    rows = await processed(real_redis)
    assert len({entry_id for entry_id, _, _ in rows}) == total  # none lost
    assert len(rows) >= total  # at least once: a handler killed after its work re-runs
    reclaimed = {entry_id: n for entry_id, consumer, n in rows if consumer == "survivor"}
    assert set(orphaned) <= set(reclaimed)  # the survivor took over the victim's entries
    assert all(reclaimed[entry_id] >= 2 for entry_id in orphaned)
    assert survivor.counters.claimed >= len(orphaned)


async def test_sigterm_lets_in_flight_handlers_finish_and_acks_them(
    real_redis: Redis, start_worker: WorkerFactory
) -> None:
    ids = await StreamProducer(real_redis, "jobs").add_many(range(4))
    worker = start_worker("graceful", "--concurrency", "4", delay=1.0)

    async def all_in_flight() -> bool:  # every handler started (not only read: see prefetch)
        return await real_redis.llen(STARTED_KEY) == 4

    await eventually(all_in_flight)
    assert await processed(real_redis) == []
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 15) == 0
    assert sorted(entry_id for entry_id, _, _ in await processed(real_redis)) == ids
    assert await pending_for(real_redis) == []


async def test_sigterm_past_the_shutdown_timeout_leaves_entries_pending(
    real_redis: Redis, start_worker: WorkerFactory
) -> None:
    ids = await StreamProducer(real_redis, "jobs").add_many(range(3))
    worker = start_worker(
        "impatient", "--concurrency", "4", "--shutdown-timeout", "0.2", delay=30.0
    )

    async def all_in_flight() -> bool:
        return await real_redis.llen(STARTED_KEY) == 3

    await eventually(all_in_flight)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 15) == 0
    assert await processed(real_redis) == []
    assert await pending_for(real_redis, "impatient") == ids  # left for another consumer
