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
``title``, stated in its class line (``status=``, ``problem=``, ``title=``);
``app.http.problems`` turns any of them into an RFC 9457
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

    def __init_subclass__(
        cls,
        *,
        status: int | None = None,
        problem: str | None = None,
        title: str | None = None,
        **kwargs: Any,
    ) -> None:
        """A subclass states its problem answer in its class line (what it omits, it inherits):
        ``class LockLost(LockError, problem="lock-lost", title="Lock lost")``.
        """
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = status
        if problem is not None:
            cls.problem_type = problem
        if title is not None:
            cls.title = title

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


class ConfigurationError(
    ToolkitError, ValueError, problem="configuration-error", title="Configuration error"
):
    """Settings or arguments are invalid, or unsafe for the environment.

    A deployment or programming error: a negative TTL, a NaN lease, an
    unknown algorithm, ``memory://`` in production. Also a ``ValueError``.
    """


class UsageError(ToolkitError, TypeError, problem="usage-error", title="Toolkit used incorrectly"):
    """The toolkit was called the wrong way: a value of the wrong type, a sync function
    where an async one is needed, an argument name the function does not have.

    A programming error. Also a ``TypeError``.
    """


class StateError(
    ToolkitError, RuntimeError, problem="state-error", title="Toolkit used in the wrong state"
):
    """An object was used in a state that does not allow it: a closed ``Broadcaster``,
    a check that runs after the response started.

    A programming error. Also a ``RuntimeError``.
    """


class RedisUnavailable(
    ToolkitError,
    ConnectionError,
    status=503,
    problem="redis-unavailable",
    title="Service temporarily unavailable",
):
    """Redis could not be reached, timed out, or the circuit breaker is open."""

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


class CodecError(
    ToolkitError, ValueError, problem="codec-error", title="Stored data could not be decoded"
):
    """A value could not be encoded, or a stored payload could not be decoded."""


class EncodeError(
    CodecError, status=422, problem="unencodable-value", title="Value cannot be stored"
):
    """A value handed to the toolkit cannot be encoded (unsupported type, inf/nan, huge int).

    The value came from the caller, so an HTTP answer is 422, not a server error.
    """


class PayloadTooLarge(
    CodecError, status=413, problem="payload-too-large", title="Payload too large"
):
    """A payload exceeds a size cap (for example a decompression bomb)."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class SignatureError(CodecError, problem="signature-error", title="Signature verification failed"):
    """A signed payload failed HMAC verification."""


class InvalidKey(ToolkitError, ValueError, status=400, problem="invalid-key", title="Invalid key"):
    """A key part is empty or uses characters the key builder refuses."""


class PatternTooComplex(
    InvalidKey, problem="pattern-too-complex", title="Pattern has too many wildcards"
):
    """A glob pattern has more wildcards than the toolkit matches (bounded matching cost)."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class LockError(ToolkitError, status=409, problem="lock-error", title="Lock error"):
    """Base class for lock errors; carries the lock name."""

    def __init__(self, message: str, *, lock_name: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.lock_name = lock_name


class LockNotAcquired(LockError, problem="lock-not-acquired", title="Resource is locked"):
    """The lock is held by another owner and the wait bound ran out."""


class LockNotOwned(LockError, problem="lock-not-owned", title="Lock not owned"):
    """Release or extend of a lock this owner no longer holds."""


class LockLost(LockError, problem="lock-lost", title="Lock lost"):
    """The lock expired or was taken by another owner while it was held."""


class RateLimitExceeded(ToolkitError, status=429, problem="quota-exceeded", title="Quota exceeded"):
    """A rate-limit policy refused the request."""

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


class IdempotencyError(
    ToolkitError, status=400, problem="idempotency-error", title="Idempotency error"
):
    """Base class for Idempotency-Key errors."""


class IdempotencyKeyMissing(
    IdempotencyError, problem="idempotency-key-missing", title="Idempotency-Key header is required"
):
    """The route requires an ``Idempotency-Key`` header and none was sent."""


class IdempotencyKeyInvalid(
    IdempotencyError, problem="idempotency-key-invalid", title="Idempotency-Key header is malformed"
):
    """The ``Idempotency-Key`` header is not 1-255 printable ASCII characters."""


class IdempotencyConflict(
    IdempotencyError,
    status=409,
    problem="idempotency-key-in-use",
    title="A request with this Idempotency-Key is still being processed",
):
    """A request with the same key is still being processed."""


class IdempotencyMismatch(
    IdempotencyError,
    status=422,
    problem="idempotency-key-reused",
    title="Idempotency-Key reused with a different request",
):
    """The key was already used with a different request payload."""


class IdempotencyCallerUnknown(
    IdempotencyError,
    problem="idempotency-caller-unknown",
    title="Idempotency-Key needs an identified caller",
):
    """Nothing identifies the caller, and anonymous Idempotency-Keys are refused (400)."""


class IdempotencyResponseNotKept(
    IdempotencyError,
    status=410,
    problem="idempotency-response-not-kept",
    title="The response to this Idempotency-Key was not kept",
):
    """The request already ran, but its response was over the storage cap (410).

    ``original_status`` is the status the first response had; the request is
    not run again.
    """

    def __init__(self, message: str, *, original_status: int) -> None:
        super().__init__(message)
        self.original_status = original_status

    def extensions(self) -> dict[str, Any]:
        return {"original-status": self.original_status}


class SessionError(ToolkitError, status=400, problem="session-error", title="Session error"):
    """Base class for session errors."""


class SessionNotFound(
    SessionError, status=404, problem="session-not-found", title="Session not found"
):
    """The session id is unknown, expired or was deleted."""


class SessionConflict(
    SessionError, status=409, problem="session-conflict", title="Session changed concurrently"
):
    """A concurrent change to the same session keys could not be merged."""


class StreamError(ToolkitError, problem="stream-error", title="Stream error"):
    """Stream or consumer-group misuse."""


class RouteDisabled(ToolkitError, status=403, problem="route-disabled", title="Route disabled"):
    """The route exists but this deployment has switched it off (e.g. a destructive demo route)."""


class SubscriberOverflow(
    ToolkitError, status=503, problem="subscriber-overflow", title="Subscriber fell behind"
):
    """A pub/sub subscriber's bounded queue overflowed under the ``disconnect`` policy."""

    def __init__(self, message: str, *, queue_size: int) -> None:
        super().__init__(message)
        self.queue_size = queue_size
