"""What a guarded request answers without running: replays, problems, and their OpenAPI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import Scope, Send

from app.core.errors import CodecError, IdempotencyResponseNotKept, ToolkitError
from app.http.asgi import send_response
from app.http.problems import PROBLEM_CONTENT_TYPE, send_problem

__all__ = [
    "IDEMPOTENCY_RESPONSES",
    "NOT_STORED_HEADER",
    "REPLAYED_HEADER",
    "Abort",
    "StoredResponse",
    "pack_response",
]

REPLAYED_HEADER: Final = (b"idempotent-replayed", b"true")
NOT_STORED_HEADER: Final = (b"idempotency-stored", b"false")


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored for replay; ``body`` is None when it was over the cap."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None

    def pack(self) -> bytes:
        """One blob: a JSON head line ``[status, headers, kept]``, then the body bytes as sent.

        The body is never parsed or re-encoded (no base64), so storing and
        replaying cost the same whatever its size; the service's codec stores
        the blob as bytes.
        """
        return pack_response(self.status, self.headers, self.body)

    @classmethod
    def unpack(cls, stored: Any) -> StoredResponse:
        """The response in a stored record: a ``pack`` blob, or the dict records written by
        earlier releases (still replayed until they expire). ``CodecError`` when malformed."""
        if not isinstance(stored, bytes):
            return _legacy(stored)
        head, _, body = stored.partition(b"\n")
        try:
            status, headers, kept = orjson.loads(head)
            return cls(int(status), [(str(k), str(v)) for k, v in headers], body if kept else None)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise CodecError(f"stored idempotent response is malformed: {exc}") from exc


def pack_response(status: int, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
    """``StoredResponse(status, headers, body).pack()``, without building the response."""
    head = orjson.dumps([status, headers, body is not None])
    return head + b"\n" + body if body is not None else head + b"\n"


def _legacy(stored: Any) -> StoredResponse:
    try:
        return TypeAdapter(StoredResponse).validate_python(stored)
    except ValidationError as exc:
        raise CodecError(f"stored idempotent response is malformed: {exc}") from exc


class Abort(Exception):
    """Ends a guarded request early with a replay or a problem (never seen by users)."""

    def __init__(
        self, error: ToolkitError | None = None, replay: StoredResponse | None = None
    ) -> None:
        super().__init__("idempotency short-circuit")
        self.error = error
        self.replay = replay

    async def respond(self, send: Send, scope: Scope) -> None:
        if self.replay is not None and self.replay.body is None:
            await send_not_kept(send, self.replay, scope)
        elif self.replay is not None:
            await send_replay(send, self.replay)
        else:
            assert self.error is not None
            await send_problem(send, self.error, instance=scope.get("path"))


async def send_replay(send: Send, stored: StoredResponse) -> None:
    """The stored response again, byte for byte, with ``Idempotent-Replayed: true``."""
    body = stored.body if stored.body is not None else b""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append(REPLAYED_HEADER)
    await send_response(send, stored.status, headers, body)


_NOT_KEPT_PASSED: Final = frozenset({"location", "content-location", "link", "retry-after"})


async def send_not_kept(send: Send, stored: StoredResponse, scope: Scope) -> None:
    """The retry of a request whose response was over the cap: 410, never an empty success."""
    error = IdempotencyResponseNotKept(
        f"this request was already processed (status {stored.status}), but its response body "
        "was over the storage cap and was not kept; the request was not run again. Read the "
        "result from the resource it created (see Location), or send a new Idempotency-Key "
        "to run a new request",
        original_status=stored.status,
    )
    extra = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in stored.headers
        if k in _NOT_KEPT_PASSED
    ]
    await send_problem(
        send,
        error,
        instance=scope.get("path"),
        extra_headers=[*extra, REPLAYED_HEADER, NOT_STORED_HEADER],
    )


def _problem(description: str, headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {
            PROBLEM_CONTENT_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string", "format": "uri"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                }
            }
        },
    }
    if headers:
        response["headers"] = dict(headers)
    return response


IDEMPOTENCY_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: _problem(
        "Idempotency-Key missing where required, or malformed (one header; a quoted string "
        "or a token of 1-255 printable ASCII characters)."
    ),
    409: _problem(
        "A request with this Idempotency-Key is still being processed; retry after "
        "Retry-After seconds to receive its response.",
        {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    ),
    422: _problem(
        "The Idempotency-Key was already used for a different request (method, path, query "
        "or body), or the request failed validation."
    ),
    503: _problem("The idempotency store is unavailable; the request was not processed."),
}
"""OpenAPI ``responses=`` for routes guarded by an Idempotency-Key."""
