"""``RedisLock`` (a mutex on one Redis, with fencing tokens) and ``fenced_write``.

The package docstring (``app.services.locks``) describes what makes it correct.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache, partial
from typing import Final, NamedTuple

from app.core.clock import Clock
from app.core.config import get_settings
from app.core.errors import LockError, LockNotAcquired
from app.core.guard import Guard, as_seconds, as_text, to_ms
from app.core.keys import KeySpace, deprecated_prefix
from app.core.redis import AnyRedis
from app.core.scripts import ScriptArg
from app.services.locks._common import (
    RECEIPT_TTL_MS,
    WAITER_TTL_MS,
    WAKE_TTL_MS,
    LostCallback,
    Seconds,
    blocking_bound,
    lease_guard,
    wait_bound,
    waited,
)
from app.services.locks._lease import Lease
from app.services.locks._scripts import (
    FENCED_WRITE,
    LOCK_ACQUIRE,
    LOCK_ACQUIRE_FAST,
    LOCK_EXTEND,
    LOCK_RELEASE,
)
from app.services.locks._waiting import OnOneRedis, contend

__all__ = ["DEFAULT_FENCE_TTL", "RedisLock", "fenced_write"]

DEFAULT_FENCE_TTL: Final = timedelta(days=7)
"""How long an idle lock's fence counter is kept (it restarts above old tokens after)."""


class _LockKeys(NamedTuple):
    """The keys of one lock name (one hash tag), in the orders its scripts take them."""

    key: str
    wake: str
    fast: tuple[str, ...]  # lock_acquire_fast.lua
    fair: tuple[str, ...]  # lock_acquire.lua
    release: tuple[str, ...]  # lock_release.lua


@lru_cache(maxsize=4096)
def _lock_keys(prefix: str, namespace: str, name: str) -> _LockKeys:
    """Built once per name: lock objects are made per request, for the same few names."""
    key = KeySpace(prefix, namespace).tagged(name)
    fence, wake, waiting = key + ":fence", key + ":wake", key + ":waiting"
    queue, heartbeats = key + ":queue", key + ":queue-heartbeats"
    return _LockKeys(
        key,
        wake,
        (key, fence, waiting),
        (key, fence, queue, heartbeats),
        (key, wake, queue, heartbeats, key + ":released", waiting),
    )


@lru_cache(maxsize=64, typed=True)
def _fence_ms(fence_ttl: Seconds) -> int:
    """*fence_ttl* checked, in ms; once per value (and type: ``True`` stays refused)."""
    return to_ms(as_seconds(fence_ttl, "fence_ttl"))


class RedisLock(Lease, OnOneRedis):
    """A distributed mutex on one Redis (standalone, Sentinel or Cluster).

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` either way),
            ``RedisCluster`` or fakeredis.
        name: what is locked, e.g. ``"jobs:42"`` (escaped into the key, so any
            text is safe).
        timeout: the lease in seconds (or ``timedelta``); required: a holder
            that dies frees the lock after it.
        blocking_timeout: how long blocking acquires (and ``async with``) wait;
            default: the lease.
        auto_renew: run a watchdog while held that renews the lease every
            ``renew_interval`` (default ``timeout/3``). The lease is tracked
            locally from when each acquire/renewal was *sent*: if no renewal is
            confirmed by ``deadline`` (that time plus the lease, minus
            ``drift``), or a renewal finds the lock gone, the ``async with``
            block is cancelled at once and ``LockLost`` raised, however long the
            pending network call would still take. Each renewal is bounded by
            the time left.
        on_lost: called with the ``LockLost`` error when the watchdog loses the
            lock (a plain function or a coroutine function).
        fair: FIFO order among ``fair=True`` waiters (others may still barge in).
        fence_ttl: how long an idle lock's fencing counter is kept.
        namespace: the key space (``<REDIS_KEY_PREFIX>:<namespace>:{name}``,
            default ``lock``); locks of different namespaces never collide.
        key_prefix: deprecated (``DeprecationWarning``): overrides the root prefix
            instead (``<key_prefix>:lock:{name}``). Use ``namespace=``.
        drift: the drift margin (seconds or ``timedelta``): the holder gives the
            lease up this long before it can end in Redis. Default: 1 % of the
            lease plus 2 ms.
        clock: the clock the lease is tracked on locally (``deadline``, the
            watchdog's renewals and timers); default ``LOOP_CLOCK``, the event
            loop's time. Tests pass ``app.testing.clock.VirtualClock`` to run
            renewals without sleeping. Waiting to acquire and the TTL in Redis
            stay on real time.

    Keys (one hash tag per name): ``<prefix>:<namespace>:{name}`` (owner token, PX
    lease), ``...:fence``, ``...:wake``, ``...:queue``, ``...:queue-heartbeats``,
    ``...:released`` (the last release's token, 10 s), ``...:waiting`` (set
    for a few seconds by a non-fair acquirer that found the lock held).
    """

    def __init__(
        self,
        redis: AnyRedis,
        name: str,
        timeout: Seconds,
        *,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: LostCallback | None = None,
        fair: bool = False,
        fence_ttl: Seconds = DEFAULT_FENCE_TTL,
        namespace: str = "lock",
        drift: Seconds | None = None,
        clock: Clock | None = None,
        key_prefix: str | None = None,
    ) -> None:
        super().__init__(
            name,
            timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            drift=drift,
            clock=clock,
        )
        self.redis = redis
        self.blocking_timeout = blocking_bound(blocking_timeout, self.timeout)
        self.fair = fair
        # The prefix is resolved here, not in the cache: a settings change must show.
        prefix = deprecated_prefix(key_prefix, "RedisLock") or get_settings().redis_key_prefix
        keys = _lock_keys(prefix, namespace, name)
        self.key = keys.key
        self._wake_key = keys.wake
        fence_ms = max(_fence_ms(fence_ttl), self._lease_ms)
        # Non-fair acquirers take the fast script (SET NX PX and the fence; a failed attempt
        # sets the waiter flag); fair ones queue. A release skips the queue and the wake list
        # unless the waiter flag or the queue exists.
        self._acquire_script = LOCK_ACQUIRE if fair else LOCK_ACQUIRE_FAST
        self._acquire_keys = keys.fair if fair else keys.fast
        self._acquire_args: tuple[ScriptArg, ...] = (
            (self._lease_ms, fence_ms, "1", WAITER_TTL_MS)
            if fair
            else (self._lease_ms, fence_ms, WAITER_TTL_MS)
        )
        self._release_keys = keys.release
        self._guard = lease_guard(redis, "lock", name, self.timeout)
        self._fence: int | None = None

    def __repr__(self) -> str:
        state = "held" if self._token else "free"
        return f"RedisLock({self.name!r}, timeout={self.timeout:g}, {state}, fence={self._fence})"

    @property
    def fence(self) -> int | None:
        """The fencing token of the latest acquisition (None before the first).

        Strictly larger than every token issued for this name before it.
        Send it with every write to the protected resource, and make the
        resource refuse a token smaller than the largest it has accepted
        (``fenced_write`` for Redis; ``UPDATE ... WHERE fence <= :fence`` in SQL).
        """
        return self._fence

    async def _attempt(self, token: str) -> list[int]:
        with self._guard:  # not through _eval: one coroutine less on every acquire
            reply: list[int] = await self._acquire_script(
                self.redis, self._acquire_keys, (token, *self._acquire_args)
            )
        return reply

    async def _give_up(self, token: str) -> bool:
        return await self._remote_release(token)

    async def _remote_release(self, token: str) -> bool:
        return await self._release_waking(
            LOCK_RELEASE, self._release_keys, (token, WAKE_TTL_MS, RECEIPT_TTL_MS)
        )

    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        return await self._extend_with(LOCK_EXTEND, token, ms, replace)

    async def acquire(
        self, blocking: bool = False, blocking_timeout: Seconds | None = None
    ) -> bool:
        """Take the lock; True if taken.

        Non-blocking by default: one script call that sets the key with its
        lease (``SET NX PX``) and issues the fencing token, then returns. With
        ``blocking=True`` it waits up to *blocking_timeout* (default: the
        instance's ``blocking_timeout``), woken by releases.

        Cancelling it is safe: if the attempt reached Redis, a shielded
        compare-and-delete with this call's token removes the key. Raises
        ``RedisUnavailable`` when Redis is down (never returns False for that).
        """
        taken, _ = await self._acquire(
            wait_bound(blocking, blocking_timeout, self.blocking_timeout)
        )
        return taken

    async def _take(self, deadline: float) -> float | None:
        token, reply, sent = await contend(self, deadline)
        if token is None:
            return reply[1] / 1000
        self._fence = int(reply[1])
        self._hold(token, sent + self.timeout)
        return None

    async def release(self) -> None:
        """Release the lock if this owner still holds it (compare-and-delete in one script).

        Wakes one waiter (in any process). Raises ``LockNotOwned`` when it was
        not held by this object, or when its lease expired / another owner took
        it meanwhile (the key of the new owner is left alone). A release whose
        reply was lost and that the client retried still counts as released.
        Cancelling it does not stop the release: it completes in the background.
        """
        if not await self._release_hold():
            raise self._not_owned_on_release()

    async def locked(self) -> bool:
        """Is the lock held by anyone right now? (one ``EXISTS``)."""
        with self._guard:
            exists = await self.redis.exists(self.key)
        return bool(exists)

    async def owned(self) -> bool:
        """Does this object hold the lock right now? (one ``GET``, compared with its token)."""
        token = self._token
        if token is None:
            return False
        with self._guard:
            value = await self.redis.get(self.key)
        return as_text(value) == token

    async def __aenter__(self) -> RedisLock:
        """Wait up to ``blocking_timeout``; raise ``LockNotAcquired`` (with ``retry_after``) if still held."""
        taken, hint = await self._acquire(self.blocking_timeout)
        if not taken:
            raise LockNotAcquired(
                f"lock {self.name!r} is held by another owner{waited(self.blocking_timeout)}. "
                f"Retry after {hint:.1f} s, or raise blocking_timeout.",
                lock_name=self.name,
                retry_after=max(hint, 0.001),
            )
        self._arm_body()
        return self


# -- checking the fence at the resource ---------------------------------------------------


async def fenced_write(
    redis: AnyRedis,
    key: str,
    value: str | bytes,
    fence: int,
    *,
    ttl: Seconds | None = None,
) -> bool:
    """Write *value* to the hash *key* unless a holder with a larger fence wrote first.

    The resource side of fencing, for a resource that lives in Redis: one
    script compares *fence* with the largest token the hash has accepted and
    writes ``value`` and ``fence`` only when ``fence`` is not smaller. False
    means this writer's lock was lost and a newer holder already wrote: stop.
    *ttl* (seconds) sets the key's expiry on each write (None keeps it).

    Raises ``RedisUnavailable`` when Redis is down, and ``LockError`` (naming
    *key*; Redis's text in ``__cause__``) when Redis refuses the write, e.g. *key*
    holds something other than a hash.
    """
    ms = 0 if ttl is None else to_ms(as_seconds(ttl, "ttl"))
    guard = Guard(redis, f"fenced write to {key!r}", refused=partial(LockError, lock_name=key))
    with guard:
        written = await FENCED_WRITE(redis, (key,), (int(fence), value, ms))
    return bool(written)
