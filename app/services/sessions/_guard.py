"""The one way a session command calls Redis and fails (breaker and error wrapping)."""

from __future__ import annotations

from types import TracebackType

from redis.exceptions import RedisError

from app.core.errors import RedisUnavailable, ToolkitError
from app.core.redis import CONNECTION_ERRORS, REFUSED_FOR_NOW, CircuitBreaker

__all__ = ["Guard"]


class Guard:
    """Breaker + error wrapping around Redis calls (a class: cheaper than @contextmanager)."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        self._breaker.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, REFUSED_FOR_NOW):  # OOM under noeviction, or a read-only replica
            self._breaker.record_success()  # the server answered
            raise RedisUnavailable(f"Redis refused a session write for now: {exc}") from exc
        if isinstance(exc, RedisError) and not isinstance(exc, CONNECTION_ERRORS):
            self._breaker.record_success()  # the server answered
            raise ToolkitError(f"Redis refused a session command: {exc}") from exc
        self._breaker.__exit__(exc_type, exc, tb)
