"""Who is asking: the key functions a rate limit counts by."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from starlette.requests import HTTPConnection

from app.core.errors import ConfigurationError
from app.core.keys import digest
from app.http.client_ip import ClientIP
from app.middleware.rate_limit._headers import HOLDER, Holder

__all__ = ["APIKey", "KeyFunc", "KeyValidator", "Principal", "first_of", "identify"]

KeyFunc: TypeAlias = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]
"""Who is asking: ``(conn) -> identity`` (sync or async); None means "not known here"."""

_ANONYMOUS = "anonymous"

KeyValidator: TypeAlias = Callable[[str], Any]
"""``(api_key) -> bool | principal`` (sync or async): does this key belong to a caller?"""


class APIKey:
    """The caller named by a *validated* API key header (the raw key never reaches Redis).

    Args:
        validator: ``(key) -> result`` (sync or async), called with the header's
            value on every checked request. ``True`` -> the identity is
            ``"key:<sha256 prefix of the key>"``; a principal (a user or account
            id, anything else truthy) -> ``"user:<principal>"``, so every key of
            one account shares its quota, as with ``Principal``; ``False`` /
            ``None`` -> no identity here (``first_of`` tries the next key
            function, the limit falls back to the client IP). Make it cheap
            (an in-process cache in front of your key store): it runs before
            the request is counted. Its exceptions propagate.
        header: the header carrying the key (default ``X-API-Key``).

    Required: an API-key identity that nobody checked lets a client send a
    fresh random key with every request and get a fresh quota each time, so
    ``APIKey()`` without a validator raises ``ConfigurationError``. When an
    authentication layer in front already rejects bad keys, key the limit by
    what it established (``Principal(...)``) instead.
    """

    __slots__ = ("_header", "_validator")

    def __init__(self, header: str = "x-api-key", *, validator: KeyValidator | None = None) -> None:
        if validator is None or not callable(validator):
            raise ConfigurationError(
                "APIKey() needs validator=...: an unvalidated API key lets every random "
                "X-API-Key value start a fresh quota. Pass a function (sync or async) that "
                "returns True, or the caller's principal, for a valid key and False otherwise, "
                "or key the limit by Principal(...) set by your authentication"
            )
        self._header = header
        self._validator = validator

    async def __call__(self, conn: HTTPConnection) -> str | None:
        value = conn.headers.get(self._header)
        if not value:
            return None
        verdict = self._validator(value)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if verdict is True:
            return "key:" + digest(value)
        if verdict is None or verdict is False or verdict == "":
            return None
        return f"user:{verdict}"


class Principal:
    """A user or principal id from *getter* as ``"user:<id>"``.

    *getter* is ``(conn) -> id | None`` (sync or async): read ``conn.scope["user"]``
    set by an authentication middleware, decode a token, look up a session...
    """

    __slots__ = ("_getter",)

    def __init__(self, getter: Callable[[HTTPConnection], Any]) -> None:
        self._getter = getter

    async def __call__(self, conn: HTTPConnection) -> str | None:
        value = self._getter(conn)
        if inspect.isawaitable(value):
            value = await value
        return None if value is None or value == "" else f"user:{value}"


def first_of(*keys: KeyFunc) -> KeyFunc:
    """A key function answering with the first of *keys* that identifies the request."""

    async def key(conn: HTTPConnection) -> str | None:
        for candidate in keys:
            found = candidate(conn)
            if inspect.isawaitable(found):
                found = await found
            if found:
                return found
        return None

    return key


async def identify(conn: HTTPConnection, key: KeyFunc | None) -> str:
    """Run *key*, falling back to the client IP (the scope's configured one) and then
    to a shared ``"anonymous"`` bucket."""
    if key is not None:
        found = key(conn)
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
    holder = conn.scope.get(HOLDER)
    client_ip = holder.client_ip if isinstance(holder, Holder) else _PEER
    return client_ip(conn) or _ANONYMOUS


_PEER = ClientIP()
