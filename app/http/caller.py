"""Who is calling: one answer per request for every layer that keeps data per caller.

Idempotency records, private HTTP-cache entries (and, through the same
function, ``@cached`` keys and rate-limit identities) ask ``resolve_caller``,
never their own header guess. The answer, in this order:

1. **principal**: the authenticated principal, when the app provides one.
   The hook: an authentication middleware or dependency calls
   ``set_principal(request, user_id)`` (or sets ``scope["app.principal"]``).
   Starlette's ``AuthenticationMiddleware`` works too: an authenticated
   ``scope["user"]`` whose ``identity`` is implemented is the principal.
   A token refresh that keeps the principal keeps the caller, so an
   idempotency retry made with the new token finds the first response.
   Middleware only see a principal set *outside* them (an auth middleware
   added after ``install_toolkit``, i.e. outermost); a principal set by a
   route dependency is seen by what runs after it (the ``idempotency_key()``
   dependency, ``@cached``).
2. **session**: the id of the request's loaded server-side session
   (``scope["session"].id``, see ``app.middleware.sessions``), or, before
   the session layer has run (the layers outside it), the value of the
   session cookie (``SESSION_COOKIE_NAME``, with or without its ``__Host-``
   prefix): signed and unguessable, and unlike the whole ``Cookie`` header it
   stays the same when another cookie changes. The request's other
   credential headers (``Authorization``, ``X-API-Key``...) are part of it:
   a session cookie planted in a victim's browser does not make the victim
   the same caller as the attacker who planted it.
3. **credentials**: a keyed digest (HMAC) of every credential header the
   request carries (``CALLER_CREDENTIAL_HEADERS``: ``Authorization``,
   ``Proxy-Authorization``, ``Cookie``, ``X-API-Key``). Two requests with
   different credentials are different callers, whatever the credentials are.
4. **anonymous**: nothing identifies the caller; ``address`` is the client
   address through the trusted-proxy rules (``TRUSTED_PROXIES``), which a
   layer may use (idempotency's ``IDEMPOTENCY_ANONYMOUS=address``) or refuse.

The answer is computed once per request and kept in the ASGI scope
(``scope["app.caller"]``), so every layer of one request gets the same
answer; only ``set_principal`` replaces it (a later asker then sees the
principal). Settings are read once per
settings object (``get_settings()``), so tests that re-read settings see
their changes.

Digests are keyed with the settings' signing keys: ``Caller.digest()`` uses
the current key, ``Caller.scopes()`` lists the digests under the current key
and then every fallback key (``SECRET_KEY_FALLBACKS``), so a record stored
before a key rotation is still found by a lookup that tries them in order.
No raw credential, session id or principal ever reaches a Redis key name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import Scope

from app.core.config import Settings, get_settings
from app.core.errors import ConfigurationError
from app.core.keys import HmacKey
from app.http.client_ip import ClientIP

__all__ = [
    "CALLER_KEY",
    "PRINCIPAL_KEY",
    "Caller",
    "CallerKind",
    "CallerResolver",
    "caller_resolver",
    "forget_caller",
    "resolve_caller",
    "set_principal",
]

CallerKind = Literal["principal", "session", "credentials", "anonymous"]

CALLER_KEY: Final = "app.caller"
"""Where the resolved ``Caller`` of a request is kept in the ASGI scope."""
PRINCIPAL_KEY: Final = "app.principal"
"""Where an authentication layer puts the principal (see ``set_principal``)."""

_CONTEXT: Final = b"app.caller.v1\x00"  # domain separation from other uses of the secret
_TAGS: Final[dict[str, bytes]] = {
    "principal": b"p",
    "session": b"s",
    "credentials": b"c",
    "anonymous": b"a",
}


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


_HEADS: Final[dict[str, tuple[str, bytes]]] = {
    kind: (tag.decode() + ":", _length_prefixed(tag)) for kind, tag in _TAGS.items()
}
"""Per kind: the digest's prefix, and the length-prefixed tag that opens the HMAC's message."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller of one request (see the module docstring for the order).

    ``kind`` says which rule identified it; ``address`` is the client address
    through the trusted proxies for an anonymous caller (None for the others,
    and when the server gave no peer).
    The identifying material itself stays private: use ``digest()`` /
    ``scopes()``, which are keyed, fixed-length and safe in key names.
    """

    kind: CallerKind
    address: str | None
    _material: bytes = field(repr=False)
    _keys: tuple[bytes, ...] = field(repr=False)

    @property
    def identified(self) -> bool:
        """True unless the caller is anonymous."""
        return self.kind != "anonymous"

    def _digest(self, key: bytes) -> str:
        prefix, head = _HEADS[self.kind]
        material = self._material
        mac = HmacKey.of(key, _CONTEXT).digest(head + len(material).to_bytes(4, "big") + material)
        return prefix + mac[:16].hex()

    def digest(self) -> str:
        """``<kind letter>:<HMAC under the current key>`` (128 bits, hex)."""
        return self._digest(self._keys[0])

    def scopes(self) -> tuple[str, ...]:
        """The digests under the current key, then under each fallback key (rotation).

        Store under ``scopes()[0]``; look up under each in order, so a record
        stored before a rotation is still found while its key is a fallback.
        """
        return tuple(self._digest(key) for key in self._keys)

    def fallback_scopes(self) -> tuple[str, ...]:
        """``scopes()`` without the current one (empty when no fallback key is set)."""
        return self.scopes()[1:]


class CallerResolver:
    """Resolves callers with one configuration (credential headers, proxies, keys).

    Build one from settings with ``caller_resolver()``; this class is public
    for apps that need another configuration for one layer.
    """

    __slots__ = ("_client_ip", "_cookies", "_headers", "_scanned", "keys")

    def __init__(
        self,
        *,
        keys: Sequence[bytes],
        credential_headers: Sequence[str] = (
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
        ),
        trusted_proxies: Sequence[str] = (),
        session_cookie: str | None = "session",
    ) -> None:
        if not keys or not all(keys):
            raise ConfigurationError("CallerResolver needs at least one non-empty key")
        self.keys = tuple(keys)
        self._headers = frozenset(h.strip().lower().encode("latin-1") for h in credential_headers)
        self._scanned = self._headers | {b"cookie"}
        self._client_ip = ClientIP(trusted_proxies)
        self._cookies = (f"__Host-{session_cookie}", session_cookie) if session_cookie else ()

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerResolver:
        """The resolver the settings describe (keys: ``settings.signing_keys()``)."""
        return cls(
            keys=settings.signing_keys(),
            credential_headers=settings.caller_credential_headers,
            trusted_proxies=settings.trusted_proxies,
            session_cookie=settings.session_cookie_name or "session",
        )

    def credentials(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The request's credential headers, sorted (names lower case)."""
        return self._scan(scope)[0]

    def _scan(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """One pass over the headers: the credential headers, sorted, and the Cookie values."""
        credentials: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        scanned, wanted = self._scanned, self._headers
        for name, value in scope.get("headers", ()):
            lower = name.lower()
            if lower in scanned:  # most headers are neither
                if lower in wanted:
                    credentials.append((lower, value))
                if lower == b"cookie":
                    cookies.append(value)
        credentials.sort()
        return credentials, cookies

    def session_cookie(self, scope: Scope) -> bytes | None:
        """The session cookie's value (``__Host-`` name first), or None."""
        return self._session_cookie(self._scan(scope)[1])

    def _session_cookie(self, headers: list[bytes]) -> bytes | None:
        """The session cookie's value in the ``Cookie`` header values *headers*, or None."""
        if not self._cookies or not headers:
            return None
        found: dict[str, str] = {}
        for value in headers:
            for key, item in cookie_parser(value.decode("latin-1")).items():
                found.setdefault(key, item)
        for name in self._cookies:
            if found.get(name):
                return found[name].encode("latin-1")
        return None

    def address(self, scope: Scope) -> str | None:
        """The client address through the trusted proxies, or None without a peer."""
        return self._client_ip.address(scope)

    def for_principal(self, principal: str | int | bytes, scope: Scope) -> Caller:
        """A principal caller for an explicit *principal* (a layer's own principal hook)."""
        return Caller("principal", None, _material(principal), self.keys)

    def resolve(self, scope: Scope) -> Caller:
        """The caller of *scope*, computed now (no scope cache; see ``resolve_caller``)."""
        address = None
        principal = scope.get(PRINCIPAL_KEY)
        if principal is None or principal == "":
            user = scope.get("user")
            principal = None if user is None else _starlette_identity(user)
        if principal is not None and principal != "":
            return Caller("principal", address, _material(principal), self.keys)
        credentials, cookies = self._scan(scope)
        session_id = getattr(scope.get("session"), "id", None)
        if isinstance(session_id, str) and session_id:
            material = b"id\x00" + session_id.encode()
            return Caller("session", address, _with_others(material, credentials), self.keys)
        cookie = self._session_cookie(cookies)
        if cookie:
            material = b"cookie\x00" + cookie
            return Caller("session", address, _with_others(material, credentials), self.keys)
        if credentials:
            material = _length_prefixed(*(part for pair in credentials for part in pair))
            return Caller("credentials", address, material, self.keys)
        address = self._client_ip.address(scope)
        return Caller("anonymous", address, (address or "").encode(), self.keys)


def _starlette_identity(user: object) -> str | None:
    """``scope["user"].identity`` of an authenticated Starlette user, else None."""
    if user is None or getattr(user, "is_authenticated", False) is not True:
        return None
    try:
        identity = user.identity  # type: ignore[attr-defined]
    except (AttributeError, NotImplementedError):
        return None  # display_name is not unique: never a principal
    return str(identity) if identity not in (None, "") else None


def _with_others(material: bytes, credentials: list[tuple[bytes, bytes]]) -> bytes:
    """A session's material plus the non-cookie credentials of the request.

    A planted session cookie (fixation, cookie tossing) must not make a victim
    with another ``Authorization`` or ``X-API-Key`` the same caller as the
    attacker who planted it; other cookies are left out, so they may change.
    """
    others = [part for name, value in credentials if name != b"cookie" for part in (name, value)]
    return _length_prefixed(material, *others)


def _material(principal: object) -> bytes:
    if isinstance(principal, bytes):
        return principal
    return str(principal).encode("utf-8", "surrogateescape")


_current: tuple[Settings, CallerResolver] | None = None


def caller_resolver(settings: Settings | None = None) -> CallerResolver:
    """The resolver for *settings* (default ``get_settings()``), built once per settings object."""
    global _current
    settings = settings or get_settings()
    if _current is not None and _current[0] is settings:
        return _current[1]
    resolver = CallerResolver.from_settings(settings)
    _current = (settings, resolver)
    return resolver


def _scope_of(conn: HTTPConnection | Scope) -> Scope:
    if type(conn) is dict:  # an ASGI scope, the middlewares' case: no isinstance walk
        return conn
    return conn.scope if isinstance(conn, HTTPConnection) else conn


def resolve_caller(conn: HTTPConnection | Scope) -> Caller:
    """The caller of a request (or ASGI scope), resolved once and kept in the scope.

    Cheap after the first call. Only ``set_principal`` replaces the kept
    answer (callers asked later then see the principal).
    """
    scope = _scope_of(conn)
    found = scope.get(CALLER_KEY)
    if isinstance(found, Caller):
        return found
    caller = caller_resolver().resolve(scope)
    scope[CALLER_KEY] = caller
    return caller


def forget_caller(conn: HTTPConnection | Scope) -> None:
    """Drop the kept answer (the next ``resolve_caller`` resolves again)."""
    _scope_of(conn).pop(CALLER_KEY, None)


def set_principal(conn: HTTPConnection | Scope, principal: str | int | bytes) -> None:
    """Declare the authenticated principal of a request (call it from your auth layer).

    *principal* is a stable user or account id (not a token: a refreshed
    token must keep the same principal). Every layer that asks
    ``resolve_caller`` afterwards keys its per-caller data by it. An empty
    principal is refused: it would make every caller the same one.
    """
    if principal is None or principal == "" or principal == b"":
        raise ConfigurationError(
            "set_principal() needs a non-empty principal (a user or account id)"
        )
    scope = _scope_of(conn)
    scope[PRINCIPAL_KEY] = principal
    scope.pop(CALLER_KEY, None)
