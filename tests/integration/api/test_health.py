"""``/healthz`` is public: it shows status and latency, never a password, host or port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from app.core import redis as core_redis
from app.testing.servers import RedisServer

pytestmark = pytest.mark.integration

PASSWORD = "hunter2-0123456789"


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    server = RedisServer().start()  # it answers the start-up PING before it needs a password
    try:
        with redis.Redis(host=server.host, port=server.port) as admin:
            admin.config_set("requirepass", PASSWORD)
        yield server
    finally:
        server.cleanup()


def _urls(server: RedisServer) -> list[str]:
    address = f"{server.host}:{server.port}"
    return [
        f"redis://:{PASSWORD}@{address}/0",
        f"redis://default:{PASSWORD}@{address}/0",
        f"redis://{address}/0?password={PASSWORD}",
        f"redis://{address}/0?db=0&password={PASSWORD}",
    ]


@pytest.mark.parametrize("form", range(4), ids=["bare", "userinfo", "query", "query-2nd"])
async def test_healthz_never_shows_the_password_host_or_port(
    password_server: RedisServer,
    make_app_client: Any,
    settings_override: Callable[..., None],
    form: int,
) -> None:
    settings_override(redis_url=_urls(password_server)[form])
    core_redis.redis_client = None  # the app builds (and owns) its client from REDIS_URL
    client = await make_app_client(None)
    response = await client.get("/healthz")
    assert response.status_code == 200  # the password was used: the server requires it
    assert set(response.json()) == {"status", "latency_ms"}
    for secret in (PASSWORD, password_server.host, str(password_server.port)):
        assert secret not in response.text


@pytest.mark.parametrize("form", range(4), ids=["bare", "userinfo", "query", "query-2nd"])
async def test_health_details_mask_the_password_when_enabled(
    password_server: RedisServer,
    make_app_client: Any,
    settings_override: Callable[..., None],
    form: int,
) -> None:
    settings_override(redis_url=_urls(password_server)[form], health_details="true")
    core_redis.redis_client = None
    client = await make_app_client(None)
    body = (await client.get("/healthz")).json()
    assert body["role"] == "master" and body["breaker"] == "closed"
    assert "***" in body["url"] and PASSWORD not in body["url"]
