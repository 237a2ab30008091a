"""Small FastAPI apps served by uvicorn for the HTTP group, one process each.

Every app answers ``GET /bare`` (the same ~100 B JSON object, no Redis) so a
process's own overhead shows against the plain app's ``/bare``. Every route
returns that same object, so serialization costs the same everywhere. The
Redis URL comes from ``REDIS_URL``.
"""
