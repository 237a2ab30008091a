"""Property tests for the parsers of untrusted or configured text.

Rate strings, ``Idempotency-Key`` values and session cookies: any input gives
either a value or the one documented error, and valid inputs mean what they say.
(``Cache-Control`` / ``If-None-Match`` / ``Vary`` parsing is covered by
``tests/unit/middleware/test_http_cache_service.py``; the whole-app header fuzz is
``test_http_never_5xx.py``.)
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.api.deps import SessionDep
from app.api.problems import install_problem_handlers
from app.core.errors import IdempotencyKeyInvalid
from app.core.redis import lifespan
from app.middleware.idempotency import parse_idempotency_key
from app.middleware.sessions import SessionMiddleware
from app.services.rate_limit import Policy, parse_policies
from app.services.sessions import new_session_id
from app.testing.slots import slot_checking_fake_redis
from tests.unit.fuzz._asgi import running_app

# -- rate strings ---------------------------------------------------------------------

UNITS = {
    "ms": 0.001,
    "millisecond": 0.001,
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
    "week": 604800,
}
names = st.from_regex(r"[A-Za-z0-9_.:+-]{1,64}", fullmatch=True)


@given(st.text(max_size=80))
def test_any_text_is_a_policy_list_or_a_value_error(text: str) -> None:
    try:
        policies = parse_policies(text)
    except ValueError:
        return
    assert policies and all(p.limit >= 1 for p in policies)


@given(
    limit=st.integers(1, 10**6),
    count=st.none() | st.integers(1, 1000),
    unit=st.sampled_from(sorted(UNITS)),
    plural=st.booleans(),
    form=st.sampled_from(["/", " per "]),
    name=st.none() | names.filter(lambda n: "/" not in n),
)
def test_every_documented_rate_form_parses_to_its_numbers(
    limit: int, count: int | None, unit: str, plural: bool, form: str, name: str | None
) -> None:
    suffix = "s" if plural and unit != "m" else ""  # "ms" is milliseconds, not minutes
    text = f"{limit}{form}{'' if count is None else f'{count} '}{unit}{suffix}"
    if name is not None:
        text = f"{name}={text}"
    (policy,) = parse_policies(text)
    assert policy.limit == limit
    assert policy.window == pytest.approx((count or 1) * UNITS[unit])
    assert policy.name == (name or policy.name)


@given(
    limit=st.integers(1, 10**6),
    window=st.floats(0.001, 10**8, allow_nan=False),
    name=names,
)
@example(limit=5, window=34_560_000.0, name="p")  # runs every time: 400 days
def test_str_of_any_policy_parses_back_to_it(limit: int, window: float, name: str) -> None:
    policy = Policy(limit, window, name=name)
    assert Policy.parse(str(policy)) == policy


def test_policy_names_cannot_contain_the_rate_separator() -> None:
    with pytest.raises(ValueError):
        Policy(5, 1, name="a/b")


# -- Idempotency-Key ------------------------------------------------------------------

printable_key = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255
)
token_key = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)


@given(st.binary(max_size=300))
def test_any_header_value_is_a_key_or_idempotency_key_invalid(raw: bytes) -> None:
    try:
        key = parse_idempotency_key(raw)
    except IdempotencyKeyInvalid:
        return
    assert 1 <= len(key) <= 255
    assert all(0x20 <= ord(c) <= 0x7E for c in key)


@given(token_key.filter(lambda k: '"' not in k))
def test_a_bare_token_and_its_quoted_form_are_the_same_key(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\") + '"'
    assert parse_idempotency_key(key) == parse_idempotency_key(quoted) == key


@given(printable_key, st.from_regex(r"(;[a-z]{1,8}(=[a-z0-9]{1,8})?){1,3}", fullmatch=True))
def test_parameters_after_a_quoted_key_are_ignored(key: str, params: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_idempotency_key(quoted + params) == key


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=256, max_size=300))
def test_keys_over_255_characters_are_refused(key: str) -> None:
    with pytest.raises(IdempotencyKeyInvalid):
        parse_idempotency_key('"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"')


# -- session cookies ------------------------------------------------------------------

SECRET = b"fuzz-secret-" + b"s" * 32


def _session_app() -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)

    @app.post("/set")
    async def set_value(session: SessionDep) -> dict[str, bool]:
        session["user"] = "alice"
        return {"ok": True}

    @app.get("/read")
    async def read(session: SessionDep) -> dict[str, object]:
        return {"user": session.get("user"), "id": session.id}

    app.add_middleware(SessionMiddleware, secret_key=SECRET)
    return app


cookie_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_cookie_gives_a_fresh_session_and_only_a_signed_one_its_data(
    data: st.DataObject,
) -> None:
    with running_app(_session_app, lambda: slot_checking_fake_redis()) as running:
        login = running.request("POST", "/set")
        assert login.status_code == 200
        signed = login.cookies["session"]
        for _ in range(3):
            value = data.draw(
                st.one_of(
                    cookie_text,
                    st.builds(lambda i: f"{new_session_id()}.{'A' * 43}", st.integers()),
                    _mutations(signed),
                ),
                label="cookie",
            )
            response = running.request(
                "GET", "/read", headers={"cookie": f"session={value}".encode("latin-1")}
            )
            assert response.status_code == 200, response.text
            if value != signed:
                assert response.json() == {"user": None, "id": None}
        same = running.request("GET", "/read", headers={"cookie": f"session={signed}"})
        assert same.json()["user"] == "alice"


def _mutations(signed: str) -> st.SearchStrategy[str]:
    """The signed cookie with one character replaced, dropped or added."""

    def mutate(i: int, c: str, how: int) -> str:
        i %= len(signed)
        if how == 0:
            return signed[:i] + c + signed[i + 1 :]
        if how == 1:
            return signed[:i] + signed[i + 1 :]
        return signed[:i] + c + signed[i:]

    alphabet = st.sampled_from("ABCabc012_-.=")
    return st.builds(mutate, st.integers(0, 200), alphabet, st.integers(0, 2))
