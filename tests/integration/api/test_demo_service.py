"""`make run`'s server: uvicorn serves the demo with the embedded store or a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from app.testing.servers import free_port

pytestmark = pytest.mark.slow


@contextmanager
def uvicorn(redis_url: str | None, **extra_env: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | extra_env
    if redis_url:
        env["REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "uvicorn exited")
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_demo_serves_healthz_on_the_embedded_store() -> None:
    with uvicorn(None) as base:
        response = httpx.get(base + "/healthz", timeout=5)
        assert response.status_code == 200
        assert set(response.json()) == {"status", "latency_ms"}  # public: nothing internal
        index = httpx.get(base + "/", timeout=5).json()
        assert "health" in index["capabilities"]


def test_demo_uses_redis_url_when_set(redis_server: Any) -> None:
    with uvicorn(redis_server.url, HEALTH_DETAILS="true") as base:
        body = httpx.get(base + "/healthz", timeout=5).json()
        assert body["role"] == "master"
        assert body["url"] == redis_server.url
