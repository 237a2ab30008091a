"""Two uvicorn worker processes on one real Redis: fan-out crosses processes.

Each worker is ``uvicorn app.main:app`` on its own port with ``REDIS_URL``
pointing at the test server, started as a subprocess and stopped by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from app.testing.plugin import RedisServerInfo
from app.testing.servers import free_port
from app.testing.waiting import DEFAULT_DEADLINE, eventually

ROOT = Path(__file__).resolve().parents[3]
PREFIX = "psworkers"


class Worker:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def _start(redis_url: str, log_dir: Path) -> Worker:
    port = free_port()
    log = log_dir / f"uvicorn-{port}.log"
    env = {**os.environ, "REDIS_URL": redis_url, "APP_ENV": "test", "REDIS_KEY_PREFIX": PREFIX}
    env["DEMO_DESTRUCTIVE_ROUTES"] = "true"  # the test publishes through POST /publish
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Worker(port, proc, log)


def _wait_ready(worker: Worker, deadline: float) -> None:
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(f"uvicorn exited early:\n{worker.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{worker.http}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"uvicorn on {worker.port} not ready:\n{worker.log.read_text()[-3000:]}")


def _stop(worker: Worker) -> None:
    if worker.proc.poll() is None:
        os.kill(worker.proc.pid, signal.SIGTERM)
        try:
            worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def workers(redis_server: RedisServerInfo) -> Iterator[tuple[Worker, Worker]]:
    """Two workers for the module's tests (starting the app takes seconds)."""
    with tempfile.TemporaryDirectory(prefix="pubsub-workers-") as tmp:
        started = [_start(redis_server.url, Path(tmp)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30
            for worker in started:
                _wait_ready(worker, deadline)
            yield started[0], started[1]
        finally:
            for worker in started:
                _stop(worker)


async def _frame(socket: websockets.ClientConnection) -> dict[str, object]:
    raw = await asyncio.wait_for(socket.recv(), DEFAULT_DEADLINE)
    frame: dict[str, object] = json.loads(raw)
    return frame


async def test_websocket_on_one_worker_gets_what_the_other_publishes(
    workers: tuple[Worker, Worker], real_redis: Redis
) -> None:
    a, b = workers
    async with (
        websockets.connect(f"{a.ws}/ws/room-42") as first,
        websockets.connect(f"{a.ws}/ws/room-42") as second,
        websockets.connect(f"{b.ws}/ws/room-42") as local,
        httpx.AsyncClient() as http,
    ):
        # The server accepts a socket once it is subscribed. Under CPU contention a repeat
        # run once saw 1 receiver here (suspected: a link reconnecting, which resubscribes
        # a moment later), so the test asks Redis for both links first, never sleeps.
        channel = f"{PREFIX}:pubsub:{{room-42}}"

        async def both_links_subscribed() -> bool:
            return dict(await real_redis.pubsub_numsub(channel)) == {channel.encode(): 2}

        await eventually(both_links_subscribed, "both workers' links subscribed to the room")
        response = await http.post(f"{b.http}/publish/room-42", json={"hello": "world"})
        assert response.status_code == 200
        # one pub/sub connection per worker, not per socket: 2 receivers for 3 sockets
        assert response.json()["receivers"] == 2
        for socket in (first, second, local):
            frame = await _frame(socket)
            assert frame["type"] == "message" and frame["channel"] == "room-42"
            assert frame["data"] == {"hello": "world"}
            assert frame["id"] == response.json()["id"]
        stats = (await http.get(f"{a.http}/pubsub/stats")).json()
        assert stats["subscribers"] == 2 and len(stats["links"]) == 1
        # Redis sees one subscriber connection per worker (other capabilities of the demo
        # may hold their own pub/sub connections, so count this channel's subscribers).
        assert dict(await real_redis.pubsub_numsub(channel)) == {channel.encode(): 2}


async def test_sse_on_a_real_server_streams_and_releases_on_disconnect(
    workers: tuple[Worker, Worker],
) -> None:
    a, b = workers
    async with httpx.AsyncClient(timeout=5) as http:
        async with http.stream("GET", f"{a.http}/sse/feed?heartbeat=0.2") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 2000"  # sent once subscribed
            published = (await http.post(f"{b.http}/publish/feed", json=[1, 2])).json()
            seen: list[str] = []
            async with asyncio.timeout(DEFAULT_DEADLINE):
                async for line in lines:
                    seen.append(line)
                    if line.startswith("data:"):
                        break
            assert f"id: {published['id']}" in seen
            assert json.loads(seen[-1].removeprefix("data: "))["data"] == [1, 2]

        async def released() -> bool:
            return not (await http.get(f"{a.http}/pubsub/stats")).json()["subscribers"]

        await eventually(released, "the worker to notice the client left")
