"""Exactly-once across OS processes: 100 concurrent identical requests, and a crashed worker."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.api.routes.idempotency import _keys as demo_keys
from app.core import redis as core_redis
from app.testing.plugin import RedisServerInfo
from app.testing.waiting import pop_signal
from tests.integration.middleware._idempotency_worker import (
    GO_LIST,
    HANG_RUNS,
    HANG_STARTED,
    READY_LIST,
    build_app,
)

ROOT = Path(__file__).resolve().parents[3]
WORKER = "tests.integration.middleware._idempotency_worker"
SECRET = "x" * 48  # every process must derive the same HMAC scopes


def _spawn(redis_url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "SECRET_KEY": SECRET}
    return subprocess.Popen(
        [sys.executable, "-m", WORKER, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


@pytest.mark.parametrize("on_conflict", ["reject", "wait"])
async def test_100_concurrent_requests_from_2_processes_run_once(
    redis_server: RedisServerInfo, real_redis: Redis, on_conflict: str
) -> None:
    workers = [_spawn(redis_server.url, "burst", "50", "pay-once", on_conflict) for _ in range(2)]
    try:
        for _ in workers:  # both are up, with their apps started, before anyone fires
            await pop_signal(real_redis, READY_LIST, "both workers started", timeout=60)
        await real_redis.rpush(GO_LIST, "go", "go")
        outputs = [await asyncio.to_thread(w.communicate, timeout=90) for w in workers]
    finally:
        for w in workers:
            _stop(w)
    answers: list[dict[str, Any]] = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        answers.extend(json.loads(line) for line in out.splitlines())
    assert len(answers) == 100

    executions = await real_redis.get(demo_keys().key("executions"))
    assert executions is not None and int(executions) == 1  # the handler ran exactly once

    originals = [a for a in answers if a["status"] == 201 and a["replayed"] is None]
    replays = [a for a in answers if a["status"] == 201 and a["replayed"] == "true"]
    conflicts = [a for a in answers if a["status"] == 409]
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(conflicts) == 100
    original = originals[0]
    for replay in replays:  # byte-identical body and stored headers
        assert replay["body"] == original["body"]
        assert replay["location"] == original["location"]
        assert replay["content_type"] == original["content_type"]
    for conflict in conflicts:
        assert conflict["retry_after"] == "1"
        assert conflict["content_type"] == "application/problem+json"
    body = json.loads(base64.b64decode(original["body"]))
    assert body["execution"] == 1 and body["amount"] == 500
    if on_conflict == "wait":
        assert len(replays) == 99  # every duplicate waited and got the first response


async def test_a_crashed_workers_key_is_claimable_after_the_lease(
    redis_server: RedisServerInfo, real_redis: Redis, settings_override: Callable[..., None]
) -> None:
    settings_override(secret_key=SECRET)
    worker = _spawn(redis_server.url, "hang", "crash-1")
    try:
        for _ in range(600):  # the worker is inside the handler
            if await real_redis.exists(HANG_STARTED) or worker.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert worker.poll() is None, worker.communicate()[1]
        assert await real_redis.exists(HANG_STARTED)

        core_redis.redis_client = real_redis
        app = build_app(lease=0.5)
        transport = httpx.ASGITransport(app=app)
        headers = {"Idempotency-Key": "crash-1"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.sleep(1.2)  # over two leases: the worker's heartbeat holds the key
            held = await client.post("/hang", json={"x": 1}, headers=headers)
            assert held.status_code == 409

            worker.kill()  # a crash: no release, no more heartbeats
            worker.wait(10)
            for _ in range(100):
                retry = await client.post("/hang", json={"x": 1}, headers=headers)
                if retry.status_code != 409:
                    break
                await asyncio.sleep(0.1)
        assert retry.status_code == 200, retry.text
        assert retry.json() == {"run": 2}  # the crashed run, then this one
        assert await real_redis.get(HANG_RUNS) == b"2"
    finally:
        _stop(worker)
