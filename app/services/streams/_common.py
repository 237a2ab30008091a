"""Small helpers every part of the streams package uses: text, validation, reply shapes,
error wrapping and span attributes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ResponseError

from app.core.errors import ConfigurationError, RedisUnavailable, StreamError
from app.core.redis import CONNECTION_ERRORS, REFUSED_FOR_NOW
from app.services.streams._models import _Entry

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_nogroup(exc: BaseException) -> bool:
    """NOGROUP, or a blocked read woken because its stream was deleted (FLUSHALL, DEL)."""
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return "NOGROUP" in text or ("UNBLOCKED" in text and "no longer exists" in text)


def _seconds(value: float, name: str, *, allow_zero: bool = False) -> float:
    seconds = float(value)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _socket_timeout(client: Any) -> float | None:
    try:
        timeout = client.get_connection_kwargs().get("socket_timeout")
    except AttributeError:
        return None
    return float(timeout) if timeout else None


def _field_value(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _entries(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """Entries of a one-stream XREADGROUP reply, RESP2 list or redis-py's unified dict shape."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [e for entries in reply.values() for e in entries or ()]
    return [e for _stream, entries in reply for e in entries or ()]


def _wrap_redis_error(exc: BaseException, action: str) -> Exception:
    if isinstance(exc, CONNECTION_ERRORS):
        return RedisUnavailable(f"could not {action}: Redis is unreachable ({exc})")
    if isinstance(exc, REFUSED_FOR_NOW):  # refused for now: 503, like an outage
        return RedisUnavailable(f"could not {action}: Redis refused it for now ({exc})")
    return StreamError(f"could not {action}: {exc}")


# -- span attributes of the consumer's traced operations ----------------------


class _Part(Protocol):
    """One of a consumer's collaborators (its traced methods describe the consumer)."""

    @property
    def consumer(self) -> StreamConsumer[Any]: ...


def _consumer_attrs(part: _Part, *args: Any, **kwargs: Any) -> dict[str, str]:
    consumer = part.consumer
    attrs = {
        "messaging.system": "redis",
        "messaging.destination.name": consumer.stream,
        "messaging.consumer.group.name": consumer.group,
    }
    first = args[0] if args else None
    if isinstance(first, _Entry | str):
        attrs["messaging.message.id"] = first if isinstance(first, str) else first.id
    return attrs


def _received(got: int | list[Any]) -> str:
    return "received" if got else "empty"


def _fields(part: _Part, entry: _Entry) -> Mapping[Any, Any]:
    return entry.fields
