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
