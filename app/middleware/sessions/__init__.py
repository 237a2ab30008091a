"""``SessionMiddleware``: server-side sessions behind ``request.session`` (pure ASGI)."""

from app.middleware.sessions._middleware import (
    Session,
    SessionMiddleware,
    SessionNotLoaded,
    get_session,
    load_session,
)

__all__ = [
    "Session",
    "SessionMiddleware",
    "SessionNotLoaded",
    "get_session",
    "load_session",
]
