"""Idempotency-Key middleware per draft-ietf-httpapi-idempotency-key-header (pure ASGI).

``app.add_middleware(IdempotencyMiddleware)`` guards every POST and PATCH
that carries an ``Idempotency-Key`` header (``paths=`` narrows it to path
prefixes; ``required=True`` refuses unsafe requests without a key). Per
guarded request:

1. The key is validated: the draft's quoted sf-string (``"8e03..."``) or a
   Stripe-style bare token, 1-255 printable ASCII characters; else 400.
2. The request body is read (it is needed for the fingerprint before the
   handler runs) and handed to the app again through a wrapped ``receive``.
3. One Lua call claims the record ``HMAC(secret, caller, method, route,
   key)``. The caller is ``app.http.caller.resolve_caller``: the principal an
   auth layer declared (``set_principal``, or this middleware's ``principal=``
   callable), else the loaded session, else a keyed digest of the credential
   headers (``Authorization``, ``Proxy-Authorization``, ``Cookie``,
   ``X-API-Key``), so two clients that pick the same key never see each
   other's responses, nor learn (422) that the other used it. A request with
   none of these is anonymous: ``IDEMPOTENCY_ANONYMOUS=address`` (default)
   scopes it by client address through the trusted proxies, ``refuse``
   answers 400. During a secret rotation the caller's record under each
   fallback key is looked up first, so a retry still finds its response.
4. New: the handler runs while a heartbeat renews the short in-flight lease.
   The response is passed through as it is sent and teed into a buffer; the
   status, an allowlist of headers (``Retry-After`` included) and the body
   (up to a cap) are stored before the last chunk goes out. A response over
   the cap is still sent (marked ``Idempotency-Stored: false`` when its
   ``Content-Length`` says so up front); its retry is answered 410
   problem+json stating the original status, never an empty success. A
   handler exception, a 5xx, a transient status (408, 409, 425, 429, 503:
   ``IDEMPOTENCY_TRANSIENT_STATUSES``) or a response the session layer
   replaced releases the key so a retry runs again once the condition has
   cleared (``store_server_errors=True`` stores the other 5xx, as Stripe does).
   Completed: the stored response is replayed byte for byte with
   ``Idempotent-Replayed: true``. Same key, other method/path/query/body: 422.
   Still in flight: 409 with ``Retry-After`` (or, with ``on_conflict="wait"``,
   a bounded wait woken when the first request ends, then the replay).
5. Redis down: 503 and the handler does not run (``IDEMPOTENCY_FAILURE_MODE=open``
   runs it unprotected, marked ``Idempotency-Stored: false``).

Routes can also opt in one by one with the dependency
``app.api.deps.idempotency_key()`` (which documents the header and the
400/409/422 answers in OpenAPI); it needs this middleware installed, which
it drives through ``scope["app.idempotency"]``.
"""

from app.middleware.idempotency._guard import SCOPE_KEY, guard_request
from app.middleware.idempotency._key import (
    DEFAULT_HEADER,
    BodyFingerprint,
    PrincipalFunc,
    default_principal,
    parse_idempotency_key,
)
from app.middleware.idempotency._middleware import DEFAULT_STORED_HEADERS, IdempotencyMiddleware
from app.middleware.idempotency._responses import IDEMPOTENCY_RESPONSES, StoredResponse

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_STORED_HEADERS",
    "IDEMPOTENCY_RESPONSES",
    "SCOPE_KEY",
    "BodyFingerprint",
    "IdempotencyMiddleware",
    "PrincipalFunc",
    "StoredResponse",
    "default_principal",
    "guard_request",
    "parse_idempotency_key",
]
