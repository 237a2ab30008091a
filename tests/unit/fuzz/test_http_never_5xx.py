"""The whole demo app, hostile headers on every route: never a 5xx (fakeredis).

Every operation of the demo's OpenAPI schema gets requests with arbitrary
values for the headers the toolkit parses: ``Idempotency-Key``, ``Cookie``
(session), ``Cache-Control``, ``Pragma``, ``If-None-Match``,
``If-Modified-Since``, ``Authorization``, ``Range``, ``X-User`` / ``X-Plan``
(rate limits), ``Accept-Language`` (``Vary``), ``Last-Event-ID`` and
``Content-Type``. The answer may be anything but a server error. Schema-driven
parameters and bodies on a real Redis are ``tests/integration/api/test_openapi_fuzz.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.testing.slots import slot_checking_fake_redis
from tests.unit.fuzz._asgi import RunningApp, running_app
from tests.unit.fuzz._openapi import FuzzRequest, header_safe, operations, requests_for

HOSTILE_HEADERS = (
    "idempotency-key",
    "cookie",
    "cache-control",
    "pragma",
    "if-none-match",
    "if-modified-since",
    "authorization",
    "range",
    "x-user",
    "x-plan",
    "accept-language",
    "last-event-id",
    "content-type",
)
tricky = st.sampled_from(
    [
        '""',
        '"' + "k" * 300 + '"',
        "W/",
        "*",
        '"a", W/"b", *',
        'max-age=-1, no-cache="',
        "max-age=99999999999999999999",
        "session=" + "A" * 8 + "." + "B" * 22 + "." + "C" * 43,
        "session=; session=x",
        "bytes=0-",
        "Bearer ",
        "pro",
        "0-0",
        "Mon, 99 Foo 1",
        "application/json; charset=latin-9",
    ]
)
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80) | tricky

SCHEMA = create_app().openapi()
OPERATIONS = operations(SCHEMA)


@st.composite
def hostile_requests(draw: st.DrawFn) -> FuzzRequest:
    op = draw(st.sampled_from(OPERATIONS))
    request = draw(requests_for(op, SCHEMA))
    for name in draw(st.lists(st.sampled_from(HOSTILE_HEADERS), unique=True, max_size=5)):
        request.headers[name] = header_safe(draw(header_value))
    return request


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningApp]:
    with running_app(create_app, lambda: slot_checking_fake_redis()) as running:
        yield running


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=hostile_requests())
def test_hostile_headers_never_get_a_server_error(demo: RunningApp, request: FuzzRequest) -> None:
    response = demo.request(
        request.method, request.url, headers=request.headers, content=request.content
    )
    assert response.status_code < 500, (
        f"{request!r} -> {response.status_code} {response.text[:300]}"
    )
