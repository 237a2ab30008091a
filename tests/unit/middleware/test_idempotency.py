"""IdempotencyMiddleware on fakeredis: key syntax, scoping, fingerprints, wiring."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from hypothesis import given
from hypothesis import strategies as st

from app.api.deps import IdempotencyKeyDep, idempotency_key
from app.api.problems import install_problem_handlers
from app.core import redis as core_redis
from app.core.codec import default_codec
from app.core.errors import ConfigurationError, IdempotencyKeyInvalid
from app.core.redis import client_decodes_responses
from app.http.caller import resolve_caller
from app.middleware.idempotency import (
    IdempotencyMiddleware,
    StoredResponse,
    default_principal,
    parse_idempotency_key,
)

PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


def _app() -> FastAPI:
    return FastAPI()


# -- key syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("  key_123  ", "key_123"),
        ('"with space"', "with space"),
        ('"quote \\" and backslash \\\\"', 'quote " and backslash \\'),
        ('"param";x=1', "param"),
        ("a" * 255, "a" * 255),
        ('"' + "b" * 255 + '"', "b" * 255),
    ],
)
def test_valid_keys(header: str, key: str) -> None:
    assert parse_idempotency_key(header) == key
    assert parse_idempotency_key(header.encode()) == key


@pytest.mark.parametrize(
    "header",
    [
        "",
        '""',
        "a" * 256,
        '"' + "b" * 256 + '"',
        "has space",
        'bare"quote',
        '"unterminated',
        '"bad \\n escape"',
        '"trailing" junk',
        '"tab\there"',
        "caf\u00e9",
        "ctl\x01",
    ],
)
def test_invalid_keys(header: str) -> None:
    with pytest.raises(IdempotencyKeyInvalid):
        parse_idempotency_key(header.encode("utf-8"))


@given(PRINTABLE.filter(lambda s: len(s) <= 255))
def test_any_printable_key_round_trips_as_an_sf_string(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_idempotency_key(quoted) == key


# -- scope and fingerprint -------------------------------------------------------------------


def test_default_principal_hashes_authorization_and_ignores_the_client() -> None:
    token = b"Bearer secret"
    scope = {"headers": [(b"authorization", token)], "client": ("10.0.0.1", 1)}
    principal = default_principal(scope)
    assert principal == "auth:" + hashlib.sha256(token).hexdigest()
    assert "secret" not in principal
    assert default_principal({"headers": [], "client": ("10.0.0.1", 1)}) == ""
    assert default_principal({"headers": [], "client": ("10.0.0.2", 1)}) == ""


def test_scope_key_separates_every_part() -> None:
    mw = IdempotencyMiddleware(_app(), secret=b"k" * 32)
    mw._refresh()
    base = mw.scope_key("alice", "POST", "/pay", "k1")
    assert len(base) == 32 and base == mw.scope_key("alice", "POST", "/pay", "k1")
    variants = {
        mw.scope_key("bob", "POST", "/pay", "k1"),
        mw.scope_key("alice", "PATCH", "/pay", "k1"),
        mw.scope_key("alice", "POST", "/pay2", "k1"),
        mw.scope_key("alice", "POST", "/pay", "k2"),
        mw.scope_key("alic", "eP", "OST/pay", "k1"),  # no ambiguity from concatenation
    }
    assert base not in variants and len(variants) == 5
    other_secret = IdempotencyMiddleware(_app(), secret=b"j" * 32)
    other_secret._refresh()
    assert other_secret.scope_key("alice", "POST", "/pay", "k1") != base


def test_record_names_and_fingerprints_stay_the_same_across_releases() -> None:
    # A retry that reaches a worker of the next release must find the record this one
    # stored: the record name and the fingerprint are part of the stored format.
    mw = IdempotencyMiddleware(_app(), secret=b"0123456789abcdef" * 2)
    mw._refresh()
    assert mw.scope_key("a:" + "f" * 32, "POST", "/orders/{id}", "key-1") == (
        "b2c59d9850793bce2e9eefbb1a95af71"
    )
    assert mw.scope_key(None, "POST", "/p\u00e9", "k") == "e5ccc450a910ba77050fddf83bc84a49"
    assert mw.request_fingerprint("POST", "/orders/7", b"a=1", b'{"amount": 1}') == (
        "3b623615ac175969bafea78b7700fc3a"
    )
    as_json = IdempotencyMiddleware(_app(), fingerprint="json")
    assert as_json.request_fingerprint("POST", "/orders/7", b"", b'{"b": 1, "a": 2}') == (
        "28e4497b74492eaa865f7a2a8876893d"
    )
    first3 = IdempotencyMiddleware(_app(), fingerprint=lambda body: body[:3])
    assert first3.request_fingerprint("PATCH", "/x", b"", b"abcdef") == (
        "0866d7589b9064163d295b8492635a8d"
    )


def test_secret_defaults_to_the_current_signing_key(settings_override: Any) -> None:
    settings_override(secret_key="s" * 40)
    a = IdempotencyMiddleware(_app())
    a._refresh()
    b = IdempotencyMiddleware(_app(), secret=b"s" * 40)
    b._refresh()
    assert a.scope_key(None, "POST", "/p", "k") == b.scope_key(None, "POST", "/p", "k")


def test_record_names_are_the_scope_key_under_every_signing_key(settings_override: Any) -> None:
    settings_override(secret_key="n" * 40, secret_key_fallbacks='["' + "o" * 40 + '"]')
    mw = IdempotencyMiddleware(_app())
    mw._refresh()
    caller = resolve_caller({"type": "http", "headers": [(b"x-api-key", b"k")], "client": None})
    names = mw.record_names(caller, "POST", "/p", "key-1")
    assert len(names) == 2 and names[0] == mw.scope_key(caller.digest(), "POST", "/p", "key-1")
    settings_override(secret_key="o" * 40, secret_key_fallbacks=None)
    before = IdempotencyMiddleware(_app())
    before._refresh()
    old = resolve_caller({"type": "http", "headers": [(b"x-api-key", b"k")], "client": None})
    assert before.record_names(old, "POST", "/p", "key-1") == [names[1]]


def test_fingerprint_modes() -> None:
    raw = IdempotencyMiddleware(_app())
    as_json = IdempotencyMiddleware(_app(), fingerprint="json")
    amount = IdempotencyMiddleware(_app(), fingerprint=lambda body: body[:3])
    a, b = b'{"a":1,"b":2}', b'{ "b": 2, "a": 1 }'
    assert raw.request_fingerprint("POST", "/p", b"", a) != raw.request_fingerprint(
        "POST", "/p", b"", b
    )
    assert as_json.request_fingerprint("POST", "/p", b"", a) == as_json.request_fingerprint(
        "POST", "/p", b"", b
    )
    assert as_json.request_fingerprint("POST", "/p", b"", b"not json") != (
        as_json.request_fingerprint("POST", "/p", b"", b'"not json"')
    )
    assert amount.request_fingerprint("POST", "/p", b"", b"abcX") == amount.request_fingerprint(
        "POST", "/p", b"", b"abcY"
    )
    for other in (("PATCH", "/p", b"", a), ("POST", "/q", b"", a), ("POST", "/p", b"x=1", a)):
        assert raw.request_fingerprint(*other) != raw.request_fingerprint("POST", "/p", b"", a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_conflict": "queue"},
        {"fingerprint": "xml"},
        {"failure_mode": "maybe"},
        {"max_stored_body": -1},
        {"wait_timeout": -1},
        {"ttl": 0},
        {"lease": 0},
        {"anonymous": "share"},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        IdempotencyMiddleware(_app(), **kwargs)


# -- wiring on fakeredis -----------------------------------------------------------------------


def _wired_app(**options: Any) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    app.state.runs = 0
    app.state.lifespan_ran = False

    @app.post("/pay")
    async def pay() -> dict[str, int]:
        app.state.runs += 1
        return {"run": app.state.runs}

    @app.post("/explicit")
    async def explicit(key: IdempotencyKeyDep) -> dict[str, Any]:
        app.state.runs += 1
        return {"run": app.state.runs, "key": key}

    app.add_middleware(IdempotencyMiddleware, **options)
    return app


@pytest.fixture
def fake(fake_client: Any) -> Any:
    core_redis.redis_client = fake_client
    return fake_client


async def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_replay_on_fakeredis_with_both_decode_modes(fake: Any) -> None:
    app = _wired_app()
    async with await _client(app) as client:
        first = await client.post("/pay", headers={"Idempotency-Key": "k"})
        replay = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    assert app.state.runs == 1


async def test_a_response_stored_by_an_earlier_release_still_replays(fake: Any) -> None:
    codec = default_codec().with_text_safe(client_decodes_responses(fake))
    app = _wired_app()
    async with await _client(app) as client:
        first = await client.post("/pay", headers={"Idempotency-Key": "k"})
        [record] = [key async for key in fake.scan_iter() if await fake.hget(key, "r")]
        stored = StoredResponse.unpack(codec.decode(await fake.hget(record, "r")))
        assert stored.body == first.content and stored.status == 200
        # earlier releases stored the dataclass itself through the codec (a tagged dict)
        await fake.hset(record, "r", codec.encode(stored))
        replay = await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["content-type"] == first.headers["content-type"]
    assert app.state.runs == 1


async def test_lifespan_and_other_scopes_pass_through(fake: Any) -> None:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.lifespan_ran = True
        yield

    app = _wired_app()
    app.router.lifespan_context = lifespan
    async with LifespanManager(app):
        assert app.state.lifespan_ran is True


async def test_methods_option(fake: Any) -> None:
    app = _wired_app(methods=("PATCH",))
    async with await _client(app) as client:
        for _ in range(2):
            await client.post("/pay", headers={"Idempotency-Key": "k"})
    assert app.state.runs == 2  # POST is not guarded any more
    assert await fake.dbsize() == 0


async def test_custom_header_name(fake: Any) -> None:
    app = _wired_app(header_name="X-Request-Key", required=True)
    async with await _client(app) as client:
        missing = await client.post("/pay", headers={"Idempotency-Key": "k"})
        assert missing.status_code == 400 and "X-Request-Key" in missing.json()["detail"]
        await client.post("/pay", headers={"X-Request-Key": "k"})
        replay = await client.post("/pay", headers={"X-Request-Key": "k"})
    assert replay.headers["idempotent-replayed"] == "true" and app.state.runs == 1


async def test_dependency_alias_guards_an_unlisted_path(fake: Any) -> None:
    app = _wired_app(paths=("/pay",))
    async with await _client(app) as client:
        first = await client.post("/explicit", headers={"Idempotency-Key": '"dep-1"'})
        replay = await client.post("/explicit", headers={"Idempotency-Key": "dep-1"})
        no_key = await client.post("/explicit")
    assert first.json() == {"run": 1, "key": "dep-1"}
    assert replay.content == first.content
    assert no_key.json() == {"run": 2, "key": None}


async def test_dependency_without_the_middleware_is_a_configuration_error(fake: Any) -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/x", dependencies=[Depends(idempotency_key())])
    async def x() -> dict[str, bool]:
        return {"ran": True}

    async with await _client(app) as client:
        response = await client.post("/x", headers={"Idempotency-Key": "k"})
    assert response.status_code == 500
    assert "IdempotencyMiddleware" in response.json()["detail"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": float("nan")},
        {"lease": float("inf")},
        {"ttl": True},
        {"wait_timeout": float("nan")},
        {"conflict_retry_after": float("inf")},
    ],
)
def test_durations_that_are_not_finite_seconds_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        IdempotencyMiddleware(_app(), **kwargs)


def test_durations_may_be_timedeltas() -> None:
    middleware = IdempotencyMiddleware(
        _app(), ttl=timedelta(hours=1), lease=timedelta(seconds=10), wait_timeout=0
    )
    assert middleware.ttl == 3600 and middleware.lease == 10


async def test_fail_open_logs_the_outage_once_not_per_request(
    fake: Any, settings_override: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    settings_override(idempotency_failure_mode="open")
    app = _wired_app()
    fake.connection_pool.connection_kwargs["server"].connected = False
    with caplog.at_level(logging.WARNING, logger="app.idempotency"):
        async with await _client(app) as client:
            for n in range(8):
                response = await client.post("/pay", headers={"Idempotency-Key": f"k{n}"})
                assert response.status_code == 200
                assert response.headers["idempotency-stored"] == "false"
    assert app.state.runs == 8
    warnings = [r for r in caplog.records if r.name == "app.idempotency"]
    assert len(warnings) == 1 and "without idempotency protection" in warnings[0].getMessage()
    layer: Any = app.middleware_stack
    while not isinstance(layer, IdempotencyMiddleware):
        layer = layer.app
    assert layer.stats["unprotected"] == 8  # still counted per request


async def test_fail_closed_answers_503_and_logs_nothing_per_request(
    fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = _wired_app()
    fake.connection_pool.connection_kwargs["server"].connected = False
    with caplog.at_level(logging.WARNING, logger="app.idempotency"):
        async with await _client(app) as client:
            for n in range(3):
                response = await client.post("/pay", headers={"Idempotency-Key": f"k{n}"})
                assert response.status_code == 503
    assert app.state.runs == 0
    assert not [r for r in caplog.records if r.name == "app.idempotency"]
