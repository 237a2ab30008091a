"""Every ToolkitError becomes an RFC 9457 problem+json response on any app."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from app.api.problems import PROBLEM_TYPE_BASE, install_problem_handlers
from app.core import errors

CASES: list[tuple[errors.ToolkitError, int, str]] = [
    (errors.RedisUnavailable("down", url="redis://x"), 503, "redis-unavailable"),
    (errors.LockNotAcquired("busy", lock_name="jobs:1", retry_after=2.2), 409, "lock-not-acquired"),
    (errors.IdempotencyKeyMissing("missing"), 400, "idempotency-key-missing"),
    (errors.IdempotencyConflict("in flight", retry_after=1), 409, "idempotency-key-in-use"),
    (errors.IdempotencyMismatch("other body"), 422, "idempotency-key-reused"),
    (errors.SessionNotFound("gone"), 404, "session-not-found"),
    (errors.PayloadTooLarge("big", limit=10), 413, "payload-too-large"),
    (errors.CodecError("bad"), 500, "codec-error"),
]


@pytest.fixture
def problem_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/raise/{index}")
    async def boom(index: int) -> None:
        raise (
            CASES[index][0]
            if index >= 0
            else errors.RateLimitExceeded(
                "slow down",
                retry_after=16.2,
                violated_policies=["burst"],
                extra_headers={"RateLimit": '"burst";r=0;t=17'},
            )
        )

    return app


@pytest.mark.parametrize("index", range(len(CASES)))
async def test_errors_become_problem_json(
    problem_app: FastAPI, make_app_client: Any, index: int
) -> None:
    exc, status, slug = CASES[index]
    client = await make_app_client(problem_app)
    response = await client.get(f"/raise/{index}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM_TYPE_BASE + slug
    assert body["status"] == status
    assert body["title"] == exc.title
    assert body["instance"] == f"/raise/{index}"
    if exc.retry_after is not None:
        assert int(response.headers["retry-after"]) >= exc.retry_after


async def test_redis_details_do_not_leak_to_clients(
    problem_app: FastAPI, make_app_client: Any
) -> None:
    client = await make_app_client(problem_app)
    body = (await client.get("/raise/0")).json()
    assert "redis://" not in body["detail"]


async def test_rate_limit_problem_follows_the_draft(
    problem_app: FastAPI, make_app_client: Any
) -> None:
    client = await make_app_client(problem_app)
    response = await client.get("/raise/-1")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "17"  # rounded up, never earlier
    assert response.headers["ratelimit"] == '"burst";r=0;t=17'
    body = response.json()
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["violated-policies"] == ["burst"]
