"""``install_toolkit``: the toolkit's middleware in the one order that cannot leak.

::

    install_toolkit(
        app,
        rate_limit={"rules": RULES},
        idempotency={"paths": ["/payments"]},
        http_cache={"policy": HttpCachePolicy(ttl=30), "paths": ["/catalog/"]},
        sessions={"secret_key": settings.signing_keys()},
    )

Each argument is ``None`` (not added), ``True`` (defaults) or the keyword
arguments of that middleware. Toolkit middleware the app added before
(``app.add_middleware``) are moved into the same order, so a demo or a
library that adds its own pieces is fixed by one call at the end.

The order, outermost first, and why:

1. ``RateLimitMiddleware``: refuses before anything spends work; its 429 is
   never seen (so never stored) by the layers below.
2. ``IdempotencyMiddleware``: must see the final status and headers of
   every response it stores, so everything that changes a response is
   inside it. A transient answer (408, 409, 425, 429, 503) or a response
   the session layer replaced releases the key instead of being stored.
3. ``HttpCacheMiddleware``: the same reason; it also must see ``Set-Cookie``
   to refuse storing per-client responses (a session's CSRF token).
4. ``SessionMiddleware``: innermost, next to the app, so its ``Set-Cookie``
   and its own 409 (write conflict) / 503 (store down) go out through
   idempotency and the cache instead of being added after they stored a
   response. (The opposite, sessions outside, is the order in which a
   per-session CSRF token was served to another client from the cache and a
   session 409 was replayed as the 200 the idempotency layer had stored.)

A wrong order fails at startup: each of the last three layers records itself
in the ASGI scope at the lifespan's start and on every request, and one that
finds a layer that belongs inside it already outside fails the lifespan
startup (or, without a lifespan, the request) with a ``ConfigurationError``
naming this order. The per-route cache (``HttpCacheRoute``) sits inside the
session layer by construction, so it never stores a response that used the
session. Rate limiting's place is not checked: it changes no response that
another layer stores (429 is a transient status) and remembers none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware

from app.core.errors import ConfigurationError
from app.middleware._order import SAFE_ORDER
from app.middleware.http_cache import HttpCacheMiddleware
from app.middleware.idempotency import IdempotencyMiddleware
from app.middleware.rate_limit import RateLimitMiddleware
from app.middleware.sessions import SessionMiddleware

__all__ = ["SAFE_ORDER", "install_toolkit", "toolkit_order"]

_LAYERS: dict[str, Any] = {
    "rate_limit": RateLimitMiddleware,
    "idempotency": IdempotencyMiddleware,
    "http_cache": HttpCacheMiddleware,
    "sessions": SessionMiddleware,
}
_RANK: dict[object, int] = {cls: SAFE_ORDER.index(name) for name, cls in _LAYERS.items()}
_NAME: dict[object, str] = {cls: name for name, cls in _LAYERS.items()}

Options = bool | Mapping[str, Any] | None


def install_toolkit(
    app: FastAPI,
    *,
    rate_limit: Options = None,
    idempotency: Options = None,
    http_cache: Options = None,
    sessions: Options = None,
) -> None:
    """Add the given toolkit middleware, and put every toolkit middleware in the safe order.

    Call it once the app's other ``add_middleware`` calls are done and before
    it serves (Starlette builds the stack at the first event). Middleware that
    are not the toolkit's keep their places; toolkit ones the app added
    earlier are moved into the order (outermost first: rate limiting,
    idempotency, HTTP cache, sessions), keeping their options. Raises
    ``ConfigurationError`` when the app already started.
    """
    if getattr(app, "middleware_stack", None) is not None:
        raise ConfigurationError(
            "install_toolkit() must run before the app starts (its middleware stack is built)"
        )
    chosen = {
        "rate_limit": rate_limit,
        "idempotency": idempotency,
        "http_cache": http_cache,
        "sessions": sessions,
    }
    for name in reversed(SAFE_ORDER):  # add_middleware puts each new one outermost
        options = chosen[name]
        if options is None or options is False:
            continue
        kwargs = {} if options is True else dict(options)
        app.add_middleware(_LAYERS[name], **kwargs)
    _reorder(app.user_middleware)


def _reorder(stack: list[Middleware]) -> None:
    slots = [i for i, entry in enumerate(stack) if entry.cls in _RANK]
    ordered = sorted((stack[i] for i in slots), key=lambda entry: _RANK[entry.cls])
    for index, entry in zip(slots, ordered, strict=True):
        stack[index] = entry


def toolkit_order(app: FastAPI) -> list[str]:
    """The toolkit middleware of *app*, outermost first (for tests and diagnostics)."""
    return [_NAME[entry.cls] for entry in app.user_middleware if entry.cls in _NAME]
