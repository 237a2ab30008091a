"""The one way a service calls Redis and fails, and the small helpers every service needs.

A service builds one ``Guard`` per client (in its constructor) and runs every
Redis call inside it::

    from app.core.guard import Duration, FailOpen, Guard, as_seconds, as_text, to_ms

    class ThingStore:
        def __init__(self, redis: AnyRedis, *, ttl: Duration = 60, fail_open: bool = True):
            self.redis = redis
            self._ttl_ms = to_ms(as_seconds(ttl, "ttl"))      # ConfigurationError if bad
            self._guard = Guard(redis, "thing store")          # the client's breaker
            self._fail_open = FailOpen(self._guard, log, enabled=fail_open)

        async def get(self, key: str) -> str | None:          # a call that must not fail
            with self._guard:                                 # raises ToolkitErrors only
                return as_text(await self.redis.get(key))

        async def peek(self, key: str) -> str | None:         # a call that may fail open
            return await self._fail_open.call(lambda: self.redis.get(key), None)

What ``with guard:`` does (``Guard.__exit__`` is the whole policy):

| inside the block | the caller gets | the breaker |
|---|---|---|
| (entering while the breaker is open) | ``RedisUnavailable`` at once, ``retry_after=reset_timeout`` | a rejection |
| success, or an exception not from Redis | the result, or that exception | success |
| connection error, timeout, ``LOADING``, ``CLUSTERDOWN``, ``TRYAGAIN``, ``OSError`` | ``RedisUnavailable`` from it | failure |
| ``RedisUnavailable`` (from a nested call) | the same error | failure |
| ``OOM`` or ``READONLY`` refusal | ``RedisUnavailable`` from it | success |
| any other ``RedisError`` (``WRONGTYPE``, a script error, ...) | ``refused(message)`` from it: ``RedisCommandError`` by default | success |
| ``asyncio.CancelledError`` | the cancellation | neutral |

Every message starts with the guard's *subject* (``"lock 'jobs:1'"``) and ends
with its *hint* (what the caller should know, e.g. "whether it is held is
unknown until its lease runs out"). A ``RedisUnavailable`` message quotes the
connection error (operator information: its HTTP ``detail`` is generic); the
``refused`` message never quotes Redis's text, which stays in ``__cause__``.
``refused`` is any ``Callable[[str], ToolkitError]``: a service whose callers
expect its own class passes it (``StreamError``,
``functools.partial(LockError, lock_name=name)``), and a fail-open service
that treats a refused command like an outage passes ``RedisUnavailable``.

``FailOpen(guard, logger, enabled=...)`` is the degraded mode: ``call(fn,
default)`` runs ``fn()`` under the guard and returns *default* when it raises
``RedisUnavailable`` (or anything in ``catch``); ``failed(exc)`` is the same
bookkeeping for a hand-written ``except`` block. With ``enabled=False``
(fail-closed) the error is re-raised after the bookkeeping. It counts
``failures`` and logs one warning when the situation changes (the breaker
changed state, or the error is of another kind than the last one logged), at
most one per ``interval`` seconds (a change inside the interval is logged
with the first failure after it): never one per call.

Rules for a service author:

1. One ``Guard`` per service instance, built in the constructor; its subject
   names the instance (``f"cache {namespace!r}"``). Never ``breaker_for`` or
   ``except RedisError`` in a service: the guard is the only place that maps
   Redis errors.
2. Only Redis I/O inside the block (one command, a script, a whole
   ``async with client.pipeline()``). Decoding and user callbacks go after it:
   a half-open breaker's single trial call is held until the block ends.
3. A per-call timeout goes inside the block (``async with asyncio.timeout(t)``):
   its ``TimeoutError`` counts as a failure like a socket timeout.
4. Catch ``RedisUnavailable`` only where the service degrades, through
   ``FailOpen`` (``call`` or ``failed``), so the log stays once per change::

       try:
           with self._guard:
               raw = await self.redis.get(key)
       except RedisUnavailable as exc:
           self._fail_open.failed(exc)    # re-raises when fail-closed
           return default

5. Durations: accept ``Duration``, validate in the constructor with
   ``as_seconds`` (and ``to_ms`` for Redis), so a bad value fails at startup.
6. A blocking wait is capped with ``block_cap(client, ...)`` once per client.

The helpers:

* ``Duration`` (``int | float | timedelta``) for every TTL, lease and timeout,
  ``as_seconds(value, what)`` to validate one (``ConfigurationError`` for
  ``bool``, a non-number, NaN, infinity, a negative, and zero unless
  ``allow_zero``) and ``to_ms(seconds)`` for the one rounding rule: **up** to
  a whole millisecond (float noise below a nanosecond ignored), so what Redis
  keeps is never shorter than asked (1.0004 s is 1001 ms, 1.1 s is 1100 ms).
* ``as_text(value)``: a reply as ``str`` (bytes decoded as UTF-8, invalid
  bytes replaced, never raising; ``None`` stays ``None``; numbers ``str()``).
* ``block_cap(client, longest=1.0)``: the longest single ``BLPOP`` /
  ``XREADGROUP BLOCK`` wait that returns before the client's socket timeout
  gives up on it (a quarter of the timeout, at least 0.15 s, earlier).
* ``PerClient(build)``: one service instance per client object, built on
  first use, gone with the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeAlias, TypeVar, overload

from redis.exceptions import RedisError

from app.core.breaker import CONNECTION_ERRORS, REFUSED_FOR_NOW, CircuitBreaker, breaker_for
from app.core.errors import ConfigurationError, RedisCommandError, RedisUnavailable, ToolkitError

__all__ = [
    "CONNECTION_ERRORS",
    "REFUSED_FOR_NOW",
    "Duration",
    "FailOpen",
    "Guard",
    "PerClient",
    "as_seconds",
    "as_text",
    "block_cap",
    "socket_timeout",
    "to_ms",
]

T = TypeVar("T")
D = TypeVar("D")
S = TypeVar("S")


# -- the guard ----------------------------------------------------------------------------


class Guard:
    """Breaker and error mapping around a service's Redis calls (see the module docstring).

    Args:
        client: the client the calls go to; its ``breaker_for`` breaker is used.
        subject: what the calls are about, first in every message (``"cache 'users'"``).
        refused: builds the error for a command Redis answered with an error
            (default ``RedisCommandError``); it gets the message, the original
            becomes its ``__cause__``.
        hint: appended to every ``RedisUnavailable`` message (``"; retry ..."``).
        breaker: use this breaker instead of the client's (tests, a private budget).

    A slots class, not a ``@contextmanager``: entering and leaving cost two
    method calls. It keeps no state per call, so one guard serves any number of
    concurrent calls.
    """

    __slots__ = ("breaker", "hint", "refused", "subject")

    def __init__(
        self,
        client: object,
        subject: str,
        *,
        refused: Callable[[str], ToolkitError] = RedisCommandError,
        hint: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.breaker = breaker if breaker is not None else breaker_for(client)
        self.subject = subject
        self.refused = refused
        self.hint = hint

    def __repr__(self) -> str:
        return f"Guard({self.subject!r}, breaker={self.breaker.state})"

    def __enter__(self) -> None:
        if not self.breaker.allow():
            raise self.breaker.open_error(f"{self.subject}: ", self.hint)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        breaker = self.breaker
        if exc is None:
            breaker.record_success()
            return
        if isinstance(exc, RedisError) and not isinstance(exc, CONNECTION_ERRORS):
            breaker.record_success()  # the server answered: no reason to stop trying
            if isinstance(exc, REFUSED_FOR_NOW):
                raise RedisUnavailable(
                    f"{self.subject}: Redis refused the call for now ({_reason(exc)}){self.hint}"
                ) from exc
            raise self.refused(f"{self.subject}: Redis refused the command") from exc
        if isinstance(exc, RedisUnavailable):
            breaker.record_failure(exc)
            return
        if isinstance(exc, CONNECTION_ERRORS):
            breaker.record_failure(exc)
            raise RedisUnavailable(
                f"{self.subject}: Redis is unreachable ({_reason(exc)}){self.hint}"
            ) from exc
        if isinstance(exc, asyncio.CancelledError):
            breaker.release_trial()  # a cancelled call proves nothing either way
            return
        breaker.record_success()  # our own error after Redis answered (a decode error, ...)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # asyncio.timeout's TimeoutError has no text


class FailOpen:
    """The degraded mode of a service: a default instead of an error, logged once per change.

    Args:
        guard: the service's guard (its breaker and subject are used).
        logger: where the warning goes (the service's logger).
        enabled: True fails open; False (fail-closed) re-raises after counting.
        fallback: what the service does meanwhile, for the log line
            (``"serving misses"``); fail-closed says ``"raising 503"``.
        catch: the errors that fail open (default ``RedisUnavailable``; a
            service that must survive anything passes ``(Exception,)``).
        interval: at most one log line per this many seconds.
        clock: monotonic seconds (tests inject one).

    ``failures`` counts every failure seen, logged or not.
    """

    __slots__ = (
        "_clock",
        "_logged_at",
        "_logged_kind",
        "_logged_transitions",
        "catch",
        "enabled",
        "failures",
        "fallback",
        "guard",
        "interval",
        "logger",
    )

    def __init__(
        self,
        guard: Guard,
        logger: logging.Logger,
        *,
        enabled: bool = True,
        fallback: str = "failing open",
        catch: tuple[type[BaseException], ...] = (RedisUnavailable,),
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.guard = guard
        self.logger = logger
        self.enabled = enabled
        self.fallback = fallback
        self.catch = catch
        self.interval = interval
        self.failures = 0
        self._clock = clock
        self._logged_at = -math.inf
        self._logged_transitions = -1
        self._logged_kind: type[BaseException] | None = None

    async def call(self, fn: Callable[[], Awaitable[T]], default: D) -> T | D:
        """``await fn()`` under the guard; *default* when it fails (fail-open).

        Fail-closed, the error is raised (after ``failed``). Cancellation
        propagates untouched.
        """
        try:
            with self.guard:
                return await fn()
        except self.catch as exc:
            self.failed(exc)
            return default

    def failed(self, exc: BaseException) -> None:
        """Count *exc*, log it if the situation changed, and re-raise it when fail-closed.

        Call it from an ``except RedisUnavailable`` block of hand-written code;
        it returns normally only in fail-open mode.
        """
        self.failures += 1
        transitions = self.guard.breaker.transitions
        cause = exc.__cause__
        kind = type(cause) if cause is not None else type(exc)
        if transitions != self._logged_transitions or kind is not self._logged_kind:
            now = self._clock()
            if now - self._logged_at >= self.interval:
                self._logged_at = now
                self._logged_transitions = transitions
                self._logged_kind = kind
                subject = self.guard.subject
                reason = _reason(exc).removeprefix(f"{subject}: ")
                self.logger.warning(
                    "%s: Redis call failed (%s); %s until Redis answers again",
                    subject,
                    reason,
                    self.fallback if self.enabled else "raising 503",
                )
        if not self.enabled:
            raise exc


# -- durations ----------------------------------------------------------------------------

Duration: TypeAlias = "int | float | timedelta"
"""A duration: seconds as a number, or a ``timedelta`` (every TTL, lease and timeout)."""


def as_seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    """*value* (``int``, ``float`` or ``timedelta``) as float seconds, validated.

    Raises ``ConfigurationError`` (a ``ValueError``) naming *what* for a
    ``bool``, anything that is not a number or ``timedelta`` (``None``,
    ``"5"``), NaN, infinity, a negative, and zero unless *allow_zero*.
    A service with a "never expires" or "no limit" value checks for it first.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(
        value, bool
    ):  # a tuple: `int | float` builds a Union per call
        try:
            seconds = float(value)
        except OverflowError:  # an int past float range: refused below as infinite
            seconds = math.inf
    else:
        raise ConfigurationError(f"{what} must be seconds (int, float or timedelta), got {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{what} must be finite and {bound} seconds, got {value!r}")
    return seconds


_NOISE_MS = 1e-6  # a nanosecond: float error of seconds * 1000, never a real request


def to_ms(seconds: float) -> int:
    """*seconds* (validated by ``as_seconds``) in whole milliseconds, rounded **up**.

    The one rounding rule: what Redis keeps (a TTL, a lease) is never shorter
    than asked, and any positive duration is at least 1 ms; float noise below
    a nanosecond is ignored (1.1 s is 1100 ms, not 1101). 0 stays 0.
    """
    if seconds <= 0:
        return 0
    return max(1, math.ceil(seconds * 1000 - _NOISE_MS))


# -- replies ------------------------------------------------------------------------------


@overload
def as_text(value: None) -> None: ...


@overload
def as_text(value: bytes | bytearray | memoryview | str | int | float) -> str: ...


def as_text(value: object) -> str | None:
    """A Redis reply as text, whatever the client's ``decode_responses``.

    Bytes are decoded as UTF-8 with invalid sequences replaced (U+FFFD), so
    a corrupted value never raises here; ``str`` is returned as is, ``None``
    stays ``None`` and anything else (an integer reply) goes through ``str()``.
    """
    if type(value) is bytes:
        return value.decode("utf-8", "replace")
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


# -- blocking commands --------------------------------------------------------------------

_BLOCK_MARGIN = (0.25, 0.15)  # a blocking wait ends this share of the timeout (at least s) early
_LEAST_BLOCK = 0.01


def socket_timeout(client: object) -> float | None:
    """The client's ``socket_timeout`` in seconds, or None when it has none (waits forever).

    Works for ``Redis``, ``RedisCluster``, their fakeredis and multiplexed
    variants (``get_connection_kwargs()``); None for anything else.
    """
    try:
        kwargs = client.get_connection_kwargs()  # type: ignore[attr-defined]
    except AttributeError:
        return None
    timeout = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
        return float(timeout)
    return None


def block_cap(client: object, longest: float = 1.0) -> float:
    """The longest single blocking wait (``BLPOP``, ``XREADGROUP BLOCK``) to send on *client*.

    A blocking command whose wait outlasts the client's socket timeout fails
    with a timeout instead of returning empty, and the breaker counts it. The
    cap is the socket timeout minus a quarter of it (at least 0.15 s): the
    reply has that long to arrive. Never above *longest* (the service's own
    re-check period, or the wait it was asked for), never below 10 ms. Without
    a socket timeout: *longest*.
    """
    timeout = socket_timeout(client)
    if timeout is None:
        return longest
    share, least = _BLOCK_MARGIN
    return min(longest, max(_LEAST_BLOCK, timeout - max(timeout * share, least)))


# -- one service per client ---------------------------------------------------------------

_ATTR = "_toolkit_per_client"


class PerClient(Generic[S]):
    """One instance of something (a service, a registry) per client object.

    ``stores = PerClient(lambda client: SessionStore(client, **options))``, then
    ``stores(client)`` builds the store on first use and returns the same one
    after. An instance lives as long as its client and no longer, although it
    usually holds the client: it is kept in the client's own ``__dict__``
    (keyed by this ``PerClient``), so the pair is collected together. (A
    ``WeakKeyDictionary`` of client to service would keep every client alive,
    because the service refers to it.) Objects without a ``__dict__`` fall
    back to a ``WeakKeyDictionary`` held here, which is right as long as the
    instance does not refer to the client; objects that allow neither raise
    ``TypeError`` when an instance is built or set for them.

    Cheap on the hot path: two dict lookups. Not thread-safe (event loop only).
    """

    __slots__ = ("__weakref__", "_build", "_fallback")

    def __init__(self, build: Callable[[Any], S]) -> None:
        self._build = build
        self._fallback: weakref.WeakKeyDictionary[Any, S] = weakref.WeakKeyDictionary()

    def __call__(self, client: object) -> S:
        """The instance for *client*, built by ``build(client)`` on first use."""
        try:
            found: S = client.__dict__[_ATTR][self]
            return found
        except (KeyError, AttributeError):
            pass
        found_or_none = self.get(client)
        if found_or_none is not None:
            return found_or_none
        built = self._build(client)
        self.set(client, built)
        return built

    def get(self, client: object) -> S | None:
        """The instance for *client* if one was built or set, else None (builds nothing)."""
        store = getattr(client, "__dict__", None)
        if store is not None:
            found: S | None = store.get(_ATTR, {}).get(self)
            return found
        try:
            return self._fallback.get(client)
        except TypeError:  # not weakly referenceable either: nothing can be stored for it
            return None

    def set(self, client: object, value: S) -> None:
        """Make *value* the instance for *client* (replacing any)."""
        store = getattr(client, "__dict__", None)
        if store is not None:
            store.setdefault(_ATTR, {})[self] = value
        else:
            self._fallback[client] = value

    def discard(self, client: object) -> None:
        """Forget the instance for *client*, if any (the next call builds a new one)."""
        store = getattr(client, "__dict__", None)
        if store is not None:
            store.get(_ATTR, {}).pop(self, None)
        else:
            with contextlib.suppress(TypeError):
                self._fallback.pop(client, None)
