"""Every ToolkitError becomes an RFC 9457 problem+json response on any app."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from fastapi import FastAPI
from redis import exceptions as redis_exc

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
    (errors.EncodeError("cannot encode int as JSON"), 422, "unencodable-value"),
]

SHA = "7055bd" + "0" * 34
LEAKY: list[errors.ToolkitError] = [
    errors.LockError(
        f"lock 'jobs:1': Redis refused the call: WRONGTYPE Operation against a key holding "
        f"the wrong kind of value script: {SHA}, on @user_script:14.",
        lock_name="jobs:1",
    ),
    errors.SessionError(f"session script {SHA} failed"),
    errors.StreamError("NOSCRIPT No matching script"),
    errors.StreamError("could not read the group: unusual reply from node 10.0.0.7:6379"),
]


@pytest.fixture
def problem_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/leak/{index}")
    async def leak(index: int) -> None:
        if index == 0:  # a Redis error wrapped the way services wrap it
            try:
                raise redis_exc.ResponseError("WRONGTYPE Operation against a key")
            except redis_exc.ResponseError as exc:
                raise LEAKY[0] from exc
        if index == 3:  # no known marker, but the detail quotes the Redis error's text
            try:
                raise redis_exc.ResponseError("unusual reply from node 10.0.0.7:6379")
            except redis_exc.ResponseError as exc:
                raise LEAKY[3] from exc
        if index == -1:  # a domain error raised while handling a Redis one keeps its detail
            try:
                raise redis_exc.WatchError("Watched variable changed.")
            except redis_exc.WatchError as exc:
                raise errors.SessionConflict("key 'n' changed concurrently; retry") from exc
        raise LEAKY[index]

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


@pytest.mark.parametrize("index", range(len(LEAKY)))
async def test_internals_go_to_the_log_under_a_correlation_id(
    problem_app: FastAPI, make_app_client: Any, caplog: pytest.LogCaptureFixture, index: int
) -> None:
    client = await make_app_client(problem_app)
    with caplog.at_level(logging.ERROR, logger="app.problems"):
        response = await client.get(f"/leak/{index}")
    assert response.status_code == LEAKY[index].status_code
    body = response.json()
    assert body["title"] == LEAKY[index].title
    for internal in ("WRONGTYPE", "NOSCRIPT", "@user_script", "7055bd", "script", "10.0.0.7"):
        assert internal not in response.text
    assert not re.search(r"[0-9a-f]{40}", response.text)
    correlation_id = body["correlation_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", correlation_id)
    assert correlation_id in body["detail"]
    [record] = [r for r in caplog.records if correlation_id in r.getMessage()]
    assert LEAKY[index].message in record.getMessage()  # the operator sees the whole text
    assert getattr(record, "correlation_id", None) == correlation_id


async def test_plain_details_are_kept_and_carry_no_correlation_id(
    problem_app: FastAPI, make_app_client: Any
) -> None:
    client = await make_app_client(problem_app)
    body = (await client.get("/raise/1")).json()  # LockNotAcquired("busy")
    assert body["detail"] == "busy" and "correlation_id" not in body
    body = (await client.get("/leak/-1")).json()
    assert body["detail"] == "key 'n' changed concurrently; retry" and "correlation_id" not in body


@pytest.mark.parametrize(
    "error",
    [
        redis_exc.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused."),
        redis_exc.TimeoutError("Timeout reading from 10.0.0.7:6379"),
        redis_exc.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        redis_exc.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis_exc.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        redis_exc.RedisClusterUnreachableError("None of the nodes at 10.0.0.7:7000 answered"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_redis_that_cannot_serve_now_answers_503_without_its_text(
    make_app_client: Any, error: Exception
) -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/down")
    async def down() -> None:
        raise error

    response = await (await make_app_client(app)).get("/down")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "retry-after" in response.headers
    for internal in ("10.0.0.7", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "6379"):
        assert internal not in response.text
