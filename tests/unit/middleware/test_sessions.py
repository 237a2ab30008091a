"""SessionMiddleware on fakeredis, through a real FastAPI app over ASGI."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from http.cookies import SimpleCookie
from typing import Any

import fakeredis
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import cookie_parser

from app.api.deps import SessionDep
from app.api.problems import install_problem_handlers
from app.core.errors import ConfigurationError, StateError, UsageError
from app.middleware.sessions import Session, SessionMiddleware, SessionNotLoaded, get_session
from app.services.sessions import SessionStore, new_session_id
from app.testing.plugin import AppClientFactory

SECRET = "unit-test-secret-key-0123456789abcdef"


class CountingRedis(fakeredis.FakeAsyncRedis):
    """fakeredis that records every command it is sent (no mock: a real fake server)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        self.commands.append((name.decode() if isinstance(name, bytes) else str(name)).upper())
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@dataclass
class Hooks:
    """Events the test routes wait on, so requests overlap for real."""

    barrier: asyncio.Barrier = field(default_factory=lambda: asyncio.Barrier(2))
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def build_app(hooks: Hooks | None = None, **options: Any) -> FastAPI:
    hooks = hooks or Hooks()
    app = FastAPI()
    install_problem_handlers(app)
    options.setdefault("secret_key", SECRET)
    app.add_middleware(SessionMiddleware, **options)

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/read")
    async def read(session: SessionDep) -> dict[str, Any]:
        return {"data": dict(session), "new": session.is_new, "id": session.id}

    @app.post("/set")
    async def set_value(session: SessionDep, key: str, value: str) -> dict[str, str]:
        session[key] = value
        return {key: value}

    @app.post("/delete")
    async def delete_value(session: SessionDep, key: str) -> dict[str, Any]:
        return {"was": session.pop(key, None)}

    @app.post("/overlap/{key}")
    async def overlap(session: SessionDep, key: str) -> dict[str, int]:
        session[key] = key
        await hooks.barrier.wait()  # both requests have loaded the same version
        return {"seen": len(session)}

    @app.post("/increment")
    async def increment(session: SessionDep) -> dict[str, int]:
        value = int(session.get("n", 0)) + 1
        await hooks.barrier.wait()
        session["n"] = value
        return {"n": value}

    @app.post("/slow")
    async def slow(session: SessionDep) -> dict[str, bool]:
        session["cart"] = ["book"]
        hooks.loaded.set()
        await hooks.release.wait()
        return {"ok": True}

    @app.post("/login")
    async def login(session: SessionDep, user: str) -> dict[str, str]:
        session["user"] = user
        session.regenerate()
        return {"user": user}

    @app.post("/logout")
    async def logout(session: SessionDep) -> dict[str, bool]:
        session.invalidate()
        return {"ok": True}

    @app.post("/clear-then-set")
    async def clear_then_set(session: SessionDep) -> dict[str, bool]:
        session.clear()
        session["fresh"] = "1"
        return {"ok": True}

    @app.post("/append")
    async def append(session: SessionDep, item: str) -> dict[str, Any]:
        cart = session.get("cart")
        if cart is None:
            session["cart"] = [item]
        else:
            cart.append(item)  # in place: no __setitem__
        return {"ok": True}

    @app.get("/unloaded")
    async def unloaded(request: Request) -> dict[str, Any]:
        return {"user": request.session.get("user")}

    @app.get("/late")
    async def late(session: SessionDep) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"started"
            session["too_late"] = "1"  # the headers (and the save) are already gone

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/stream")
    async def stream(session: SessionDep) -> StreamingResponse:
        session["streamed"] = "yes"

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                yield part

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    """Our Set-Cookie headers, parsed: name -> Morsel."""
    out: dict[str, Any] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        out.update(jar)
    return out


def cookie_value(response: httpx.Response, name: str = "session") -> str:
    morsel = set_cookies(response)[name]
    return str(morsel.value)


def with_cookie(value: str, name: str = "session") -> dict[str, bytes]:
    return {"cookie": f"{name}={value}".encode()}


def no_cookie_jar() -> CookieJar:
    """A jar that keeps nothing: every test request carries exactly the cookie it names."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


@pytest_asyncio.fixture
async def counting() -> AsyncIterator[CountingRedis]:
    redis = CountingRedis(server=fakeredis.FakeServer())
    try:
        yield redis
    finally:
        await redis.aclose()


Factory = Callable[..., Any]


@pytest.fixture
def client_for(make_app_client: AppClientFactory, counting: CountingRedis) -> Factory:
    async def make(app: FastAPI) -> httpx.AsyncClient:
        client: httpx.AsyncClient = await make_app_client(app, counting, cookies=no_cookie_jar())
        return client

    return make


async def test_requests_that_do_not_use_the_session_make_no_redis_call(
    client_for: Factory, counting: CountingRedis
) -> None:
    client = await client_for(build_app())
    r = await client.get("/plain")
    assert r.status_code == 200
    assert "set-cookie" not in r.headers and "vary" not in r.headers
    r = await client.get("/read")  # declares the session, no cookie: nothing to load
    assert r.json() == {"data": {}, "new": True, "id": None}
    assert "set-cookie" not in r.headers
    assert r.headers["vary"] == "Cookie"
    assert counting.commands == []

    created = await client.post("/set", params={"key": "a", "value": "1"})
    value = cookie_value(created)
    counting.commands.clear()
    r = await client.get("/plain", headers=with_cookie(value))  # cookie, session untouched
    assert r.status_code == 200 and "set-cookie" not in r.headers
    assert counting.commands == []
    await client.get("/read", headers=with_cookie(value))  # the first load restarts the idle
    counting.commands.clear()  # timeout (read-and-touch script); the next ones within
    r = await client.get("/read", headers=with_cookie(value))  # touch_after only read
    assert r.json()["data"] == {"a": "1"}
    assert "set-cookie" not in r.headers
    assert counting.commands == ["HGETALL"]


async def test_a_new_session_is_stored_with_a_signed_cookie_and_safe_flags(
    client_for: Factory,
) -> None:
    client = await client_for(build_app())
    r = await client.post("/set", params={"key": "theme", "value": "dark"})
    morsel = set_cookies(r)["session"]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert int(morsel["max-age"]) == 12 * 3600
    assert not morsel["secure"]  # APP_ENV=development
    assert r.headers["vary"] == "Cookie"
    session_id, _, signature = morsel.value.rpartition(".")
    assert len(signature) == 43 and session_id.count(".") == 1
    r = await client.get("/read", headers=with_cookie(morsel.value))
    assert r.json()["data"] == {"theme": "dark"}
    assert r.json()["id"] == session_id


async def test_secure_outside_development_and_the_host_prefix(
    client_for: Factory, settings_override: Callable[..., None]
) -> None:
    settings_override(app_env="test")
    client = await client_for(build_app(host_prefix=True))
    r = await client.post("/set", params={"key": "a", "value": "1"})
    morsel = set_cookies(r)["__Host-session"]
    assert morsel["secure"] is True and morsel["path"] == "/" and not morsel["domain"]
    r = await client.get("/read", headers=with_cookie(morsel.value, "__Host-session"))
    assert r.json()["data"] == {"a": "1"}
    with pytest.raises(ConfigurationError, match="__Host-"):
        SessionMiddleware(build_app(), secret_key=SECRET, host_prefix=True, https_only=False)
    with pytest.raises(ConfigurationError, match="__Host-"):
        SessionMiddleware(build_app(), secret_key=SECRET, host_prefix=True, domain="a.example")
    with pytest.raises(ConfigurationError, match="Secure"):
        SessionMiddleware(build_app(), secret_key=SECRET, same_site="none", https_only=False)


def test_host_prefix_is_the_default_when_production_strict(
    settings_override: Callable[..., None],
) -> None:
    settings_override(
        app_env="production",
        redis_url="redis://127.0.0.1:1/0",
        secret_key="production-secret-key-0123456789abcdefghij",
    )
    assert SessionMiddleware(build_app(), secret_key=SECRET).cookie_name == "__Host-session"
    settings_override(session_cookie_name="sid")
    assert SessionMiddleware(build_app(), secret_key=SECRET).cookie_name == "__Host-sid"
    # a cookie that cannot carry the prefix keeps its name (and a warning says why)
    scoped = SessionMiddleware(build_app(), secret_key=SECRET, domain="a.example")
    assert scoped.cookie_name == "sid"
    assert SessionMiddleware(build_app(), secret_key=SECRET, host_prefix=False).cookie_name == "sid"


@pytest.mark.parametrize("env", ["development", "test"])
def test_no_host_prefix_by_default_in_development_and_test(
    settings_override: Callable[..., None], env: str
) -> None:
    settings_override(app_env=env)
    assert SessionMiddleware(build_app(), secret_key=SECRET).cookie_name == "session"
    if env == "test":  # Secure by default outside development: a __Host- name is accepted
        explicit = SessionMiddleware(build_app(), secret_key=SECRET, cookie_name="__Host-s")
        assert explicit.cookie_name == "__Host-s"
    else:  # a __Host- name is never sent without Secure
        with pytest.raises(ConfigurationError, match="__Host-"):
            SessionMiddleware(build_app(), secret_key=SECRET, cookie_name="__Host-s")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"),  # signature
        lambda v: ("B" if v[0] != "B" else "C") + v[1:],  # id
        lambda v: v.rpartition(".")[0],  # no signature
        lambda v: "garbage",
        lambda v: v + ".extra",
        lambda v: "\u00e9" * 20,
    ],
    ids=["signature", "id", "unsigned", "garbage", "extra", "non-ascii"],
)
async def test_a_tampered_cookie_gives_a_fresh_session_never_an_error(
    client_for: Factory, counting: CountingRedis, tamper: Callable[[str], str]
) -> None:
    client = await client_for(build_app())
    good = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    bad = tamper(good)
    counting.commands.clear()
    r = await client.get("/read", headers=with_cookie(bad))
    assert r.status_code == 200
    assert r.json() == {"data": {}, "new": True, "id": None}
    assert counting.commands == []  # rejected before any Redis call
    assert set_cookies(r)["session"]["max-age"] == "0"  # the bad cookie is cleared
    r = await client.post("/set", params={"key": "x", "value": "1"}, headers=with_cookie(bad))
    fresh = cookie_value(r)
    assert fresh.rpartition(".")[0] != good.rpartition(".")[0]
    r = await client.get("/read", headers=with_cookie(good))
    assert r.json()["data"] == {"user": "alice"}  # the real session is untouched


async def test_a_validly_signed_unknown_id_is_never_adopted(
    client_for: Factory, counting: CountingRedis
) -> None:
    app = build_app()
    client = await client_for(app)
    forged = SessionMiddleware(app, secret_key=SECRET).sign("AAAAAAAA." + "B" * 22)
    r = await client.post("/set", params={"key": "a", "value": "1"}, headers=with_cookie(forged))
    issued = cookie_value(r)
    assert issued.rpartition(".")[0] != "AAAAAAAA." + "B" * 22
    assert not [k async for k in counting.scan_iter(match="*BBBB*")]


async def test_secret_rotation_verifies_old_keys_and_re_signs_with_the_current_one(
    client_for: Factory,
) -> None:
    old_client = await client_for(build_app(secret_key="old-key-0123456789"))
    old_cookie = cookie_value(await old_client.post("/set", params={"key": "a", "value": "1"}))
    rotated = await client_for(build_app(secret_key=["new-key-0123456789", "old-key-0123456789"]))
    r = await rotated.get("/read", headers=with_cookie(old_cookie))
    assert r.json()["data"] == {"a": "1"}
    new_cookie = cookie_value(r)
    assert new_cookie != old_cookie
    assert new_cookie.rpartition(".")[0] == old_cookie.rpartition(".")[0]  # same session
    r = await rotated.get("/read", headers=with_cookie(new_cookie))
    assert r.json()["data"] == {"a": "1"} and "set-cookie" not in r.headers
    dropped = await client_for(build_app(secret_key="new-key-0123456789"))
    assert (await dropped.get("/read", headers=with_cookie(old_cookie))).json()["new"] is True


async def test_two_concurrent_requests_changing_different_keys_both_persist(
    make_app_client: AppClientFactory, counting: CountingRedis
) -> None:
    client = await make_app_client(build_app(), counting, cookies=no_cookie_jar())
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    first, second = await asyncio.gather(
        client.post("/overlap/a", headers=with_cookie(cookie)),
        client.post("/overlap/b", headers=with_cookie(cookie)),
    )
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json() == second.json() == {"seen": 2}  # each saw only its own key
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.json()["data"] == {"user": "alice", "a": "a", "b": "b"}


async def test_a_conflicting_change_to_the_same_key_is_a_409_not_a_lost_update(
    make_app_client: AppClientFactory, counting: CountingRedis
) -> None:
    client = await make_app_client(build_app(), counting, cookies=no_cookie_jar())
    cookie = cookie_value(await client.post("/set", params={"key": "n", "value": "0"}))
    first, second = await asyncio.gather(
        client.post("/increment", headers=with_cookie(cookie)),
        client.post("/increment", headers=with_cookie(cookie)),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    loser = first if first.status_code == 409 else second
    assert loser.headers["content-type"] == "application/problem+json"
    assert loser.json()["type"].endswith("/session-conflict")
    assert "n" in loser.json()["detail"]
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.json()["data"] == {"n": 1}


async def test_logout_while_a_slow_request_is_in_flight_does_not_resurrect_the_session(
    make_app_client: AppClientFactory, counting: CountingRedis
) -> None:
    hooks = Hooks()
    client = await make_app_client(build_app(hooks), counting, cookies=no_cookie_jar())
    cookie = cookie_value(await client.post("/login", params={"user": "alice"}))
    slow = asyncio.create_task(client.post("/slow", headers=with_cookie(cookie)))
    await hooks.loaded.wait()
    out = await client.post("/logout", headers=with_cookie(cookie))
    assert set_cookies(out)["session"]["max-age"] == "0"
    hooks.release.set()
    late = await slow
    assert late.status_code == 200
    assert set_cookies(late)["session"]["max-age"] == "0"  # not a new session either
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.json() == {"data": {}, "new": True, "id": None}
    keys = [k async for k in counting.scan_iter(match="app:session:*")]
    assert keys == []


async def test_regenerate_issues_a_new_id_and_the_old_one_stops_at_once(
    client_for: Factory,
) -> None:
    client = await client_for(build_app())
    before = cookie_value(await client.post("/set", params={"key": "cart", "value": "1"}))
    r = await client.post("/login", params={"user": "alice"}, headers=with_cookie(before))
    after = cookie_value(r)
    assert after.rpartition(".")[0] != before.rpartition(".")[0]
    assert (await client.get("/read", headers=with_cookie(after))).json()["data"] == {
        "cart": "1",
        "user": "alice",
    }
    # the old id reads nothing at once (it used to read the new session for a grace window)
    raced = await client.get("/read", headers=with_cookie(before))
    assert raced.json() == {"data": {}, "new": True, "id": None}
    assert "set-cookie" not in raced.headers  # nor is the browser's (new) cookie cleared

    strict = await client_for(build_app(regenerate_grace=0))
    before = cookie_value(await strict.post("/set", params={"key": "cart", "value": "1"}))
    await strict.post("/login", params={"user": "bob"}, headers=with_cookie(before))
    assert (await strict.get("/read", headers=with_cookie(before))).json()["new"] is True


async def test_in_place_changes_to_a_read_value_are_saved(client_for: Factory) -> None:
    client = await client_for(build_app())
    cookie = cookie_value(await client.post("/append", params={"item": "a"}))
    await client.post("/append", params={"item": "b"}, headers=with_cookie(cookie))
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.json()["data"] == {"cart": ["a", "b"]}


async def test_clear_ends_the_session_and_later_keys_start_a_new_one(
    client_for: Factory, counting: CountingRedis
) -> None:
    client = await client_for(build_app())
    old = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    new = cookie_value(await client.post("/clear-then-set", headers=with_cookie(old)))
    assert new.rpartition(".")[0] != old.rpartition(".")[0]
    assert (await client.get("/read", headers=with_cookie(new))).json()["data"] == {"fresh": "1"}
    assert (await client.get("/read", headers=with_cookie(old))).json()["new"] is True


async def test_deleting_a_key_is_saved(client_for: Factory) -> None:
    client = await client_for(build_app())
    cookie = cookie_value(await client.post("/set", params={"key": "flash", "value": "hi"}))
    r = await client.post("/delete", params={"key": "flash"}, headers=with_cookie(cookie))
    assert r.json() == {"was": "hi"}
    assert (await client.get("/read", headers=with_cookie(cookie))).json()["data"] == {}


async def test_reading_an_unloaded_stored_session_is_a_clear_programming_error(
    client_for: Factory,
) -> None:
    client = await client_for(build_app())
    assert (await client.get("/unloaded")).json() == {"user": None}  # no cookie: fine
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    r = await client.get("/unloaded", headers=with_cookie(cookie))  # a StateError: its problem
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/state-error") and "SessionDep" in r.json()["detail"]


async def test_without_problem_handlers_an_unloaded_session_raises_session_not_loaded(
    make_app_client: AppClientFactory, counting: CountingRedis
) -> None:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, secret_key=SECRET)

    @app.get("/unloaded")
    async def unloaded(request: Request) -> dict[str, Any]:
        return {"user": request.session.get("user")}

    client = await make_app_client(app, counting, cookies=no_cookie_jar())
    record = await SessionStore(counting).create(data={"user": "bob"})
    cookie = SessionMiddleware(app, secret_key=SECRET).sign(record.id)
    with pytest.raises(SessionNotLoaded, match="SessionDep") as caught:
        await client.get("/unloaded", headers=with_cookie(cookie))
    assert isinstance(caught.value, StateError) and isinstance(caught.value, RuntimeError)


async def test_autoload_makes_request_session_work_without_the_dependency(
    client_for: Factory,
) -> None:
    client = await client_for(build_app(autoload=True))
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    r = await client.get("/unloaded", headers=with_cookie(cookie))
    assert r.json() == {"user": "alice"}


async def test_streaming_responses_keep_their_body_and_get_the_cookie(client_for: Factory) -> None:
    client = await client_for(build_app())
    r = await client.get("/stream")
    assert r.text == "abc"
    cookie = cookie_value(r)
    assert (await client.get("/read", headers=with_cookie(cookie))).json()["data"] == {
        "streamed": "yes"
    }


async def test_redis_down_is_503_only_for_requests_that_use_the_session(
    client_for: Factory, counting: CountingRedis
) -> None:
    client = await client_for(build_app())
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    counting.connection_pool.connection_kwargs["server"].connected = False
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/redis-unavailable")
    r = await client.post("/set", params={"key": "a", "value": "1"})  # new session: save fails
    assert r.status_code == 503 and "set-cookie" not in r.headers
    assert (await client.get("/plain", headers=with_cookie(cookie))).status_code == 200
    assert (await client.get("/plain")).status_code == 200
    assert (await client.get("/read")).status_code == 200  # no cookie: nothing to load


async def test_fail_open_serves_an_empty_unsaved_session_when_redis_is_down(
    client_for: Factory, counting: CountingRedis
) -> None:
    client = await client_for(build_app(failure_mode="open"))
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    counting.connection_pool.connection_kwargs["server"].connected = False
    r = await client.get("/read", headers=with_cookie(cookie))
    assert r.status_code == 200 and r.json()["data"] == {}
    r = await client.post("/set", params={"key": "a", "value": "1"})
    assert r.status_code == 200 and "set-cookie" not in r.headers


async def test_fail_open_logs_the_outage_once_not_once_per_request(
    client_for: Factory, counting: CountingRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = await client_for(build_app(failure_mode="open"))
    cookie = cookie_value(await client.post("/set", params={"key": "user", "value": "alice"}))
    counting.connection_pool.connection_kwargs["server"].connected = False
    with caplog.at_level("WARNING", logger="app.sessions"):
        for _ in range(4):
            assert (await client.get("/read", headers=with_cookie(cookie))).status_code == 200
            assert (await client.post("/set", params={"key": "a", "value": "1"})).status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "app.sessions"]
    assert len(logged) == 1, logged
    assert logged[0].startswith("session store 'session': Redis call failed")


def test_bad_durations_fail_when_the_middleware_is_built() -> None:
    app = FastAPI()
    bad: list[tuple[str, Any]] = [
        ("idle_ttl", 0),
        ("absolute_ttl", math.nan),
        ("regenerate_grace", -1),
        ("touch_after", -1),
        ("touch_after", 1800),  # not shorter than the default idle_ttl
    ]
    for option, value in bad:
        with pytest.raises(ConfigurationError, match=option):
            SessionMiddleware(app, secret_key=SECRET, **{option: value})
    middleware = SessionMiddleware(app, secret_key=SECRET, absolute_ttl=dt.timedelta(hours=2))
    assert "; Max-Age=7200;" in middleware.cookie.set(new_session_id())


async def test_one_store_per_client_built_on_first_use(counting: CountingRedis) -> None:
    middleware = SessionMiddleware(FastAPI(), secret_key=SECRET, idle_ttl=60)
    other = CountingRedis(server=fakeredis.FakeServer())
    try:
        store = middleware.store(counting)
        assert middleware.store(counting) is store and store.idle_ms == 60_000
        assert middleware.store(other) is not store and middleware.store(other).redis is other
        fixed = SessionStore(counting)
        given = SessionMiddleware(FastAPI(), secret_key=SECRET, store=fixed)
        assert given.store(other) is fixed and given.store() is fixed
    finally:
        await other.aclose()


def test_a_session_key_that_is_not_a_string_is_a_usage_error() -> None:
    middleware = SessionMiddleware(FastAPI(), secret_key=SECRET)
    session = Session(middleware, {"type": "http", "headers": []})  # no cookie: a new session
    for key in ("", 1):
        with pytest.raises(UsageError, match="non-empty strings") as caught:
            session[key] = "x"  # type: ignore[index]
        assert isinstance(caught.value, TypeError)


async def test_without_problem_handlers_the_middleware_still_answers_503(
    make_app_client: AppClientFactory, counting: CountingRedis
) -> None:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, secret_key=SECRET)

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        session = await get_session(request).load()
        return {"user": session.get("user")}

    client = await make_app_client(app, counting, cookies=no_cookie_jar())
    store = SessionStore(counting)
    record = await store.create(data={"user": "bob"})
    cookie = SessionMiddleware(app, secret_key=SECRET).sign(record.id)
    assert (await client.get("/whoami", headers=with_cookie(cookie))).json() == {"user": "bob"}
    counting.connection_pool.connection_kwargs["server"].connected = False
    r = await client.get("/whoami", headers=with_cookie(cookie))
    assert r.status_code == 503 and r.json()["status"] == 503


async def test_get_session_without_the_middleware_says_how_to_install_it() -> None:
    with pytest.raises(RuntimeError, match="add_middleware"):
        get_session({"type": "http"})


async def test_demo_routes_log_in_count_and_log_out(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/session/profile")).status_code == 401
    assert (await app_client.post("/session/counter")).json() == {"counter": 1}
    anonymous = app_client.cookies["session"]
    assert (await app_client.post("/session/login", json={"user": "alice"})).status_code == 200
    assert app_client.cookies["session"] != anonymous
    profile = await app_client.get("/session/profile")
    assert profile.json() == {"user": "alice", "counter": 1, "login_count": 1}
    assert (await app_client.post("/session/logout")).json() == {"logged_out": True}
    assert "session" not in app_client.cookies
    assert (await app_client.get("/session/profile")).status_code == 401
    assert (await app_client.post("/session/login", json={"user": ""})).status_code == 422


async def test_changes_after_the_response_started_are_reported_not_silently_dropped(
    client_for: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await client_for(build_app())
    cookie = cookie_value(await client.post("/set", params={"key": "a", "value": "1"}))
    with caplog.at_level("WARNING", logger="app.sessions"):
        r = await client.get("/late", headers=with_cookie(cookie))
    assert r.text == "started"
    assert "changed after the response started" in caplog.text
    assert (await client.get("/read", headers=with_cookie(cookie))).json()["data"] == {"a": "1"}


async def test_autoload_with_redis_down_answers_503_before_the_app_runs(
    client_for: Factory, counting: CountingRedis
) -> None:
    client = await client_for(build_app(autoload=True))
    cookie = cookie_value(await client.post("/set", params={"key": "a", "value": "1"}))
    counting.connection_pool.connection_kwargs["server"].connected = False
    r = await client.get("/plain", headers=with_cookie(cookie))
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert (await client.get("/plain")).status_code == 200


def _parsed_cookie(headers: list[bytes], name: str) -> str | None:
    """What Starlette's parser finds: the first Cookie header whose value for *name* is non-empty."""
    for header in headers:
        found = cookie_parser(header.decode("latin-1")).get(name)
        if found:
            return found
    return None


@pytest.mark.parametrize(
    "headers",
    [
        [b"session=abc"],
        [b"a=1; session=abc; b=2"],
        [b"session=abc;other=2"],
        [b"  session  =  abc  ; x=1"],
        [b"\tsession=abc"],
        [b"session=first; session=last"],  # the last of one header wins
        [b"xsession=evil; session=abc"],
        [b"session=abc; session_x=1"],
        [b"session_x=1"],
        [b"sessions=1; my-session=2"],
        [b"a=session; b=session=x"],  # the name inside other cookies' values
        [b"a=x session=abc"],
        [b'session="a\\"b\\073"; x=1'],  # quoted: unescaped as Starlette does
        [b'session="abc"'],
        [b"session=; x=1", b"session=second"],  # an empty value: the next header counts
        [b"x=1", b"session=from-the-second-header"],
        [b"session=one", b"session=two"],
        [b"session"],
        [b"=session"],
        [b"session=a=b=c"],
        [b"session=caf\xe9"],  # latin-1
        [b";;session=abc;;"],
        [b""],
        [],
    ],
)
def test_the_session_cookie_is_read_as_starlettes_parser_reads_it(headers: list[bytes]) -> None:
    cookie = SessionMiddleware(build_app(), secret_key=SECRET).cookie
    scope = {"headers": [(b"host", b"x"), *((b"cookie", h) for h in headers)]}
    assert cookie.read(scope) == _parsed_cookie(headers, "session")


def test_only_verified_cookie_values_are_remembered_with_the_key_that_signed_them() -> None:
    session_id = new_session_id()
    old = SessionMiddleware(build_app(), secret_key="old-key-0123456789").cookie
    cookie = SessionMiddleware(
        build_app(), secret_key=["new-key-0123456789", "old-key-0123456789"]
    ).cookie
    signed_old, signed_new = old.sign(session_id), cookie.sign(session_id)
    for _ in range(2):  # the second answer comes from what the first one remembered
        assert cookie.verify(signed_old) == (session_id, 1)  # still re-signed next time
        assert cookie.verify(signed_new) == (session_id, 0)
    forged = f"{session_id}.{'A' * 43}"  # the same id under a signature nobody made
    assert cookie.verify(forged) is None and cookie.verify(forged) is None
    other = SessionMiddleware(build_app(), secret_key="other-key-0123456789").cookie
    assert other.verify(signed_new) is None  # nothing is shared between keys


async def test_vary_cookie_joins_the_apps_own_vary_header(client_for: Factory) -> None:
    app = build_app()

    @app.get("/negotiated")
    async def negotiated(session: SessionDep) -> JSONResponse:
        return JSONResponse({"new": session.is_new}, headers={"Vary": "Accept-Encoding"})

    client = await client_for(app)
    r = await client.get("/negotiated")
    assert r.headers.get_list("vary") == ["Accept-Encoding, Cookie"]
    value = cookie_value(await client.post("/set", params={"key": "a", "value": "1"}))
    r = await client.get("/negotiated", headers=with_cookie(value))
    assert r.headers.get_list("vary") == ["Accept-Encoding, Cookie"]
    assert "set-cookie" not in r.headers and r.json() == {"new": False}
