"""Small ASGI helpers shared by the pure ASGI middleware and the FastAPI routes.

Sending a whole response through a raw ``send``, adding headers to a
response start, the request's target URI from the scope, and the pieces a
streaming response needs (body chunks, noticing ``http.disconnect``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote

from starlette.types import Message, Receive, Scope, Send

__all__ = [
    "body_chunk",
    "discard",
    "header_values",
    "request_target",
    "send_response",
    "wait_for_disconnect",
    "with_headers",
]

Headers = Sequence[tuple[bytes, bytes]]

_PATH_SAFE = "/!$&'()*+,;=:@~"  # RFC 3986 pchar delimiters kept as they are


async def send_response(
    send: Send, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes = b""
) -> None:
    """Send a complete response (start, then one body message) through *send*."""
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


def with_headers(send: Send, headers: Headers) -> Send:
    """*send* with *headers* appended to the response start message."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers


async def discard(message: Message) -> None:
    """A ``send`` that drops every message (a response nobody reads)."""
    return None


def body_chunk(body: bytes, *, more_body: bool = True) -> Message:
    """An ``http.response.body`` message."""
    return {"type": "http.response.body", "body": body, "more_body": more_body}


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (``http.disconnect``), discarding anything else."""
    while (await receive())["type"] != "http.disconnect":
        pass


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    """Every value of request header *name* (lower-case bytes), in order."""
    return [value for key, value in scope["headers"] if key == name]


def request_target(scope: Scope, host: bytes | None = None) -> tuple[str, str, bytes, bytes]:
    """Scheme, host, raw path and raw query of the request's target URI.

    *host* is the ``Host`` header when the caller has read it already; without
    one the server address stands in. Without ``raw_path`` the decoded path is
    re-escaped, so a literal ``%`` stays a ``%25`` (a normaliser would otherwise
    read it as an escape).
    """
    if host is None:
        host = next((v for n, v in scope["headers"] if n.lower() == b"host"), None)
    if host is None:
        server = scope.get("server")
        host_text = f"{server[0]}:{server[1]}" if server else ""
    else:
        host_text = host.decode("latin-1")
    path = scope.get("raw_path") or quote(scope["path"], safe=_PATH_SAFE).encode("ascii")
    return scope.get("scheme", "http"), host_text, path, scope.get("query_string", b"")
