"""The one safe order of the toolkit's middleware, checked by the layers themselves.

Outermost first: rate limiting, idempotency, HTTP cache, sessions, then the
app (``install_toolkit`` in ``app.middleware.stack`` adds them so). Each
layer that remembers or changes responses records itself in the ASGI scope
when the lifespan starts and on every request; a layer that finds one that
belongs *inside* it already outside refuses: the lifespan startup fails with
a message naming the right order, and a request without a lifespan raises
``ConfigurationError``. Why this order: see ``app.middleware.stack``.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import ConfigurationError

__all__ = [
    "REPLACED_KEY",
    "SAFE_ORDER",
    "enter_layer",
    "enter_or_pass",
    "pass_lifespan",
    "session_replaced",
]

log = logging.getLogger("app.middleware")

SAFE_ORDER: Final = ("rate_limit", "idempotency", "http_cache", "sessions")
"""Layer names, outermost first."""

_NAMES: Final = {
    "rate_limit": "RateLimitMiddleware",
    "idempotency": "IdempotencyMiddleware",
    "http_cache": "HttpCacheMiddleware",
    "sessions": "SessionMiddleware",
}
_LAYERS_KEY: Final = "app.toolkit.layers"
REPLACED_KEY: Final = "app.sessions.replaced"
"""Set in the scope when the session layer replaced the app's response (409, 503)."""

_RIGHT_ORDER: Final = " -> ".join(_NAMES[name] for name in SAFE_ORDER) + " -> app"


def enter_layer(scope: Scope, name: str) -> None:
    """Record layer *name* on *scope*; raise ``ConfigurationError`` when the order is wrong."""
    rank = SAFE_ORDER.index(name)
    layers: list[str] = scope.setdefault(_LAYERS_KEY, [])
    for outer in layers:
        if SAFE_ORDER.index(outer) > rank:
            raise ConfigurationError(
                f"{_NAMES[outer]} is outside {_NAMES[name]}, so {_NAMES[name]} cannot see "
                f"the responses {_NAMES[outer]} changes (its Set-Cookie, its 409/503) and "
                f"would store or replay them for other clients. The safe order, outermost "
                f"first, is: {_RIGHT_ORDER}. Use app.middleware.stack.install_toolkit(app, ...) "
                "to add them in that order."
            )
    layers.append(name)


async def pass_lifespan(
    app: ASGIApp, name: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """Forward a lifespan scope after checking the order; a wrong order fails the startup.

    The failure is reported as ``lifespan.startup.failed`` (uvicorn then exits)
    and the ``ConfigurationError`` is raised as well.
    """
    try:
        enter_layer(scope, name)
    except ConfigurationError as exc:
        log.error("%s", exc)
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
        raise  # servers that ignore startup.failed (or test harnesses) still stop here
    await app(scope, receive, send)


async def enter_or_pass(
    app: ASGIApp, name: str, scope: Scope, receive: Receive, send: Send
) -> bool:
    """Enter layer *name* with an HTTP request (False: the layer handles it), or pass anything else.

    A lifespan goes through ``pass_lifespan`` (the order is checked at startup),
    any other scope (websocket) straight to *app*; True then: nothing is left to do.
    """
    if scope["type"] == "http":
        enter_layer(scope, name)
        return False
    if scope["type"] == "lifespan":
        await pass_lifespan(app, name, scope, receive, send)
    else:
        await app(scope, receive, send)
    return True


def session_replaced(scope: Scope) -> bool:
    """True when the session layer replaced this request's response with its own error."""
    return bool(scope.get(REPLACED_KEY))
