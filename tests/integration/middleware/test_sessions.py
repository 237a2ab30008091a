"""SessionMiddleware on real Redis through real ASGI apps; the core on every topology."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from app.core.redis import scan_keys
from app.services.sessions import SessionStore
from app.testing.plugin import AppClientFactory, RedisServerInfo
from app.testing.servers import RedisServer
from app.testing.waiting import eventually
from tests.unit.middleware.test_sessions import (
    Hooks,
    build_app,
    cookie_value,
    no_cookie_jar,
    set_cookies,
    with_cookie,
)


async def _commands(redis: Redis, name: str | None = None) -> int:
    """Commands the server has run so far (INFO excluded; commands inside scripts count)."""
    stats = await redis.info("commandstats")
    if name is not None:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def _client(make: AppClientFactory, redis: Any, hooks: Hooks | None = None, **kw: Any) -> Any:
    return await make(build_app(hooks, **kw), redis, cookies=no_cookie_jar())


def _record_key(redis: Redis, cookie: str) -> str:
    """The Redis key of the session record a (signed) session cookie names."""
    family, token = cookie.rpartition(".")[0].split(".")
    return SessionStore(redis)._keys.record(family, token)


async def _ttl_below(redis: Redis, key: str, ms: int) -> None:
    """Wait until *key*'s TTL has run down below *ms* milliseconds."""

    async def below() -> bool:
        return 0 < int(await redis.pttl(key)) < ms

    await eventually(below, f"the TTL of {key!r} to fall below {ms} ms")


async def _recovered(client: httpx.AsyncClient, path: str, **kw: Any) -> httpx.Response:
    """GET *path* until it answers 200 (the breaker let a trial call through) and return that."""
    last: list[httpx.Response] = []

    async def ok() -> bool:
        last[:] = [await client.get(path, **kw)]
        return last[0].status_code == 200

    await eventually(ok, f"GET {path} to recover once Redis is back")
    return last[0]


async def test_cookieless_and_untouched_requests_make_zero_redis_calls(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    client = await _client(make_app_client, real_redis)
    cookie = cookie_value(await client.post("/set", params={"key": "a", "value": "1"}))
    await client.get("/read", headers=with_cookie(cookie))  # caches the load script
    before = await _commands(real_redis)
    for _ in range(5):
        assert (await client.get("/plain")).status_code == 200
        assert (await client.get("/read")).json()["new"] is True  # declares it, no cookie
        assert (await client.get("/plain", headers=with_cookie(cookie))).status_code == 200
        assert (await client.get("/unloaded")).json() == {"user": None}
    assert await _commands(real_redis) - before == 0
    names = ("evalsha", "eval", "hset", "hgetall")
    counts = [await _commands(real_redis, name) for name in names]
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.json()["data"] == {"a": "1"}
    deltas = [await _commands(real_redis, n) - c for n, c in zip(names, counts, strict=True)]
    # one HGETALL: the first load restarted the idle timeout less than touch_after ago
    assert deltas == [0, 0, 0, 1]


async def test_concurrent_requests_changing_different_keys_all_persist(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    hooks = Hooks(barrier=asyncio.Barrier(10))
    client = await _client(make_app_client, topology_redis, hooks)
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    responses = await asyncio.gather(
        *(client.post(f"/overlap/k{i}", headers=with_cookie(cookie)) for i in range(10))
    )
    assert [r.status_code for r in responses] == [200] * 10
    assert all(r.json() == {"seen": 2} for r in responses)  # all loaded the same version
    data = (await client.get("/read", headers=with_cookie(cookie))).json()["data"]
    assert data == {"user": "alice", **{f"k{i}": f"k{i}" for i in range(10)}}


async def test_a_same_key_race_is_a_409_and_the_winner_is_kept(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    client = await _client(make_app_client, topology_redis)
    cookie = cookie_value(await client.post("/set", params={"key": "n", "value": "0"}))
    responses = await asyncio.gather(
        *(client.post("/increment", headers=with_cookie(cookie)) for _ in range(2))
    )
    assert sorted(r.status_code for r in responses) == [200, 409]
    assert (await client.get("/read", headers=with_cookie(cookie))).json()["data"] == {"n": 1}


async def test_logout_during_a_slow_request_sticks(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    hooks = Hooks()
    client = await _client(make_app_client, topology_redis, hooks)
    cookie = cookie_value(await client.post("/login", params={"user": "alice"}))
    slow = asyncio.create_task(client.post("/slow", headers=with_cookie(cookie)))
    await hooks.loaded.wait()
    assert (await client.post("/logout", headers=with_cookie(cookie))).status_code == 200
    hooks.release.set()
    late = await slow
    assert late.status_code == 200 and set_cookies(late)["session"]["max-age"] == "0"
    assert (await client.get("/read", headers=with_cookie(cookie))).json()["new"] is True
    assert [k async for k in scan_keys(topology_redis, "app:session:*")] == []


async def test_tampered_cookie_gives_a_new_session(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    client = await _client(make_app_client, topology_redis)
    good = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    bad = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    r = await client.post("/set", params={"key": "x", "value": "1"}, headers=with_cookie(bad))
    assert r.status_code == 200
    fresh = cookie_value(r)
    assert (await client.get("/read", headers=with_cookie(fresh))).json()["data"] == {"x": "1"}
    assert (await client.get("/read", headers=with_cookie(good))).json()["data"] == {
        "user": "alice"
    }


async def test_idle_and_absolute_expiry_through_http(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    idle = await _client(make_app_client, real_redis, idle_ttl=1, absolute_ttl=30)
    cookie = cookie_value(await idle.post("/set", params={"key": "a", "value": "1"}))
    key = _record_key(real_redis, cookie)
    for _ in range(2):  # each request restarts the idle timer from the full second
        await _ttl_below(real_redis, key, 800)
        assert (await idle.get("/read", headers=with_cookie(cookie))).json()["new"] is False
        assert await real_redis.pttl(key) > 800

    async def expired() -> bool:  # left idle: Redis expires it
        return not await real_redis.exists(key)

    await eventually(expired, "the idle session to expire")
    r = await idle.get("/read", headers=with_cookie(cookie))
    assert r.json()["new"] is True and set_cookies(r)["session"]["max-age"] == "0"

    capped = await _client(make_app_client, real_redis, idle_ttl=1, absolute_ttl=1.2)
    cookie = cookie_value(await capped.post("/set", params={"key": "a", "value": "1"}))
    await _ttl_below(real_redis, _record_key(real_redis, cookie), 600)  # at least 0.4 s old
    assert (await capped.get("/read", headers=with_cookie(cookie))).json()["new"] is False

    async def ended() -> bool:  # active all along (every check reads it), yet it ends
        r = await capped.get("/read", headers=with_cookie(cookie))
        return bool(r.json()["new"])

    await eventually(ended, "the session to reach its absolute lifetime")


async def test_the_pre_login_cookie_stops_at_once_through_http(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    # A second of grace: the read below must land inside it even on a loaded machine.
    client = await _client(make_app_client, topology_redis, regenerate_grace=1)
    old = cookie_value(await client.post("/set", params={"key": "cart", "value": "1"}))
    new = cookie_value(await client.post("/login", params={"user": "a"}, headers=with_cookie(old)))
    assert new.rpartition(".")[0] != old.rpartition(".")[0]
    raced = await client.get("/read", headers=with_cookie(old))
    assert raced.json()["new"] is True and "set-cookie" not in raced.headers  # within the grace

    async def forgotten() -> bool:  # past the grace: cleared as unknown
        late = await client.get("/read", headers=with_cookie(old))
        assert late.json()["new"] is True
        return "set-cookie" in late.headers and set_cookies(late)["session"]["max-age"] == "0"

    await eventually(forgotten, "the pre-login id to be forgotten after the grace")
    assert (await client.get("/read", headers=with_cookie(new))).json()["data"] == {
        "cart": "1",
        "user": "a",
    }


async def test_a_request_in_flight_across_a_login_keeps_the_new_cookie(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    hooks = Hooks()
    client = await _client(make_app_client, topology_redis, hooks)
    old = cookie_value(await client.post("/set", params={"key": "theme", "value": "dark"}))
    slow = asyncio.create_task(client.post("/slow", headers=with_cookie(old)))
    await hooks.loaded.wait()  # it read the session under the old id
    login = await client.post("/login", params={"user": "alice"}, headers=with_cookie(old))
    new = cookie_value(login)
    hooks.release.set()
    late = await slow
    assert late.status_code == 200
    assert "set-cookie" not in late.headers  # the browser's new cookie is not cleared
    # its write through the old id was dropped: nothing reaches the new session through it
    assert (await client.get("/read", headers=with_cookie(new))).json()["data"] == {
        "theme": "dark",
        "user": "alice",
    }


async def test_session_fixation_the_planted_cookie_gets_nothing_after_the_login(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    client = await _client(make_app_client, topology_redis)
    # the attacker makes a session and plants its cookie in the victim's browser
    planted = cookie_value(await client.post("/set", params={"key": "theme", "value": "dark"}))
    login = await client.post("/login", params={"user": "victim"}, headers=with_cookie(planted))
    assert login.status_code == 200
    victim = cookie_value(login)
    await client.post("/set", params={"key": "card", "value": "4111"}, headers=with_cookie(victim))

    # the attacker's cookie reads nothing of the victim's session...
    read = await client.get("/read", headers=with_cookie(planted))
    assert read.json() == {"data": {}, "new": True, "id": None}
    assert "victim" not in read.text and "4111" not in read.text
    # ...writes nothing into it (a write starts a separate, new session)...
    write = await client.post(
        "/set", params={"key": "user", "value": "attacker"}, headers=with_cookie(planted)
    )
    assert write.status_code == 200
    assert cookie_value(write) not in (planted, victim)
    for path in ("/logout", "/delete?key=card", "/login?user=attacker"):
        assert (await client.post(path, headers=with_cookie(planted))).status_code == 200
    assert (await client.get("/read", headers=with_cookie(victim))).json()["data"] == {
        "theme": "dark",
        "user": "victim",
        "card": "4111",
    }
    # ...and logging in through it hands out a fresh, empty session, never the victim's
    again = await client.post("/login", params={"user": "mallory"}, headers=with_cookie(planted))
    stolen = cookie_value(again)
    assert stolen != victim
    assert (await client.get("/read", headers=with_cookie(stolen))).json()["data"] == {
        "user": "mallory"
    }


async def test_works_with_a_decode_responses_client(
    make_app_client: AppClientFactory, redis_server: RedisServerInfo, real_redis: Redis
) -> None:
    decoded = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client = await _client(make_app_client, decoded)
        cookie = cookie_value(await client.post("/set", params={"key": "a", "value": "\u00e9"}))
        await client.post("/append", params={"item": "x"}, headers=with_cookie(cookie))
        data = (await client.get("/read", headers=with_cookie(cookie))).json()["data"]
        assert data == {"a": "\u00e9", "cart": ["x"]}
    finally:
        await decoded.aclose()


async def test_redis_down_is_503_for_session_routes_only_and_recovers(
    make_app_client: AppClientFactory,
    private_server: RedisServer,
    settings_override: Callable[..., None],
) -> None:
    settings_override(breaker_reset_timeout="0.2")
    redis = Redis.from_url(private_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client = await _client(make_app_client, redis)
        cookie = cookie_value(await client.post("/set", params={"key": "a", "value": "1"}))
        private_server.stop()
        r = await client.get("/read", headers=with_cookie(cookie))
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"]
        r = await client.post("/set", params={"key": "b", "value": "2"})
        assert r.status_code == 503 and "set-cookie" not in r.headers
        assert (await client.get("/plain", headers=with_cookie(cookie))).status_code == 200
        assert (await client.get("/read")).status_code == 200  # no cookie: nothing to load
        private_server.restart()
        r = await _recovered(client, "/read", headers=with_cookie(cookie))
        assert r.json()["new"] is True  # the restart lost the data
    finally:
        await redis.aclose()


async def test_demo_login_profile_counter_logout(
    topology_redis: Any, make_app_client: AppClientFactory
) -> None:
    client: httpx.AsyncClient = await make_app_client(None, topology_redis)
    assert (await client.get("/session/profile")).status_code == 401
    assert (await client.post("/session/counter")).json() == {"counter": 1}
    anonymous = client.cookies["session"]
    r = await client.post("/session/login", json={"user": "alice"})
    assert r.json() == {"user": "alice"}
    assert client.cookies["session"] != anonymous  # regenerated
    assert (await client.post("/session/counter")).json() == {"counter": 2}
    r = await client.get("/session/profile")
    assert r.json() == {"user": "alice", "counter": 2, "login_count": 1}
    assert r.headers["vary"] == "Cookie"
    racing = await asyncio.gather(
        *(client.post("/session/counter", params={"delay": 0.3}) for _ in range(2))
    )
    assert sorted(r.status_code for r in racing) == [200, 409]  # one increment is not lost
    assert (await client.get("/session/profile")).json()["counter"] == 3
    assert (await client.post("/session/logout")).json() == {"logged_out": True}
    assert "session" not in client.cookies
    assert (await client.get("/session/profile")).status_code == 401
