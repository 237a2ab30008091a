"""Who may use the operator console, through real ASGI on a real redis-server.

Each refusal is checked for its status *and* for leaving Redis untouched: a
lock stays held when a forged, unauthenticated or read-only force-release is
refused. Accepted actions land in the audit stream with who, what and when.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError
from redis.asyncio import Redis

from app.console import create_console
from app.console._access import Operator, Signer
from app.core.config import Settings, get_settings
from app.core.keys import KeySpace
from app.services.locks import RedisLock
from app.testing.plugin import AppClientFactory

pytestmark = pytest.mark.integration

TOKEN = "op-7Hq2xL9mV4cR8tB1nZ6kW3sD5fJ0gYpA"
BEARER = {"authorization": f"Bearer {TOKEN}"}
HTML = {"accept": "text/html"}


def _app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.mount("/ops", create_console(**options))
    return app


async def _held_lock(redis: Redis, name: str = "jobs:1") -> tuple[RedisLock, str]:
    lock = RedisLock(redis, name, timeout=60)
    assert await lock.acquire()
    owner = await redis.get(lock.key)
    assert isinstance(owner, bytes)
    return lock, owner.decode()


def _release_form(name: str, owner: str, csrf: str | None = None) -> dict[str, str]:
    form = {"name": name, "owner": owner, "confirm": "yes"}
    if csrf is not None:
        form["csrf"] = csrf
    return form


async def _audit(redis: Redis) -> list[dict[str, str]]:
    key = KeySpace(get_settings().redis_key_prefix, "console").key("audit")
    rows: Any = await redis.xrange(key)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


async def _login(client: httpx.AsyncClient) -> None:
    r = await client.post("/ops/login", data={"token": TOKEN, "next": "/locks"})
    assert r.status_code == 303 and r.headers["location"] == "/ops/locks"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ops" in cookie


def _csrf(page: str) -> str:
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


async def test_without_token_or_auth_the_console_does_not_exist(
    make_app_client: AppClientFactory, real_redis: Redis, settings_override: Any
) -> None:
    settings_override(console_token=None)
    client = await make_app_client(_app(), real_redis)
    for path in ("/ops/", "/ops/login", "/ops/locks", "/ops/static/console.css"):
        assert (await client.get(path, headers=BEARER)).status_code == 404
    lock, owner = await _held_lock(real_redis)
    refused = await client.post("/ops/locks/release", data=_release_form("jobs:1", owner))
    assert refused.status_code == 404
    assert await lock.locked()


async def test_no_token_is_401_for_scripts_and_a_login_redirect_for_browsers(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    api = await client.get("/ops/streams")
    assert api.status_code == 401
    assert api.headers["www-authenticate"].startswith("Bearer")
    assert api.headers["content-type"] == "application/problem+json"
    browser = await client.get("/ops/streams", headers=HTML)
    assert browser.status_code == 303
    assert browser.headers["location"] == "/ops/login?next=/streams"
    lock, owner = await _held_lock(real_redis)
    refused = await client.post("/ops/locks/release", data=_release_form("jobs:1", owner))
    assert refused.status_code == 401
    assert await lock.locked() and await _audit(real_redis) == []


async def test_a_wrong_token_is_refused_by_bearer_login_and_a_forged_cookie(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    wrong = TOKEN[:-1] + ("B" if TOKEN[-1] != "B" else "C")
    assert (
        await client.get("/ops/", headers={"authorization": f"Bearer {wrong}"})
    ).status_code == 401
    assert (await client.get("/ops/", headers={"authorization": TOKEN})).status_code == 401
    login = await client.post("/ops/login", data={"token": wrong})
    assert login.status_code == 401 and "set-cookie" not in login.headers
    assert "wrong token" in login.text
    # a cookie signed with another key, an expired one, and garbage
    other = Signer([b"not-the-app-secret"], 3600, TOKEN).login_cookie()
    expired = Signer(get_settings().signing_keys(), 3600, TOKEN).login_cookie(
        now=time.time() - 7200
    )
    for value in (other, expired, "9999999999.AAAA", "x"):
        client.cookies.set("console_auth", value, path="/ops")
        assert (await client.get("/ops/")).status_code == 401
    client.cookies.clear()


async def test_a_cookie_from_before_a_token_change_is_refused(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    await _login(client)
    assert (await client.get("/ops/")).status_code == 200
    rotated = await make_app_client(_app(token=TOKEN + "-rotated"), real_redis)
    rotated.cookies = client.cookies
    assert (await rotated.get("/ops/")).status_code == 401


async def test_an_action_without_a_csrf_token_is_403_and_changes_nothing(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    await _login(client)
    lock, owner = await _held_lock(real_redis)
    for csrf in (None, "", "123.abc", Signer([b"other"], 60, TOKEN).csrf_token(_OP)):
        refused = await client.post("/ops/locks/release", data=_release_form("jobs:1", owner, csrf))
        assert refused.status_code == 403, csrf
        assert "CSRF" in refused.json()["detail"]
    assert await lock.locked()
    assert [e["action"] for e in await _audit(real_redis)] == ["console.login"]
    page = await client.get("/ops/locks/release", params={"name": "jobs:1"}, headers=HTML)
    done = await client.post(
        "/ops/locks/release", data=_release_form("jobs:1", owner, _csrf(page.text)), headers=HTML
    )
    assert done.status_code == 303 and done.headers["location"] == "/ops/locks"
    assert not await lock.locked()
    login, release = await _audit(real_redis)
    assert (login["action"], login["via"], login["outcome"]) == (
        "console.login",
        "cookie",
        "logged in",
    )
    assert (release["action"], release["via"]) == ("lock.force_release", "cookie")


_OP = Operator("console-token", "cookie")


async def test_read_only_mode_refuses_every_action_with_403(
    make_app_client: AppClientFactory, real_redis: Redis, settings_override: Any
) -> None:
    settings_override(console_read_only="true")
    client = await make_app_client(_app(token=TOKEN), real_redis)
    lock, owner = await _held_lock(real_redis)
    assert (await client.get("/ops/locks", headers=BEARER)).status_code == 200
    for path, form in (
        ("/ops/locks/release", _release_form("jobs:1", owner)),
        ("/ops/cache/invalidate-tag", {"tag": "users"}),
        ("/ops/sessions/revoke", {"user": "alice", "all": "yes"}),
        ("/ops/streams/trim", {"stream": "events", "maxlen": "0"}),
    ):
        refused = await client.post(path, data=form, headers=BEARER)
        assert refused.status_code == 403, path
        assert "read-only" in refused.json()["detail"]
    assert await lock.locked() and await _audit(real_redis) == []
    page = await client.get("/ops/locks", headers=BEARER)
    assert "Force release" not in page.text


async def test_an_action_is_written_to_the_audit_stream(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    lock, owner = await _held_lock(real_redis, "reports:7")
    before_ms = int(time.time() * 1000) - 1000
    done = await client.post(
        "/ops/locks/release", data=_release_form("reports:7", owner), headers=BEARER
    )
    assert done.status_code == 200
    assert done.json()["outcome"] == "lock 'reports:7' force-released"
    assert not await lock.locked()
    [entry] = await _audit(real_redis)
    assert entry["who"] == "console-token" and entry["via"] == "bearer"
    assert (entry["action"], entry["target"]) == ("lock.force_release", "reports:7")
    assert entry["outcome"] == "lock 'reports:7' force-released"
    assert int(done.json()["audit"].split("-")[0]) >= before_ms  # when: the server's clock
    listed = await client.get("/ops/audit", headers=BEARER)
    assert [r["action"] for r in listed.json()] == ["lock.force_release"]


async def test_a_csrf_token_is_bound_to_its_operator(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    def operator(request: Request) -> str | None:
        return request.headers.get("x-operator")  # stands in for the app's real auth

    client = await make_app_client(_app(auth=operator), real_redis)
    assert (await client.get("/ops/locks")).status_code == 401
    lock, owner = await _held_lock(real_redis)
    confirm = "/ops/locks/release?name=jobs:1"
    mallory_page = await client.get(confirm, headers={"x-operator": "mallory", **HTML})
    stolen = _csrf(mallory_page.text)
    as_alice = {"x-operator": "alice"}
    refused = await client.post(
        "/ops/locks/release", data=_release_form("jobs:1", owner, stolen), headers=as_alice
    )
    assert refused.status_code == 403 and await lock.locked()
    alice_page = await client.get(confirm, headers={**as_alice, **HTML})
    done = await client.post(
        "/ops/locks/release",
        data=_release_form("jobs:1", owner, _csrf(alice_page.text)),
        headers=as_alice,
    )
    assert done.status_code == 200 and not await lock.locked()
    [entry] = await _audit(real_redis)
    assert (entry["who"], entry["via"]) == ("alice", "auth")


async def test_force_release_spares_a_lock_that_changed_hands(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    first, stale_owner = await _held_lock(real_redis)
    await first.release()
    second, _ = await _held_lock(real_redis)
    done = await client.post(
        "/ops/locks/release", data=_release_form("jobs:1", stale_owner), headers=BEARER
    )
    assert "nothing released" in done.json()["outcome"]
    assert await second.owned()


async def test_login_never_redirects_off_the_console(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example", "/ok"):
        r = await client.post("/ops/login", data={"token": TOKEN, "next": target})
        assert r.headers["location"] == ("/ops/ok" if target == "/ok" else "/ops/")


async def test_pages_forbid_framing_and_caching(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    page = await client.get("/ops/", headers=BEARER)
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


async def test_stored_data_is_rendered_as_text_never_as_markup(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    from app.services.streams import stream_keys

    evil = '<img src=x onerror="alert(1)">'
    keys = stream_keys(evil)
    await real_redis.xadd(keys.stream, {"payload": b"x"})
    await real_redis.xadd(keys.dead_letter, {"dlq-id": "1-0", "dlq-error": evil, "payload": b"x"})
    client = await make_app_client(_app(token=TOKEN), real_redis)
    for path, params in (("/ops/streams", {}), ("/ops/streams/detail", {"name": evil})):
        page = await client.get(path, params=params, headers={**BEARER, **HTML})
        assert page.status_code == 200
        assert evil not in page.text
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text


@pytest.mark.parametrize(
    "weak",
    ["short-token", "a" * 40, "ab" * 20, "".join(chr(c) for c in range(65, 105)), "0123456789" * 4],
)
def test_weak_console_tokens_are_refused(weak: str) -> None:
    with pytest.raises(ValidationError):
        Settings(console_token=weak)
    with pytest.raises(ValidationError):
        create_console(token=weak)


async def test_guessing_tokens_is_throttled_per_address(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await make_app_client(_app(token=TOKEN), real_redis)
    for i in range(10):
        form = await client.post("/ops/login", data={"token": f"guess-{i}"})
        assert form.status_code == 401
    throttled = await client.get("/ops/", headers={"authorization": "Bearer guess-11"})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    # even the right token waits: a guess that happens to be right gains nothing
    assert (await client.get("/ops/", headers=BEARER)).status_code == 429
    assert (await client.post("/ops/login", data={"token": TOKEN})).status_code == 429
