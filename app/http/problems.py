"""RFC 9457 problem details for every ``ToolkitError``.

``install_problem_handlers(app)`` makes any FastAPI app answer toolkit errors
as ``application/problem+json`` with the error's status, ``type``, ``title``,
``detail``, ``instance`` and extension members, plus headers such as
``Retry-After``. Pure ASGI middleware, which runs outside FastAPI's exception
handlers, sends the same body with ``send_problem``.

Request validation errors keep FastAPI's 422 ``{"detail": [...]}`` body, made
safe to serialize: FastAPI's own handler answers 500 when the rejected input is
a body that is not UTF-8 or a string with a lone surrogate (fastapi#13111).

A route that calls Redis itself (``RedisDep``) and meets an outage, a timeout,
an out-of-memory refusal or a read-only replica gets the same 503
``redis-unavailable`` answer the services give, not a 500 with a stack trace.

Answers never carry internals. An error caused by a Redis error (``WRONGTYPE``,
a script failure, ...), or whose text names a script hash, a Lua chunk
(``@user_script``) or a Redis error code, answers with a generic ``detail``
and a ``correlation_id`` member; the full text goes to the ``app.problems``
log with the same id, so an operator can find it from a client's report.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis import exceptions as redis_exc
from starlette.types import Send

from app.core.errors import RedisUnavailable, ToolkitError
from app.http.asgi import send_response

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "install_problem_handlers",
    "problem_body",
    "problem_response",
    "problem_type_uri",
    "send_problem",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://redis-toolkit.dev/problems/"
"""Stable ``type`` URIs: ``PROBLEM_TYPE_BASE + problem_type`` (the slug never changes)."""

_IANA_TYPES = {
    # draft-ietf-httpapi-ratelimit-headers registers these problem types.
    "quota-exceeded": "https://iana.org/assignments/http-problem-types#quota-exceeded",
    "temporary-reduced-capacity": "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity",
}


def problem_type_uri(problem_type: str) -> str:
    return _IANA_TYPES.get(problem_type, PROBLEM_TYPE_BASE + problem_type)


log = logging.getLogger("app.problems")

_INTERNAL_TEXT = re.compile(
    r"\b[0-9a-fA-F]{40}\b|@user_script|@user_function|\bscript: "
    r"|\b(?:WRONGTYPE|NOSCRIPT|CROSSSLOT|MOVED|NOAUTH|WRONGPASS|NOPERM|EXECABORT|ERR) "
)
"""Text that would tell a client about our Redis: script hashes, Lua chunk names, error codes."""


def _quotes_a_redis_error(exc: ToolkitError) -> bool:
    """True when *exc*'s detail repeats the text of a redis-py error in its cause chain."""
    detail = exc.detail
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        text = str(current)
        if isinstance(current, redis_exc.RedisError) and text and text in detail:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _needs_scrubbing(exc: ToolkitError) -> bool:
    if isinstance(exc, RedisUnavailable):
        return False  # its detail is generic already; the breaker logs the cause once
    if isinstance(exc.__cause__, redis_exc.ResponseError):
        return True  # a command Redis refused (a Guard's ``refused`` error): its reply is internal
    return _INTERNAL_TEXT.search(exc.detail) is not None or _quotes_a_redis_error(exc)


def problem_body(exc: ToolkitError, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 body for *exc*; internals are logged under a ``correlation_id``, not sent."""
    body: dict[str, Any] = {
        "type": problem_type_uri(exc.problem_type),
        "title": exc.title,
        "status": exc.status_code,
        "detail": exc.detail,
    }
    if instance:
        body["instance"] = instance
    body.update(exc.extensions())
    if _needs_scrubbing(exc):
        correlation_id = secrets.token_hex(8)
        cause = exc.__cause__ or exc.__context__
        log.error(
            "problem %s [correlation_id=%s] at %s: %s (cause: %s: %s)",
            exc.problem_type,
            correlation_id,
            instance or "-",
            exc.detail,
            type(cause).__name__ if cause is not None else "-",
            cause if cause is not None else "-",
            extra={"correlation_id": correlation_id},
        )
        body["detail"] = (
            "The backing store could not complete this operation. "
            f"Quote correlation id {correlation_id} when reporting it."
        )
        body["correlation_id"] = correlation_id
    return body


def problem_response(exc: ToolkitError, instance: str | None = None) -> Response:
    """A complete problem+json response for *exc*."""
    return Response(
        content=orjson.dumps(problem_body(exc, instance)),
        status_code=exc.status_code,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers(),
    )


async def send_problem(
    send: Send,
    exc: ToolkitError,
    instance: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send *exc* as a problem+json response through a raw ASGI ``send``."""
    body = orjson.dumps(problem_body(exc, instance))
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
        *(extra_headers or []),
    ]
    await send_response(send, exc.status_code, headers, body)


async def _handle_toolkit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ToolkitError)
    return problem_response(exc, request.url.path)


_TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
    redis_exc.OutOfMemoryError,
    redis_exc.ReadOnlyError,
    redis_exc.ClusterDownError,  # a Cluster node restarted or without coverage, say
    redis_exc.TryAgainError,
    redis_exc.RedisClusterUnreachableError,  # no Cluster node answered (not a RedisError)
)
"""Raw redis-py errors that mean "Redis cannot serve this now" (answered 503)."""


async def _handle_transient_redis_error(request: Request, exc: Exception) -> Response:
    log.warning(
        "%s %s: Redis unavailable (%s: %s); answered 503",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    error = RedisUnavailable(f"Redis call failed: {exc}")
    error.__cause__ = exc
    return problem_response(error, request.url.path)


def _json_safe(value: Any) -> Any:
    """*value* with bytes, lone surrogates, non-finite floats and objects made JSON-safe."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return _json_safe(str(value))


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": _json_safe(exc.errors())})


def install_problem_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on *app*.

    ``ToolkitError`` (and subclasses) answer with their own status; raw redis-py
    connection errors, timeouts, ``LOADING``, ``OOM`` and ``READONLY`` answer 503
    ``redis-unavailable`` with ``Retry-After``; request validation errors answer
    FastAPI's usual 422, whatever bytes the rejected input holds.
    """
    app.add_exception_handler(ToolkitError, _handle_toolkit_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    for error_class in _TRANSIENT_REDIS_ERRORS:
        app.add_exception_handler(error_class, _handle_transient_redis_error)
