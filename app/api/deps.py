"""FastAPI dependencies as ``Annotated`` aliases.

Every dependency resolves the client through ``get_redis()`` when a request
arrives, so replacing ``app.core.redis.redis_client`` (a test's fakeredis
client) redirects all of them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from app.core.config import Settings, get_settings
from app.core.redis import AnyRedis, get_redis

__all__ = ["RedisDep", "SettingsDep", "redis_dependency"]


async def redis_dependency() -> AnyRedis:
    """The global client (async so FastAPI does not hop to its thread pool)."""
    return get_redis()


async def settings_dependency() -> Settings:
    return get_settings()


RedisDep = Annotated[AnyRedis, Depends(redis_dependency)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]

# Each capability adds its dependencies below, inside its own section.

# --- cache ---

# --- http cache ---

# --- idempotency ---

# --- locks ---

# --- rate limiting ---

# --- pubsub ---

# --- streams ---

# --- sessions ---

from app.middleware.sessions import Session, load_session  # noqa: E402
from app.services.sessions import SessionStore  # noqa: E402

__all__ += ["SessionDep", "SessionStoreDep", "session_store_dependency"]


async def session_store_dependency(redis: RedisDep) -> SessionStore:
    """A ``SessionStore`` over the global client (default TTLs), for admin routes.

    Routes behind ``SessionMiddleware`` usually want ``SessionDep`` instead; a
    store with other options is ``SessionStore(redis, idle_ttl=..., ...)``.
    """
    return SessionStore(redis)


SessionDep = Annotated[Session, Depends(load_session)]
"""The request's session, loaded from Redis (needs ``SessionMiddleware``).

Declaring it is what makes a route read the session: routes without it make no
Redis call for sessions. Redis down: 503 problem+json (``sessions_failure_mode``)."""
SessionStoreDep = Annotated[SessionStore, Depends(session_store_dependency)]
