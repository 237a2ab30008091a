"""The session cookie: its name and attributes, and the signed session id it carries."""

from __future__ import annotations

import base64
import hmac
import logging
from collections.abc import Sequence

from starlette.requests import cookie_parser
from starlette.types import Scope

from app.core.config import Settings
from app.core.errors import ConfigurationError
from app.core.keys import HmacKey
from app.core.memo import BoundedMemo
from app.services.sessions import is_session_id

__all__ = ["SessionCookie", "signing_keys"]

log = logging.getLogger("app.sessions")

_CONTEXT = b"app.sessions.cookie.v1\x00"  # domain separation from other uses of the secret
_SIG_LEN = 43  # base64url of a SHA-256 MAC, unpadded
_EXPIRED = "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
_VERIFIED_MAX = 4096  # verified cookie values remembered (all forgotten when full)


def signing_keys(
    secret_key: str | bytes | Sequence[str | bytes] | None, settings: Settings
) -> list[bytes]:
    """The keys to sign with (the first) and verify against (all); default the settings'."""
    if secret_key is None:
        return settings.signing_keys()
    items = [secret_key] if isinstance(secret_key, str | bytes) else list(secret_key)
    keys = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in items]
    if not keys or not all(keys):
        raise ConfigurationError("SessionMiddleware needs at least one non-empty secret key")
    return keys


def _cookie_name(
    settings: Settings,
    cookie_name: str | None,
    host_prefix: bool | None,
    *,
    secure: bool,
    path: str,
    domain: str | None,
) -> str:
    """The name the cookie is sent under, ``__Host-`` prefixed when it may and should be."""
    name = cookie_name or settings.session_cookie_name or "session"
    if name.startswith("__Host-"):
        name, host_prefix = name.removeprefix("__Host-"), True
    if host_prefix is None:
        strict = settings.app_env not in ("development", "test")
        host_prefix = strict and secure and path == "/" and domain is None
        if strict and not host_prefix:
            log.warning(
                "session cookie %r is sent without the __Host- prefix because it is not "
                "Secure with Path=/ and no Domain; a sibling subdomain can plant one",
                name,
            )
    if host_prefix and (not secure or path != "/" or domain is not None):
        raise ConfigurationError(
            "a __Host- cookie must be Secure with Path=/ and no Domain: "
            "set https_only=True, path='/' and domain=None"
        )
    return f"__Host-{name}" if host_prefix else name


class SessionCookie:
    """The cookie of ``SessionMiddleware``: ``<id>.<HMAC-SHA256>`` and its attributes.

    Signed with the first key, verified against each (a cookie verified by an
    older key is reported so it can be re-signed). See ``SessionMiddleware``
    for the options; ``max_age`` None makes a browser-session cookie.
    """

    __slots__ = ("_expire_suffix", "_marker", "_set_suffix", "_signers", "_verified", "name")

    def __init__(
        self,
        keys: list[bytes],
        settings: Settings,
        *,
        cookie_name: str | None,
        https_only: bool | None,
        same_site: str,
        path: str,
        domain: str | None,
        host_prefix: bool | None,
        max_age: int | None,
    ) -> None:
        self._signers = [HmacKey(key, _CONTEXT) for key in keys]
        # Cookie values that passed verify(), and its answer: a client sends the same
        # cookie on every request, so the HMAC is computed once per value, not per
        # request. Only verified values enter (a forged one is checked every time);
        # the keys never change for this object, so an entry never goes stale.
        self._verified: BoundedMemo[str, tuple[str, int]] = BoundedMemo(_VERIFIED_MAX)
        secure = settings.app_env != "development" if https_only is None else https_only
        if same_site not in ("lax", "strict", "none"):
            raise ConfigurationError(f"same_site must be lax, strict or none, got {same_site!r}")
        if same_site == "none" and not secure:
            raise ConfigurationError("SameSite=None cookies must be Secure: set https_only=True")
        self.name = _cookie_name(
            settings, cookie_name, host_prefix, secure=secure, path=path, domain=domain
        )
        self._marker = self.name.encode("latin-1", "replace")  # the header is latin-1 text
        flags = f"; Path={path}" + (f"; Domain={domain}" if domain else "") + "; HttpOnly"
        flags += ("; Secure" if secure else "") + f"; SameSite={same_site.capitalize()}"
        self._set_suffix = (f"; Max-Age={max_age}" if max_age is not None else "") + flags
        self._expire_suffix = f"; {_EXPIRED}" + flags

    def _mac(self, signer: HmacKey, session_id: str) -> str:
        mac = signer.digest(session_id.encode("ascii"))
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def sign(self, session_id: str) -> str:
        """The cookie value for *session_id*, signed with the current key."""
        return f"{session_id}.{self._mac(self._signers[0], session_id)}"

    def verify(self, value: str) -> tuple[str, int] | None:
        """The session id in a cookie value and the index of the key that signed it, or None."""
        found = self._verified.get(value)
        if found is not None:
            return found
        session_id, dot, sig = value.rpartition(".")
        if not dot or len(sig) != _SIG_LEN or not sig.isascii() or not is_session_id(session_id):
            return None
        for index, signer in enumerate(self._signers):
            if hmac.compare_digest(self._mac(signer, session_id), sig):
                return self._verified.put(value, (session_id, index))
        return None

    def read(self, scope: Scope) -> str | None:
        """The cookie's value in the request, if any (the first Cookie header that carries one)."""
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                found = self._value_in(value)
                if found:
                    return found
        return None

    def _value_in(self, header: bytes) -> str | None:
        """What ``cookie_parser(header)`` gives for this cookie, parsing as little as it can.

        A header that names this cookie once is cut down to the one ``;``-separated
        pair that holds the name (no other pair can carry the cookie), and that
        pair alone is read (a quoted value still goes through ``cookie_parser``):
        the same answer, without splitting every other cookie of the site on
        every request.
        """
        marker = self._marker
        count = header.count(marker)
        if count == 0:
            return None
        if count > 1:
            return cookie_parser(header.decode("latin-1")).get(self.name)
        at = header.find(marker)
        end = header.find(b";", at)
        pair = header[header.rfind(b";", 0, at) + 1 : end if end >= 0 else None].decode("latin-1")
        name, eq, value = pair.partition("=")
        if not eq or name.strip() != self.name:
            return None  # the name is part of another cookie's name or value
        value = value.strip()
        return cookie_parser(pair).get(self.name) if value.startswith('"') else value

    def set(self, session_id: str) -> str:
        """The ``Set-Cookie`` value that gives the client *session_id*."""
        return f"{self.name}={self.sign(session_id)}{self._set_suffix}"

    def expired(self) -> str:
        """The ``Set-Cookie`` value that clears the cookie."""
        return f"{self.name}={self._expire_suffix}"
