"""The lock dependencies and demo routes over ASGI, on fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI

from app.api.deps import request_lock, request_semaphore
from app.api.problems import install_problem_handlers
from app.api.routes import locks as lock_routes
from app.core.errors import ConfigurationError
from app.services.locks import RedisLock, Semaphore
from app.testing.plugin import AppClientFactory
from app.testing.waiting import eventually


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(lock_routes.router)
    lock_routes.setup(app)

    @app.post("/short/{job_id}")
    async def short_lease(
        job_id: str,
        lock: Annotated[RedisLock, request_lock("short:{job_id}", timeout=0.3)],
    ) -> dict[str, Any]:
        await lock.redis.delete(lock.key)  # the lease is lost under the handler
        await asyncio.sleep(5)
        return {"finished": True}

    @app.get("/typo/{job_id}", dependencies=[request_lock("jobs:{job}")])
    async def typo(job_id: str) -> None:
        return None

    return app


async def _not(check: Callable[[], Awaitable[bool]]) -> bool:
    return not await check()


@pytest.fixture
async def client(make_app_client: AppClientFactory, fake_redis: Any) -> httpx.AsyncClient:
    app_client: httpx.AsyncClient = await make_app_client(_app(), fake_redis)
    return app_client


async def _cancelled(*requests: asyncio.Task[httpx.Response]) -> None:
    """Give up on *requests* (the client leaves): their handlers end and let go of what they hold."""
    for request in requests:
        request.cancel()
    for request in requests:
        with pytest.raises(asyncio.CancelledError):
            await request


async def test_same_job_twice_answers_409_problem_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    async def locked() -> bool:
        return bool((await client.get("/jobs/42/lock")).json()["locked"])

    running = asyncio.create_task(client.post("/jobs/42/run", params={"seconds": 10}))
    await eventually(locked, "job 42's lock to be held while its first run works")
    busy = await client.post("/jobs/42/run", params={"seconds": 0})
    await _cancelled(running)
    assert busy.status_code == 409
    assert busy.headers["content-type"] == "application/problem+json"
    assert 0 < int(busy.headers["retry-after"]) <= 10
    problem = busy.json()
    assert problem["type"].endswith("/lock-not-acquired")
    assert problem["instance"] == "/jobs/42/run"
    await eventually(lambda: _not(locked), "job 42's lock to be released once its run ended")
    ok = await client.post("/jobs/42/run", params={"seconds": 0})
    assert ok.status_code == 200
    assert isinstance(ok.json()["fence"], int)


async def test_different_jobs_run_side_by_side_and_locks_end_with_the_request(
    client: httpx.AsyncClient,
) -> None:
    responses = await asyncio.gather(
        *(client.post(f"/jobs/{n}/run", params={"seconds": 0.1}) for n in range(3))
    )
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert (await client.get("/jobs/1/lock")).json() == {"job_id": "1", "locked": False}
    again = await client.post("/jobs/1/run", params={"seconds": 0})
    assert again.status_code == 200
    assert again.json()["fence"] > responses[1].json()["fence"]


async def test_lock_is_visible_while_the_job_runs(client: httpx.AsyncClient) -> None:
    async def locked() -> bool:
        return bool((await client.get("/jobs/7/lock")).json()["locked"])

    running = asyncio.create_task(client.post("/jobs/7/run", params={"seconds": 10}))
    await eventually(locked, "job 7's lock to be held while its job runs")
    await _cancelled(running)  # the client gives up: the request ends and lets the lock go
    await eventually(lambda: _not(locked), "job 7's lock to be released once the request ended")


async def test_semaphore_route_admits_limit_requests_at_once(
    client: httpx.AsyncClient, fake_redis: Any
) -> None:
    exports = Semaphore(fake_redis, "exports", limit=lock_routes.EXPORT_LIMIT, timeout=10)

    async def all_admitted() -> bool:
        return await exports.count() == lock_routes.EXPORT_LIMIT

    running = [
        asyncio.create_task(client.post("/exports", params={"seconds": 10}))
        for _ in range(lock_routes.EXPORT_LIMIT)
    ]
    await eventually(all_admitted, f"{lock_routes.EXPORT_LIMIT} exports to hold a permit at once")
    busy = await client.post("/exports", params={"seconds": 0})
    await _cancelled(*running)
    assert busy.status_code == 409
    assert "retry-after" in busy.headers
    await eventually(lambda: _not(exports.locked), "the permits to be released with the requests")
    assert (await client.post("/exports", params={"seconds": 0})).status_code == 200


async def test_a_lost_lease_cancels_the_handler_and_answers_lock_lost(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/short/1")
    assert response.status_code == 409
    assert response.json()["type"].endswith("/lock-lost")


async def test_a_template_naming_a_missing_path_parameter_is_a_500_problem(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/typo/1")
    assert response.status_code == 500
    assert "job" in response.json()["detail"]


async def test_redis_down_answers_503(client: httpx.AsyncClient, fake_redis: Any) -> None:
    fake_redis.connection_pool.connection_kwargs["server"].connected = False
    response = await client.post("/jobs/1/run", params={"seconds": 0})
    assert response.status_code == 503


def test_templates_are_checked_when_the_route_is_declared() -> None:
    for bad in ("", "jobs:{job_id!r}", "jobs:{job_id:>5}", "jobs:{0}", "jobs:{a.b}", "jobs:{"):
        with pytest.raises(ConfigurationError):
            request_lock(bad)
    with pytest.raises(ConfigurationError):
        request_lock("jobs:{job_id}", timeout=0)
    with pytest.raises(ConfigurationError):
        request_semaphore("exports", limit=0)
