"""Problem answers on a real Redis never carry Redis error text, script hashes or Lua names."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from redis.asyncio import Redis

from app.services.locks import RedisLock

pytestmark = pytest.mark.integration


async def test_wrongtype_through_a_route_answers_a_correlation_id_not_the_redis_text(
    real_redis: Redis, make_app_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_app_client(None, real_redis)
    # A list where the lock script expects a string: its GET fails with WRONGTYPE inside Lua.
    await real_redis.rpush(RedisLock(real_redis, "jobs:wrongtype", timeout=10).key, "not-a-token")
    with caplog.at_level(logging.ERROR, logger="app.problems"):
        response = await client.post("/jobs/wrongtype/run", params={"seconds": 0})
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    for internal in ("WRONGTYPE", "@user_script", "script", "Redis refused"):
        assert internal not in response.text, internal
    assert not re.search(r"\b[0-9a-f]{40}\b", response.text)  # no script sha
    correlation_id = body["correlation_id"]
    assert correlation_id in body["detail"]
    logged = [r.getMessage() for r in caplog.records if correlation_id in r.getMessage()]
    assert len(logged) == 1 and "WRONGTYPE" in logged[0]  # the operator gets the whole story
