"""Small helpers every part of the streams package uses: the guard, validation, reply shapes,
NOGROUP detection and span attributes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ResponseError

from app.core.errors import ConfigurationError, StreamError
from app.core.guard import Guard
from app.services.streams._models import _Entry

if TYPE_CHECKING:
    from app.services.streams._consumer import StreamConsumer


def _guard(redis: object, stream: str, group: str | None = None) -> Guard:
    """The guard of a producer (or a consumer of *group*) of *stream*: a refused command is a
    ``StreamError`` (its Redis text stays in ``__cause__``, where ``_is_nogroup`` reads it)."""
    subject = f"stream {stream!r}" if group is None else f"stream {stream!r} group {group!r}"
    return Guard(redis, subject, refused=StreamError)


def _is_nogroup(exc: BaseException) -> bool:
    """NOGROUP, or a blocked read woken because its stream was deleted (FLUSHALL, DEL).

    *exc* is the guard's ``StreamError``: the reply text that tells is in its ``__cause__``
    (never in its message), so that is where this looks.
    """
    cause = exc.__cause__ if isinstance(exc, StreamError) else exc
    if not isinstance(cause, ResponseError):
        return False
    text = str(cause)
    return "NOGROUP" in text or ("UNBLOCKED" in text and "no longer exists" in text)


def _is_busygroup(exc: ResponseError) -> bool:
    """``XGROUP CREATE`` of a group that exists: not an error for ``ensure_group``."""
    return "BUSYGROUP" in str(exc)


def _why(exc: BaseException) -> str:
    """*exc* for a log line: a refused command's Redis text is operator information."""
    cause = exc.__cause__
    if isinstance(exc, StreamError) and cause is not None:
        return f"{exc}: {cause}"
    return str(exc) or type(exc).__name__


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _not_negative(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative integer, got {value!r}")
    return value


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
