"""A distributed counting semaphore (``Semaphore``) and its held ``Permit``.

A ``Permit`` is a ``Lease`` (its own token, lease and watchdog), as a ``RedisLock`` is;
``Semaphore``'s docstring says how holders, waiters and leases work.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from functools import lru_cache
from types import TracebackType

from app.core.clock import LOOP_CLOCK, Clock
from app.core.config import get_settings
from app.core.errors import ConfigurationError, LockError, LockNotAcquired
from app.core.guard import to_ms
from app.core.keys import KeySpace, deprecated_prefix
from app.core.redis import AnyRedis
from app.core.telemetry import from_self, traced
from app.services.locks._common import (
    LOCK_ATTRS,
    RECEIPT_TTL_MS,
    TAKEN,
    WAITER_TTL_MS,
    WAKE_TTL_MS,
    LostCallback,
    Seconds,
    blocking_bound,
    lease_guard,
    lease_timing,
    wait_bound,
    waited,
)
from app.services.locks._lease import Lease
from app.services.locks._scripts import (
    SEMAPHORE_ACQUIRE,
    SEMAPHORE_COUNT,
    SEMAPHORE_EXTEND,
    SEMAPHORE_RELEASE,
)
from app.services.locks._waiting import OnOneRedis, contend

__all__ = ["Permit", "Semaphore"]

_entered: ContextVar[tuple[Permit, ...]] = ContextVar("app_semaphore_entered", default=())
"""Permits taken by ``async with semaphore`` in the current task, innermost last."""


@lru_cache(maxsize=1024)
def _semaphore_keys(
    prefix: str, namespace: str, name: str
) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """The key, wake list, acquire keys and release keys of one name (built once per name)."""
    key = KeySpace(prefix, namespace).tagged(name)
    wake, queue, heartbeats = key + ":wake", key + ":queue", key + ":queue-heartbeats"
    return key, wake, (key, queue, heartbeats), (key, wake, queue, heartbeats, key + ":released")


class Permit(Lease):
    """One held permit of a ``Semaphore``: its own token, lease and watchdog.

    A handle: pass it to another task if that task should release it.
    ``async with permit:`` releases it at the end of the block (raising
    ``LockLost`` if its lease ran out meanwhile).
    """

    _kind = "semaphore"

    def __init__(self, semaphore: Semaphore, token: str, valid_until: float, holders: int) -> None:
        super().__init__(
            semaphore.name,
            semaphore.timeout,
            auto_renew=semaphore.auto_renew,
            renew_interval=semaphore.renew_interval,
            on_lost=semaphore.on_lost,
            drift=semaphore.drift,
            clock=semaphore.clock,
        )
        self.semaphore = semaphore
        self.holders = holders
        """Permits held (this one included) right after it was granted."""
        self._hold(token, valid_until)

    def __repr__(self) -> str:
        state = "held" if self._token else "released"
        return f"Permit({self.name!r}, {state})"

    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        return await self.semaphore._extend(token, ms, replace)

    async def _remote_release(self, token: str) -> bool:
        return await self.semaphore._release_token(token)

    async def release(self) -> None:
        """Give the permit back (wakes one waiter).

        Raises ``LockNotOwned`` when it was already released, or when its lease
        ran out before (another holder may have used the slot meanwhile). A
        release whose reply was lost and that the client retried still counts
        as released. Cancelling it does not stop the release.
        """
        if not await self._release_hold():
            raise self._not_owned_on_release()

    async def owned(self) -> bool:
        """Is this permit still held (its lease not run out)? One script call."""
        token = self._token
        if token is None:
            return False
        _, left = await self.semaphore._count(token)
        return left >= 0

    async def __aenter__(self) -> Permit:
        self._arm_body()
        return self


class Semaphore(OnOneRedis):
    """At most *limit* concurrent holders of *name*, across processes and machines.

    ::

        exports = Semaphore(redis, "exports", limit=3, timeout=30)

        async with exports as permit:          # each entering task gets its own permit
            ...                                # at most 3 run at once, across processes

        permit = await exports.acquire()       # non-blocking -> Permit | None
        if permit is not None:
            try:
                ...
            finally:
                await permit.release()

    Holders live in one sorted set, scored by the server time at which each
    permit's lease ends. The acquire script drops expired permits first, so a
    holder that crashed (or stalled past its lease) gives its permit back after
    its lease, without any janitor. Release, extend and the watchdog work per
    permit exactly as for ``RedisLock``: compare-and-act scripts keyed by the
    permit's own token, ``auto_renew=True`` renews every ``timeout/3`` and cancels
    the ``async with`` block with ``LockLost`` if the permit is lost or no renewal
    is confirmed by ``permit.deadline`` (the lease counted from when its last
    acquire/renewal was sent, minus ``drift``), and a cancelled acquire leaves no
    permit behind. Waiters are woken by releases
    (``BLPOP`` on a wake list, in-process wake-ups, jittered polling as the
    fallback); ``fair=True`` serves fair waiters in FIFO order.

    ``limit`` is not stored in Redis: every user of one name must pass the same
    limit (a smaller one only restricts that user). When Redis is down every
    operation raises ``RedisUnavailable``.

    Args:
        redis: any ``redis.asyncio`` client, ``RedisCluster`` or fakeredis.
        name: what is limited, e.g. ``"exports"`` (escaped into the key).
        limit: how many permits exist.
        timeout: each permit's lease in seconds (or ``timedelta``); required.
        blocking_timeout: how long blocking acquires and ``async with`` wait
            (default: the lease).
        auto_renew, renew_interval, on_lost, drift: the permit watchdog and the
            local lease deadline it enforces, as for ``RedisLock`` (a permit
            whose renewal is not confirmed by ``permit.deadline`` cancels its
            ``async with`` block with ``LockLost``).
        fair: FIFO order among ``fair=True`` waiters.
        namespace: the key space (``<REDIS_KEY_PREFIX>:<namespace>:{name}``,
            default ``semaphore``).
        key_prefix: deprecated (``DeprecationWarning``): overrides the root prefix
            instead. Use ``namespace=``.
        clock: the clock each permit's lease is tracked on locally, as for
            ``RedisLock`` (default ``LOOP_CLOCK``, the event loop's time).

    Keys (one hash tag per name): ``<prefix>:<namespace>:{name}`` (holders),
    ``...:wake``, ``...:queue``, ``...:queue-heartbeats``, ``...:released``
    (tokens of permits released in the last 10 s); all expire.
    """

    _kind = "semaphore"

    def __init__(
        self,
        redis: AnyRedis,
        name: str,
        limit: int,
        timeout: Seconds,
        *,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: LostCallback | None = None,
        fair: bool = False,
        namespace: str = "semaphore",
        drift: Seconds | None = None,
        clock: Clock | None = None,
        key_prefix: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a semaphore name must be a non-empty string, got {name!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigurationError(f"limit must be an integer >= 1, got {limit!r}")
        self.redis = redis
        self.name = name
        self.limit = limit
        self.timeout, self.renew_interval, self.drift = lease_timing(
            timeout, renew_interval, drift, auto_renew=auto_renew
        )
        self.blocking_timeout = blocking_bound(blocking_timeout, self.timeout)
        self.auto_renew = auto_renew
        self.on_lost = on_lost
        self.clock: Clock = LOOP_CLOCK if clock is None else clock
        self.fair = fair
        # The prefix is resolved here, not in the cache: a settings change must show.
        prefix = deprecated_prefix(key_prefix, "Semaphore") or get_settings().redis_key_prefix
        keys = _semaphore_keys(prefix, namespace, name)
        self.key, self._wake_key, self._acquire_keys, self._release_keys = keys
        self._acquire_args = (limit, to_ms(self.timeout), "1" if fair else "0", WAITER_TTL_MS)
        self._guard = lease_guard(redis, "semaphore", name, self.timeout)

    def __repr__(self) -> str:
        return f"Semaphore({self.name!r}, limit={self.limit}, timeout={self.timeout:g})"

    async def _attempt(self, token: str) -> list[int]:
        reply: list[int] = await self._eval(
            SEMAPHORE_ACQUIRE, self._acquire_keys, (token, *self._acquire_args)
        )
        return reply

    async def _release_token(self, token: str) -> bool:
        return await self._release_waking(
            SEMAPHORE_RELEASE, self._release_keys, (token, WAKE_TTL_MS, self.limit, RECEIPT_TTL_MS)
        )

    async def _give_up(self, token: str) -> bool:
        return await self._release_token(token)

    async def _extend(self, token: str, ms: int, replace: bool) -> int:
        return await self._extend_with(SEMAPHORE_EXTEND, token, ms, replace)

    async def _count(self, token: str = "") -> tuple[int, int]:
        live, left = await self._eval(SEMAPHORE_COUNT, (self.key,), (token,))
        return int(live), int(left)

    async def acquire(
        self, blocking: bool = False, blocking_timeout: Seconds | None = None
    ) -> Permit | None:
        """Take a permit: the ``Permit`` handle, or None if all are taken.

        One script call drops expired permits and grants one if fewer than
        ``limit`` are held. Non-blocking by default; ``blocking=True`` waits up
        to *blocking_timeout* (default: the instance's), woken by releases.
        Cancelling it is safe: a permit granted by a call that was cancelled
        before its reply arrived is given back by a shielded clean-up. Raises
        ``RedisUnavailable`` when Redis is down.
        """
        permit, _ = await self._acquire(
            wait_bound(blocking, blocking_timeout, self.blocking_timeout)
        )
        return permit

    @traced("lock.acquire", attrs=from_self(LOCK_ATTRS), result=lambda r: TAKEN[bool(r[0])])
    async def _acquire(self, wait: float) -> tuple[Permit | None, float]:
        loop = asyncio.get_running_loop()
        token, reply, sent = await contend(self, loop.time() + wait)
        if token is None:
            return None, reply[1] / 1000
        return Permit(self, token, sent + self.timeout, int(reply[1])), 0.0

    async def count(self) -> int:
        """How many permits are held right now (leases not run out). One script call."""
        live, _ = await self._count()
        return live

    async def locked(self) -> bool:
        """True when no permit is free right now."""
        return await self.count() >= self.limit

    async def __aenter__(self) -> Permit:
        """Wait up to ``blocking_timeout`` for a permit; raise ``LockNotAcquired`` if none frees up.

        The permit belongs to the entering task (``async with`` on one shared
        ``Semaphore`` from many tasks gives each its own permit).
        """
        permit, hint = await self._acquire(self.blocking_timeout)
        if permit is None:
            raise LockNotAcquired(
                f"all {self.limit} permits of semaphore {self.name!r} are taken"
                f"{waited(self.blocking_timeout)}. Retry after {hint:.1f} s, or raise "
                "blocking_timeout.",
                lock_name=self.name,
                retry_after=max(hint, 0.001),
            )
        permit._arm_body()
        _entered.set((*_entered.get(), permit))
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the entering task's permit; raise ``LockLost`` if its lease ran out."""
        held = _entered.get()
        for i in range(len(held) - 1, -1, -1):
            if held[i].semaphore is self:
                permit = held[i]
                _entered.set(held[:i] + held[i + 1 :])
                break
        else:
            raise LockError(
                f"semaphore {self.name!r}: __aexit__ without a permit entered in this task",
                lock_name=self.name,
            )
        await permit.__aexit__(exc_type, exc, tb)
