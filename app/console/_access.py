"""Who may use the console: token or auth dependency, signed login cookie, CSRF, audit.

* **Off unless configured.** Without ``CONSOLE_TOKEN`` and without an auth
  dependency every console URL answers 404.
* **Token.** ``Authorization: Bearer <token>`` (scripts) or the login form,
  which sets a cookie ``<expiry>.<mac>``: an HMAC-SHA256 under the first
  ``Settings.signing_keys()`` key (verified against each, for rotation) of the
  expiry and a digest of the token, so changing the token logs every browser
  out. HttpOnly, SameSite=Strict, Path=the console's mount path, Secure on
  HTTPS and in production. Tokens are compared as SHA-256 digests with
  ``hmac.compare_digest`` (constant time, no length oracle).
* **CSRF.** Every POST made with a cookie or an auth dependency carries
  ``csrf`` = ``<expiry>.<mac(operator, expiry)>``: stateless, bound to the
  operator, unforgeable without the secret. Bearer requests need none (a
  browser never adds that header by itself).
* **Audit.** ``Audit.record`` appends who, what, target, outcome and client
  address to the stream ``<prefix>:console:audit`` (approximate MAXLEN); the
  entry id is the server time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import RedisError

from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.keys import KeySpace
from app.core.redis import AnyRedis

__all__ = ["AUDIT_SERVICE", "Audit", "AuditEntry", "Operator", "Signer", "token_matches"]

AUDIT_SERVICE = "console"
_LOGIN_CONTEXT = b"app.console.login.v1\x00"
_CSRF_CONTEXT = b"app.console.csrf.v1\x00"


@dataclass(frozen=True, slots=True)
class Operator:
    """The caller of one console request: a display name and how it proved access."""

    name: str
    via: Literal["bearer", "cookie", "auth"]

    @property
    def needs_csrf(self) -> bool:
        """Browser-borne credentials (cookie, app auth) need a CSRF token on POST."""
        return self.via != "bearer"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of two tokens (as digests: the length leaks nothing)."""
    if not presented:
        return False
    return hmac.compare_digest(_digest(presented), _digest(expected))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Signer:
    """Signs and checks login cookies and CSRF tokens with the app's signing keys.

    Args:
        keys: the current key first, then older ones still accepted (``Settings.signing_keys()``).
        ttl: seconds a login cookie or CSRF token stays valid.
        token: the console token (its digest is bound into login cookies), if any.
    """

    def __init__(self, keys: Sequence[bytes], ttl: float, token: str | None) -> None:
        if not keys or not all(keys):
            raise ConfigurationError("the console needs at least one non-empty signing key")
        self._keys = list(keys)
        self.ttl = ttl
        self._binding = _digest(token or "")

    def _mac(self, key: bytes, context: bytes, *parts: str) -> str:
        mac = hmac.new(key, context + self._binding, hashlib.sha256)
        for part in parts:
            mac.update(b"\x00" + part.encode("utf-8"))
        return _b64(mac.digest())

    def _sign(self, context: bytes, subject: str, now: float | None) -> str:
        expiry = str(int((now if now is not None else time.time()) + self.ttl))
        return f"{expiry}.{self._mac(self._keys[0], context, subject, expiry)}"

    def _check(self, context: bytes, subject: str, value: str | None, now: float | None) -> bool:
        if not value or len(value) > 128:
            return False
        expiry, dot, mac = value.partition(".")
        if not dot or not expiry.isdigit() or len(expiry) > 12:
            return False
        if int(expiry) < (now if now is not None else time.time()):
            return False
        return any(
            hmac.compare_digest(self._mac(key, context, subject, expiry), mac) for key in self._keys
        )

    def login_cookie(self, now: float | None = None) -> str:
        """The value of a fresh login cookie (valid ``ttl`` seconds)."""
        return self._sign(_LOGIN_CONTEXT, "operator", now)

    def cookie_valid(self, value: str | None, now: float | None = None) -> bool:
        """True when *value* is an unexpired login cookie signed with one of the keys."""
        return self._check(_LOGIN_CONTEXT, "operator", value, now)

    def csrf_token(self, operator: Operator, now: float | None = None) -> str:
        """A CSRF token for *operator* (valid ``ttl`` seconds)."""
        return self._sign(_CSRF_CONTEXT, operator.name, now)

    def csrf_valid(self, operator: Operator, value: str | None, now: float | None = None) -> bool:
        """True when *value* is an unexpired CSRF token issued to *operator*."""
        return self._check(_CSRF_CONTEXT, operator.name, value, now)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited action, as read back from the stream."""

    id: str
    at_ms: int
    who: str
    action: str
    target: str
    outcome: str
    client: str


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Audit:
    """The console's audit stream: ``<prefix>:console:audit``."""

    def __init__(self, prefix: str, maxlen: int) -> None:
        self.key = KeySpace(prefix, AUDIT_SERVICE).key("audit")
        self.maxlen = maxlen

    async def record(
        self,
        redis: AnyRedis,
        operator: Operator,
        action: str,
        target: str,
        outcome: str,
        client: str,
    ) -> str:
        """Append one entry (one ``XADD ... MAXLEN ~``); returns its id (server time).

        Raises ``RedisUnavailable`` when Redis cannot be reached: an action whose
        audit could not be written is reported as failed to the operator.
        """
        fields: dict[Any, Any] = {
            "who": operator.name[:200],
            "via": operator.via,
            "action": action,
            "target": target[:500],
            "outcome": outcome[:500],
            "client": client[:100],
        }
        try:
            entry_id = await redis.xadd(
                self.key,
                fields,
                maxlen=self.maxlen,
                approximate=True,
            )
        except RedisError as exc:
            raise RedisUnavailable("could not write the console audit entry") from exc
        return _text(entry_id)

    async def recent(self, redis: AnyRedis, count: int = 50) -> list[AuditEntry]:
        """The newest *count* entries (one ``XREVRANGE ... COUNT``), newest first."""
        rows = await redis.xrevrange(self.key, count=count)
        out: list[AuditEntry] = []
        for raw_id, raw_fields in rows or ():
            entry_id = _text(raw_id)
            fields = {_text(k): _text(v) for k, v in (raw_fields or {}).items()}
            out.append(
                AuditEntry(
                    id=entry_id,
                    at_ms=int(entry_id.split("-", 1)[0]),
                    who=fields.get("who", ""),
                    action=fields.get("action", ""),
                    target=fields.get("target", ""),
                    outcome=fields.get("outcome", ""),
                    client=fields.get("client", ""),
                )
            )
        return out
