"""Idempotency-Key middleware per draft-ietf-httpapi-idempotency-key-header (pure ASGI)."""

from app.middleware.idempotency._middleware import (
    DEFAULT_HEADER,
    DEFAULT_STORED_HEADERS,
    IDEMPOTENCY_RESPONSES,
    SCOPE_KEY,
    BodyFingerprint,
    IdempotencyMiddleware,
    PrincipalFunc,
    StoredResponse,
    default_principal,
    guard_request,
    parse_idempotency_key,
)

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
