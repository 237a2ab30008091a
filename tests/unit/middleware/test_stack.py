"""install_toolkit: the one safe order, moving earlier additions into it, wrong orders refused."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.core.errors import ConfigurationError
from app.middleware.http_cache import HttpCacheMiddleware
from app.middleware.idempotency import IdempotencyMiddleware
from app.middleware.rate_limit import RateLimitMiddleware
from app.middleware.sessions import SessionMiddleware
from app.middleware.stack import SAFE_ORDER, install_toolkit, toolkit_order

SECRET = "s" * 40
CLASSES: dict[str, Any] = {
    "rate_limit": RateLimitMiddleware,
    "idempotency": IdempotencyMiddleware,
    "http_cache": HttpCacheMiddleware,
    "sessions": SessionMiddleware,
}
OPTIONS: dict[str, dict[str, Any]] = {
    "rate_limit": {},
    "idempotency": {},
    "http_cache": {},
    "sessions": {"secret_key": SECRET},
}


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    return app


def test_install_toolkit_adds_in_the_safe_order() -> None:
    app = _app()
    install_toolkit(app, **{name: OPTIONS[name] or True for name in SAFE_ORDER})
    assert toolkit_order(app) == list(SAFE_ORDER)


def test_install_toolkit_moves_earlier_additions_into_the_order() -> None:
    app = _app()
    app.add_middleware(HttpCacheMiddleware)
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(SessionMiddleware, secret_key=SECRET)  # outermost: the unsafe place
    install_toolkit(app)
    assert toolkit_order(app) == ["idempotency", "http_cache", "sessions"]
    session_entry = app.user_middleware[-1]
    assert session_entry.kwargs == {"secret_key": SECRET}


def test_the_demo_is_stacked_in_the_safe_order() -> None:
    from app.main import create_app

    assert toolkit_order(create_app()) == list(SAFE_ORDER)


async def test_install_toolkit_after_start_is_refused() -> None:
    app = _app()
    install_toolkit(app, idempotency=True)
    async with LifespanManager(app):
        with pytest.raises(ConfigurationError, match="before the app starts"):
            install_toolkit(app)


@pytest.mark.parametrize(
    "order",
    [
        order
        for order in itertools.permutations(["idempotency", "http_cache", "sessions"])
        if list(order) != ["idempotency", "http_cache", "sessions"]
    ],
    ids="-".join,
)
async def test_a_wrong_order_fails_the_startup_naming_the_right_one(
    order: tuple[str, ...],
) -> None:
    app = _app()
    for name in reversed(order):  # order is outermost first
        app.add_middleware(CLASSES[name], **OPTIONS[name])
    with pytest.raises(ConfigurationError) as failed:
        async with LifespanManager(app):
            pass
    message = str(failed.value)
    assert (
        "RateLimitMiddleware -> IdempotencyMiddleware -> HttpCacheMiddleware -> "
        "SessionMiddleware -> app" in message
    )
    assert "install_toolkit" in message


async def test_a_wrong_order_without_a_lifespan_fails_the_first_request() -> None:
    app = _app()
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(SessionMiddleware, secret_key=SECRET)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ConfigurationError, match="SessionMiddleware is outside"):
            await client.get("/ok")
