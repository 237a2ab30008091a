"""RFC 9457 problem details for every ``ToolkitError``.

``install_problem_handlers(app)`` makes any FastAPI app answer toolkit errors
as ``application/problem+json`` with the error's status, ``type``, ``title``,
``detail``, ``instance`` and extension members, plus headers such as
``Retry-After``. Pure ASGI middleware, which runs outside FastAPI's exception
handlers, sends the same body with ``send_problem``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import Send

from app.core.errors import ToolkitError

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


def problem_body(exc: ToolkitError, instance: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type_uri(exc.problem_type),
        "title": exc.title,
        "status": exc.status_code,
        "detail": exc.detail,
    }
    if instance:
        body["instance"] = instance
    body.update(exc.extensions())
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
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _handle_toolkit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ToolkitError)
    return problem_response(exc, request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    """Register the problem+json handler for ``ToolkitError`` (and subclasses) on *app*."""
    app.add_exception_handler(ToolkitError, _handle_toolkit_error)
