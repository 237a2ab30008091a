"""The one exception tree of the toolkit.

Every error a user can catch from this package derives from ``ToolkitError``;
Redis client errors never leak raw, they are wrapped with ``raise ... from exc``
so the original stays in ``__cause__``::

    ToolkitError
    ├── ConfigurationError            bad or unsafe settings or arguments (also a ValueError)
    ├── UsageError                    called the wrong way: a wrong type (also a TypeError)
    ├── StateError                    used in a state that forbids it (also a RuntimeError)
    ├── RedisUnavailable              Redis cannot be reached (or the breaker is open)
    ├── RedisCommandError             Redis answered a command with an error
    ├── CodecError                    a value cannot be encoded or a stored payload decoded
    │   ├── EncodeError               the caller's value cannot be encoded (422)
    │   ├── PayloadTooLarge           over a size cap (e.g. decompression bomb)
    │   └── SignatureError            a signed payload was tampered with or the key is wrong
    ├── InvalidKey                    a key part is empty or not allowed
    │   └── PatternTooComplex         a glob pattern has more wildcards than the cap
    ├── LockError
    │   ├── LockNotAcquired           could not get the lock within the wait bound
    │   ├── LockNotOwned              release/extend of a lock that is no longer ours
    │   └── LockLost                  the lock expired or was taken while held
    ├── RateLimitExceeded             a rate-limit policy refused the request
    ├── IdempotencyError
    │   ├── IdempotencyKeyMissing     required Idempotency-Key header absent (400)
    │   ├── IdempotencyKeyInvalid     malformed Idempotency-Key (400)
    │   ├── IdempotencyConflict       the first request is still in flight (409)
    │   ├── IdempotencyMismatch       key reused with another request payload (422)
    │   ├── IdempotencyCallerUnknown  no identifiable caller to scope the key to (400)
    │   └── IdempotencyResponseNotKept  the first response was too large to keep (410)
    ├── SessionError
    │   ├── SessionNotFound           unknown or expired session id
    │   └── SessionConflict           a concurrent change could not be merged
    ├── StreamError                   consumer-group / stream misuse
    ├── RouteDisabled                 a route this deployment switched off (403)
    └── SubscriberOverflow            a pub/sub subscriber fell behind and was disconnected

Errors that are programming mistakes rather than runtime conditions also
derive from the built-in exception a Python caller would expect
(``ConfigurationError`` and ``InvalidKey`` from ``ValueError``, ``UsageError``
from ``TypeError``, ``StateError`` from ``RuntimeError``), so ``except
ValueError`` around a toolkit call keeps working.

Each class carries an HTTP ``status_code``, a stable ``problem_type`` slug and a
``title``; ``app.http.problems`` turns any of them into an RFC 9457
``application/problem+json`` response. Errors carry their facts as attributes
(``retry_after``, ``lock_name``, ...) so handlers never parse messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "CodecError",
    "ConfigurationError",
    "EncodeError",
    "IdempotencyCallerUnknown",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyMismatch",
    "IdempotencyResponseNotKept",
    "InvalidKey",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "PatternTooComplex",
    "PayloadTooLarge",
    "RateLimitExceeded",
    "RedisCommandError",
    "RedisUnavailable",
    "RouteDisabled",
    "SessionConflict",
    "SessionError",
    "SessionNotFound",
    "SignatureError",
    "StateError",
    "StreamError",
    "SubscriberOverflow",
    "ToolkitError",
    "UsageError",
]


class ToolkitError(Exception):
    """Root of every error raised by the toolkit."""

    status_code: ClassVar[int] = 500
    problem_type: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def detail(self) -> str:
        return self.message

    def retry_after_header(self) -> str | None:
        """``Retry-After`` in whole seconds, rounded up (RFC 9110 §10.2.3)."""
        if self.retry_after is None:
            return None
        return str(max(0, math.ceil(self.retry_after)))

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers a problem response for this error should carry."""
        value = self.retry_after_header()
        return {"Retry-After": value} if value is not None else {}

    def extensions(self) -> dict[str, Any]:
        """Extension members for the problem+json body (RFC 9457 §3.2)."""
        return {}


class ConfigurationError(ToolkitError, ValueError):
    """Settings or arguments are invalid, or unsafe for the environment.

    A deployment or programming error: a negative TTL, a NaN lease, an
    unknown algorithm, ``memory://`` in production. Also a ``ValueError``.
    """

    problem_type = "configuration-error"
    title = "Configuration error"


class UsageError(ToolkitError, TypeError):
    """The toolkit was called the wrong way: a value of the wrong type, a sync function
    where an async one is needed, an argument name the function does not have.

    A programming error. Also a ``TypeError``.
    """

    problem_type = "usage-error"
    title = "Toolkit used incorrectly"


class StateError(ToolkitError, RuntimeError):
    """An object was used in a state that does not allow it: a closed ``Broadcaster``,
    a check that runs after the response started.

    A programming error. Also a ``RuntimeError``.
    """

    problem_type = "state-error"
    title = "Toolkit used in the wrong state"


class RedisUnavailable(ToolkitError, ConnectionError):
    """Redis could not be reached, timed out, or the circuit breaker is open."""

    status_code = 503
    problem_type = "redis-unavailable"
    title = "Service temporarily unavailable"

    def __init__(
        self, message: str, *, url: str | None = None, retry_after: float | None = 1.0
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.url = url

    @property
    def detail(self) -> str:
        # The URL (even masked) is operator information, not client information.
        return "A backing store is temporarily unavailable; retry later."


class RedisCommandError(ToolkitError):
    """Redis answered a command with an error: a key of the wrong type, a failing script,
    a command the server does not know.

    The server is up (a circuit breaker counts this as a success), so retrying
    the same call gives the same answer. The message names the operation, never
    the Redis error text (which may quote script source or key names); that text
    stays in ``__cause__`` for the logs. Answers 500 like any unexpected error.
    """


class CodecError(ToolkitError, ValueError):
    """A value could not be encoded, or a stored payload could not be decoded."""

    problem_type = "codec-error"
    title = "Stored data could not be decoded"


class EncodeError(CodecError):
    """A value handed to the toolkit cannot be encoded (unsupported type, inf/nan, huge int).

    The value came from the caller, so an HTTP answer is 422, not a server error.
    """

    status_code = 422
    problem_type = "unencodable-value"
    title = "Value cannot be stored"


class PayloadTooLarge(CodecError):
    """A payload exceeds a size cap (for example a decompression bomb)."""

    status_code = 413
    problem_type = "payload-too-large"
    title = "Payload too large"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class SignatureError(CodecError):
    """A signed payload failed HMAC verification."""

    problem_type = "signature-error"
    title = "Signature verification failed"


class InvalidKey(ToolkitError, ValueError):
    """A key part is empty or uses characters the key builder refuses."""

    status_code = 400
    problem_type = "invalid-key"
    title = "Invalid key"


class PatternTooComplex(InvalidKey):
    """A glob pattern has more wildcards than the toolkit matches (bounded matching cost)."""

    problem_type = "pattern-too-complex"
    title = "Pattern has too many wildcards"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class LockError(ToolkitError):
    """Base class for lock errors; carries the lock name."""

    status_code = 409
    problem_type = "lock-error"
    title = "Lock error"

    def __init__(self, message: str, *, lock_name: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.lock_name = lock_name


class LockNotAcquired(LockError):
    """The lock is held by another owner and the wait bound ran out."""

    problem_type = "lock-not-acquired"
    title = "Resource is locked"


class LockNotOwned(LockError):
    """Release or extend of a lock this owner no longer holds."""

    problem_type = "lock-not-owned"
    title = "Lock not owned"


class LockLost(LockError):
    """The lock expired or was taken by another owner while it was held."""

    problem_type = "lock-lost"
    title = "Lock lost"


class RateLimitExceeded(ToolkitError):
    """A rate-limit policy refused the request."""

    status_code = 429
    problem_type = "quota-exceeded"
    title = "Quota exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        violated_policies: Sequence[str] = (),
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.violated_policies = list(violated_policies)
        self.extra_headers = dict(extra_headers or {})

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, **super().headers()}

    def extensions(self) -> dict[str, Any]:
        return {"violated-policies": self.violated_policies}


class IdempotencyError(ToolkitError):
    """Base class for Idempotency-Key errors."""

    status_code = 400
    problem_type = "idempotency-error"
    title = "Idempotency error"


class IdempotencyKeyMissing(IdempotencyError):
    """The route requires an ``Idempotency-Key`` header and none was sent."""

    problem_type = "idempotency-key-missing"
    title = "Idempotency-Key header is required"


class IdempotencyKeyInvalid(IdempotencyError):
    """The ``Idempotency-Key`` header is not 1-255 printable ASCII characters."""

    problem_type = "idempotency-key-invalid"
    title = "Idempotency-Key header is malformed"


class IdempotencyConflict(IdempotencyError):
    """A request with the same key is still being processed."""

    status_code = 409
    problem_type = "idempotency-key-in-use"
    title = "A request with this Idempotency-Key is still being processed"


class IdempotencyMismatch(IdempotencyError):
    """The key was already used with a different request payload."""

    status_code = 422
    problem_type = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"


class IdempotencyCallerUnknown(IdempotencyError):
    """Nothing identifies the caller, and anonymous Idempotency-Keys are refused (400)."""

    problem_type = "idempotency-caller-unknown"
    title = "Idempotency-Key needs an identified caller"


class IdempotencyResponseNotKept(IdempotencyError):
    """The request already ran, but its response was over the storage cap (410).

    ``original_status`` is the status the first response had; the request is
    not run again.
    """

    status_code = 410
    problem_type = "idempotency-response-not-kept"
    title = "The response to this Idempotency-Key was not kept"

    def __init__(self, message: str, *, original_status: int) -> None:
        super().__init__(message)
        self.original_status = original_status

    def extensions(self) -> dict[str, Any]:
        return {"original-status": self.original_status}


class SessionError(ToolkitError):
    """Base class for session errors."""

    status_code = 400
    problem_type = "session-error"
    title = "Session error"


class SessionNotFound(SessionError):
    """The session id is unknown, expired or was deleted."""

    status_code = 404
    problem_type = "session-not-found"
    title = "Session not found"


class SessionConflict(SessionError):
    """A concurrent change to the same session keys could not be merged."""

    status_code = 409
    problem_type = "session-conflict"
    title = "Session changed concurrently"


class StreamError(ToolkitError):
    """Stream or consumer-group misuse."""

    problem_type = "stream-error"
    title = "Stream error"


class RouteDisabled(ToolkitError):
    """The route exists but this deployment has switched it off (e.g. a destructive demo route)."""

    status_code = 403
    problem_type = "route-disabled"
    title = "Route disabled"


class SubscriberOverflow(ToolkitError):
    """A pub/sub subscriber's bounded queue overflowed under the ``disconnect`` policy."""

    status_code = 503
    problem_type = "subscriber-overflow"
    title = "Subscriber fell behind"

    def __init__(self, message: str, *, queue_size: int) -> None:
        super().__init__(message)
        self.queue_size = queue_size
