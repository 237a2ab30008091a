"""Distributed locks on Redis: ``RedisLock`` with fencing tokens and a watchdog.

``Semaphore`` (``app.services.semaphore``) and ``Redlock`` (``app.services.redlock``)
build on the same machinery and are importable from here too::

    from app.services.locks import RedisLock, Semaphore, Redlock

    lock = RedisLock(redis, "resource:1", timeout=5)     # a 5 s lease, always
    if await lock.acquire():                             # non-blocking -> bool
        try:
            await write(resource, fence=lock.fence)      # check the fence at the resource
        finally:
            await lock.release()                         # compare-and-delete

    async with RedisLock(redis, "jobs:42", timeout=10, auto_renew=True):
        ...   # waits up to blocking_timeout (default: the lease), else LockNotAcquired;
              # renewed every timeout/3; if the lock is lost, or no renewal is
              # confirmed by lock.deadline, the block is cancelled and LockLost raised

What makes it correct by construction:

* **Ownership** is a random token per acquisition, held by the ``RedisLock``
  object (never thread-local or global). Release and extend are
  compare-and-act Lua scripts: nobody else's lock is ever deleted or extended.
  One object is one owner: tasks sharing an object queue for it locally, the
  way they would for an ``asyncio.Lock``, and a task holding it that acquires
  it again waits (it is not reentrant).
* **A lease is required.** Every key expires; blocking waits are finite by
  default (``blocking_timeout`` defaults to the lease).
* **Fencing tokens.** The acquire script increments ``{name}:fence`` in the
  same call that takes the lock (both keys share a hash tag), so every
  acquisition gets a strictly larger integer (``lock.fence``). Pass it to the
  protected resource, which refuses writes carrying a smaller token than the
  largest it has seen. The counter expires after ``fence_ttl`` idle time; it
  then restarts from the server clock in microseconds, which is above every
  token issued before unless the server clock went backwards.
* **A deadline kept locally.** With ``auto_renew`` the lease is tracked on the
  event loop's clock from when the acquire/renewal was *sent*; ``deadline`` is
  that time + the lease - ``drift``. A loop timer (not the renewal call, which a
  stalled link may hold for socket_timeout x retries) ends the hold there unless
  a renewal was confirmed first: the block is cancelled and ``LockLost`` raised
  ``drift`` before another owner can acquire. Each renewal is bounded by the
  time left.
* **Cancellation safety.** A cancelled ``acquire`` runs a shielded
  compare-and-delete with its token, so a ``SET`` that reached the server
  before the cancellation leaves no key; a cancelled ``release`` still
  completes; cancelling the body of ``async with`` releases the lock.
* **A fast path when nobody waits.** A non-fair acquire is ``SET NX PX`` plus
  the fencing counter in one short script; a release is a compare-and-delete
  that touches the queue and the wake list only when a waiter left its mark
  (a failed non-fair attempt sets ``{name}:waiting`` for a few seconds; fair
  waiters are in ``{name}:queue``).
* **Waiting without polling storms.** A release that finds a waiter pushes a
  marker to a per-lock wake list (``LPUSH``, trimmed to one, short TTL). In each process
  one waiter per lock blocks on it with ``BLPOP`` (bounded below the client's
  ``socket_timeout``, and at most 16 such waits per client, since each holds a
  pooled connection); the others park in memory and are woken by releases in
  the same process, with jittered back-off polling as the fallback (and a
  wait no longer than the holder's remaining lease). ``fair=True`` queues
  waiters in FIFO order (a sorted set with per-waiter heartbeats, so a crashed
  waiter leaves the queue within seconds) and wakes the head directly.

Checking the fence at the resource (the pattern Kleppmann describes): the
resource keeps the largest token it has accepted and refuses smaller ones.
``fenced_write()`` does it for a Redis hash in one script::

    -- KEYS[1] resource hash; ARGV[1] fence; ARGV[2] value
    local last = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
    if tonumber(ARGV[1]) < last then return 0 end      -- a newer holder wrote already
    redis.call('HSET', KEYS[1], 'value', ARGV[2], 'fence', ARGV[1])
    return 1

and in SQL the same check is a conditional update (0 rows -> you are stale)::

    UPDATE jobs SET result = :result, fence = :fence
     WHERE id = :id AND fence <= :fence;

What Redis cannot guarantee (see docs/locks.md, "Guarantees and non-guarantees"): replication is
asynchronous, so a failover can lose a just-taken lock and grant it twice;
leases run on the server clock, so a clock jump shortens them; a holder
paused longer than its lease (GC, swap, a blocked event loop) keeps running
without the lock. The watchdog narrows these windows, fencing closes them
for resources that check the token.

When Redis is down every operation raises ``RedisUnavailable`` (locks never
fail open); the lease bounds how long a lock whose release could not be sent
stays held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import math
import os
import random
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from functools import lru_cache
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TypeAlias, TypeVar

from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import (
    ConfigurationError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RedisUnavailable,
)
from app.core.keys import KeySpace
from app.core.redis import AnyRedis, CircuitBreaker, breaker_for
from app.core.scripts import Script, ScriptArg
from app.core.telemetry import from_self, traced

__all__ = [
    "DEFAULT_FENCE_TTL",
    "LostCallback",
    "RedisLock",
    "Seconds",
    "as_seconds",
    "fenced_write",
    "lease_drift",
    "wait_bound",
]

log = logging.getLogger("app.locks")

T = TypeVar("T")

Seconds: TypeAlias = "float | int | timedelta"
"""A duration: seconds as a number, or a ``timedelta``."""

LostCallback: TypeAlias = "Callable[[LockLost], Awaitable[None] | None]"
"""``on_lost(error)``: called once when the watchdog finds the lock gone (may be async)."""

DEFAULT_FENCE_TTL: Final = timedelta(days=7)
"""How long an idle lock's fence counter is kept (it restarts above old tokens after)."""

_WAKE_TTL_MS: Final = 2000  # how long a release's wake marker waits for a blocked waiter
_WAITER_TTL_MS: Final = 3000  # a fair waiter that stops polling this long leaves the queue
# A release whose reply was lost is retried by the client library; its receipt lets the
# retry answer "released" (not a false LockLost). Far longer than socket timeout x retries.
_RECEIPT_TTL_MS: Final = 10_000
_MAX_STEP: Final = 1.0  # longest single wait before a waiter re-checks the lock
_MIN_BLOCK: Final = 0.02  # shorter waits poll instead of BLPOP
_POLL_FIRST: Final = 0.1  # wake-ups do the work; polling is the safety net
_POLL_MAX: Final = 0.5
_MAX_BLOCKED_PER_CLIENT: Final = 16  # BLPOPs in flight per client (each holds a connection)

_LOCK_ATTRS = {"toolkit.lock.name": "name", "toolkit.lock.kind": "_kind"}  # span attr -> attr
_TAKEN = {True: "acquired", False: "timeout"}
_RELEASED = {True: "released", False: "not_owned"}
_ACQUIRE = Script.from_package("app.services.locks", "lua/lock_acquire.lua")
_ACQUIRE_FAST = Script.from_package("app.services.locks", "lua/lock_acquire_fast.lua")
_RELEASE = Script.from_package("app.services.locks", "lua/lock_release.lua")
_EXTEND = Script.from_package("app.services.locks", "lua/lock_extend.lua")
_FENCED_WRITE = Script.from_package("app.services.locks", "lua/lock_fenced_write.lua")


# -- small helpers --------------------------------------------------------------


def wait_bound(blocking: bool, blocking_timeout: Seconds | None, default: float) -> float:
    """How long an ``acquire(blocking, blocking_timeout)`` may wait; *default* when unset.

    Non-blocking acquires wait 0 and refuse a ``blocking_timeout`` (a likely mistake).
    """
    if not blocking:
        if blocking_timeout is not None:
            raise ConfigurationError("blocking_timeout needs blocking=True")
        return 0.0
    if blocking_timeout is None:
        return default
    return as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)


def as_seconds(value: Seconds | None, what: str, *, allow_zero: bool = False) -> float:
    """*value* as float seconds; refuses negatives, NaN and (unless allowed) zero."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(f"{what} must be seconds (int, float or timedelta), got {value!r}")
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{what} must be {bound} seconds, got {value!r}")
    return seconds


def lease_drift(
    lease: float, drift: Seconds | None, *, renew_interval: float | None = None
) -> float:
    """The drift margin of a *lease* (seconds): *drift*, or by default 1 % of it plus 2 ms.

    A holder treats its lease as ended this long before it can end in Redis,
    which covers the server's clock running faster than this process's and the
    time this process needs to notice. Refuses a margin as long as the lease,
    and, given the *renew_interval* of a watchdog, one that leaves no time for
    a renewal to be confirmed.
    """
    seconds = lease * 0.01 + 0.002 if drift is None else as_seconds(drift, "drift", allow_zero=True)
    if seconds >= lease:
        raise ConfigurationError(
            f"drift ({seconds:g} s) must be shorter than the lease ({lease:g} s); "
            "the default is 1 % of the lease plus 2 ms"
        )
    if renew_interval is not None and renew_interval + seconds >= lease:
        raise ConfigurationError(
            f"renew_interval ({renew_interval:g} s) plus the drift margin ({seconds:g} s) "
            f"must be shorter than the lease ({lease:g} s), or no renewal could be "
            "confirmed in time"
        )
    return seconds


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _waited(seconds: float) -> str:
    return f" (waited {seconds:g} s)" if seconds > 0 else ""


def _new_token() -> str:
    return os.urandom(16).hex()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@lru_cache(maxsize=64)
def _keyspace(prefix: str, service: str) -> KeySpace:
    return KeySpace(prefix, service)


def _space(key_prefix: str | None, service: str) -> KeySpace:
    return _keyspace(key_prefix or get_settings().redis_key_prefix, service)


class _LockKeys(NamedTuple):
    """The keys of one lock name (one hash tag), in the orders its scripts take them."""

    key: str
    wake: str
    fast: tuple[str, ...]  # lock_acquire_fast.lua
    fair: tuple[str, ...]  # lock_acquire.lua
    release: tuple[str, ...]  # lock_release.lua


@lru_cache(maxsize=4096)
def _lock_keys(prefix: str, name: str) -> _LockKeys:
    """Built once per name: lock objects are made per request, for the same few names."""
    key = _keyspace(prefix, "lock").tagged(name)
    fence, wake, waiting = key + ":fence", key + ":wake", key + ":waiting"
    queue, heartbeats = key + ":queue", key + ":queue-heartbeats"
    return _LockKeys(
        key,
        wake,
        (key, fence, waiting),
        (key, fence, queue, heartbeats),
        (key, wake, queue, heartbeats, key + ":released", waiting),
    )


def _block_cap(client: Any) -> float:
    """The longest BLPOP on *client* that cannot trip its ``socket_timeout``."""
    kwargs = getattr(client, "connection_kwargs", None)  # RedisCluster
    if not isinstance(kwargs, dict):
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    timeout = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
    if isinstance(timeout, (int, float)) and timeout > 0:
        return min(_MAX_STEP, timeout - max(0.05, timeout * 0.25))
    return _MAX_STEP


def _unavailable(kind: str, name: str, lease: float, exc: BaseException) -> RedisUnavailable:
    return RedisUnavailable(
        f"{kind} {name!r}: Redis is unreachable ({exc}); whether it is held is unknown until "
        f"its lease ({lease:g} s) runs out. Retry when Redis answers again."
    )


async def _guarded(
    call: Callable[[], Awaitable[T]], breaker: CircuitBreaker, kind: str, name: str, lease: float
) -> T:
    """Run one Redis call; errors become ``RedisUnavailable`` or ``LockError``."""
    try:
        with breaker:
            return await call()
    except RedisUnavailable as exc:
        raise _unavailable(kind, name, lease, exc) from exc
    except RedisError as exc:
        raise LockError(f"{kind} {name!r}: Redis refused the call: {exc}", lock_name=name) from exc


# -- tasks that must finish even if their caller is cancelled --------------------

_background: set[asyncio.Task[Any]] = set()


def _report_background(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("lock clean-up finished in the background with an error: %s", task.exception())


def _in_background(coro: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_report_background)


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await *coro*; if the caller is cancelled meanwhile, it still runs to completion."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _background.add(task)
            task.add_done_callback(_report_background)
        raise


async def _settle(coro: Coroutine[Any, Any, Any]) -> None:
    """Shielded best-effort clean-up: errors are logged, never raised."""
    try:
        await _shielded(coro)
    except Exception as exc:
        log.warning("lock clean-up failed: %s", exc)


# -- waiting for a release --------------------------------------------------------


class _Room:
    """Blocked acquirers of one wake list in this process: one leader, the rest parked."""

    __slots__ = ("leader", "parked")

    def __init__(self) -> None:
        self.leader = False
        self.parked: collections.deque[asyncio.Future[None]] = collections.deque()

    def wake_one(self) -> None:
        while self.parked:
            fut = self.parked.popleft()
            if not fut.done():
                fut.set_result(None)
                return


_rooms: weakref.WeakKeyDictionary[Any, dict[str, _Room]] = weakref.WeakKeyDictionary()
_blocked: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _notify_local(client: Any, wake_key: str) -> None:
    """Wake one waiter of *wake_key* parked in this process (a release happened here)."""
    rooms = _rooms.get(client)
    room = rooms.get(wake_key) if rooms is not None else None
    if room is not None:
        room.wake_one()


class _Contender(Protocol):
    """What ``_contend`` needs from a lock or semaphore."""

    redis: Any
    name: str
    fair: bool
    timeout: float
    _breaker: CircuitBreaker
    _wake_key: str
    _kind: str

    async def _attempt(self, token: str) -> list[int]: ...

    async def _give_up(self, token: str) -> bool: ...


class _Waiter:
    """How one blocked acquire call waits between attempts.

    Fair waiters BLPOP their own wake list (a release pushes to the queue
    head's). Otherwise one waiter per wake list and process (the leader)
    BLPOPs the shared list, and the others park on an in-memory future that a
    release in this process resolves, or that times out after a jittered,
    growing poll interval. A BLPOP never outlasts the client's socket timeout,
    and at most ``_MAX_BLOCKED_PER_CLIENT`` run per client (a fair queue head
    may exceed it); past that, waiters poll.
    """

    __slots__ = ("_block_cap", "_c", "_delay")

    def __init__(self, contender: _Contender) -> None:
        self._c = contender
        self._block_cap = _block_cap(contender.redis)
        self._delay = _POLL_FIRST

    def _take_slot(self) -> bool:
        client = self._c.redis
        used = _blocked.get(client, 0)
        if used >= _MAX_BLOCKED_PER_CLIENT:
            return False
        _blocked[client] = used + 1
        return True

    def _free_slot(self) -> None:
        client = self._c.redis
        _blocked[client] = max(0, _blocked.get(client, 1) - 1)

    async def _blpop(self, key: str, seconds: float) -> None:
        c = self._c
        await _guarded(
            lambda: c.redis.blpop([key], timeout=round(seconds, 3)),
            c._breaker,
            c._kind,
            c.name,
            c.timeout,
        )

    async def wait(self, step: float, own_key: str | None, *, head: bool = False) -> None:
        """Wait at most *step* seconds for a release.

        *own_key*: this fair waiter's own wake list (a release wakes the queue
        head through it); *head*: it is first in the queue, so it blocks even
        when the per-client cap on blocked connections is reached.
        """
        block = min(step, self._block_cap)
        if own_key is not None and block >= _MIN_BLOCK:
            slot = self._take_slot()
            if slot or head:
                try:
                    await self._blpop(own_key, block)
                finally:
                    if slot:
                        self._free_slot()
                return
        c = self._c
        rooms = _rooms.get(c.redis)
        if rooms is None:
            rooms = _rooms[c.redis] = {}
        room = rooms.get(c._wake_key)
        if room is None:
            room = rooms[c._wake_key] = _Room()
        try:
            if own_key is None and not room.leader and block >= _MIN_BLOCK and self._take_slot():
                room.leader = True
                try:
                    await self._blpop(c._wake_key, block)
                finally:
                    room.leader = False
                    self._free_slot()
                return
            await self._park(room, min(step, random.uniform(0.5, 1.0) * self._delay))
            self._delay = min(self._delay * 2, _POLL_MAX)
        finally:
            if not room.leader and not room.parked and rooms.get(c._wake_key) is room:
                del rooms[c._wake_key]

    @staticmethod
    async def _park(room: _Room, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        room.parked.append(fut)
        used = False
        try:
            async with asyncio.timeout(seconds):
                await fut
            used = True
        except TimeoutError:
            pass
        finally:
            if fut.done() and not fut.cancelled() and not used:
                room.wake_one()  # a wake-up this waiter can no longer use goes to the next
            fut.cancel()
            with contextlib.suppress(ValueError):
                room.parked.remove(fut)


async def _contend(c: _Contender, deadline: float) -> tuple[str | None, list[int], float]:
    """Attempt, then wait for releases until *deadline* (loop time).

    Returns ``(token, reply, sent_at)``: the token is None when the wait ran
    out. Cancellation (or an error) after an attempt may have reached Redis
    runs the compare-and-delete for this call's token, so no key is orphaned.
    """
    loop = asyncio.get_running_loop()
    token = _new_token()
    waiter: _Waiter | None = None
    try:
        while True:
            sent = loop.time()
            reply = await c._attempt(token)
            if reply[0] == 1:
                return token, reply, sent
            remaining = deadline - loop.time()
            if remaining <= 0:
                if c.fair:
                    await _settle(c._give_up(token))  # leave the FIFO queue now
                return None, reply, sent
            if waiter is None:
                waiter = _Waiter(c)
            hint = reply[1] / 1000
            own = f"{c._wake_key}:{token}" if c.fair else None
            step = min(remaining, hint + 0.002) if hint > 0 else remaining
            await waiter.wait(step, own, head=c.fair and reply[2] == 1)
    except asyncio.CancelledError:
        await _settle(c._give_up(token))
        raise
    except BaseException:
        _in_background(c._give_up(token))
        raise


async def _take_gate(gate: asyncio.Lock, wait: float) -> bool:
    """The in-process side of "one object, one owner" (asyncio.Lock semantics)."""
    if not gate.locked():
        await gate.acquire()  # free: returns without suspending
        return True
    if wait <= 0:
        return False
    try:
        async with asyncio.timeout(wait):
            await gate.acquire()
    except TimeoutError:
        return False
    return True


# -- one held lease: ownership, watchdog, loss ----------------------------------------


class _Lease:
    """A held lease (a lock, a permit): token, renewal watchdog, loss detection.

    Subclasses supply ``_remote_extend`` and ``_remote_release``.
    """

    _kind = "lock"

    def __init__(
        self,
        name: str,
        timeout: Seconds,
        *,
        auto_renew: bool,
        renew_interval: Seconds | None,
        on_lost: LostCallback | None,
        drift: Seconds | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"a {self._kind} name must be a non-empty string, got {name!r}"
            )
        self.name = name
        self.timeout = as_seconds(timeout, "timeout (the lease)")
        self.auto_renew = auto_renew
        self.renew_interval = (
            self.timeout / 3
            if renew_interval is None
            else as_seconds(renew_interval, "renew_interval")
        )
        if self.renew_interval >= self.timeout:
            raise ConfigurationError(
                f"renew_interval ({self.renew_interval:g} s) must be shorter than the lease "
                f"({self.timeout:g} s); the default is timeout/3"
            )
        self.drift = lease_drift(
            self.timeout, drift, renew_interval=self.renew_interval if auto_renew else None
        )
        """The drift margin: a held lease counts as ended this long before it can end in Redis."""
        self.on_lost = on_lost
        self._lease_ms = _ms(self.timeout)
        self._token: str | None = None
        # Loop time at which the lease may end in Redis at the earliest: when the
        # acquire/extend that set it was sent, plus its length.
        self._valid_until = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._lost: LockLost | None = None
        self._body: asyncio.Task[Any] | None = None
        self._body_token: str | None = None
        self._body_cancelling = 0
        self._cancelled_body = False
        self._exiting = False

    # subclass hooks
    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        raise NotImplementedError

    async def _remote_release(self, token: str) -> bool:
        raise NotImplementedError

    def _after_release(self) -> None:
        """Local bookkeeping once a hold ends (runs even if the caller is cancelled)."""

    @property
    def token(self) -> str | None:
        """The owner token of the current hold (None when not held)."""
        return self._token

    @property
    def lost(self) -> LockLost | None:
        """The error the watchdog recorded if the current (or last) hold was lost."""
        return self._lost

    @property
    def deadline(self) -> float | None:
        """Loop time (``loop.time()``) at which this holder stops counting on the lease.

        The lease's end as this process can know it without asking Redis: the
        time the acquire (or last confirmed renewal/extend) was *sent* plus its
        length, minus the drift margin. None when not held. With
        ``auto_renew=True`` the block is cancelled at this time unless a renewal
        was confirmed before it.
        """
        if self._token is None:
            return None
        return self._valid_until - self.drift

    def _hold(self, token: str, valid_until: float) -> None:
        self._token = token
        self._valid_until = valid_until
        self._lost = None
        if self.auto_renew:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(token), name=f"{self._kind}-watchdog:{self.name}"
            )
            self._arm_deadline(token)

    def _arm_deadline(self, token: str) -> None:
        """(Re)start the timer that ends the hold at ``deadline`` (auto-renew only)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer = asyncio.get_running_loop().call_at(
            self._valid_until - self.drift, self._deadline_passed, token
        )

    def _deadline_passed(self, token: str) -> None:
        # A loop timer, not the watchdog task: the watchdog may be stuck in a renewal
        # call that only a socket timeout (times the client's retries) would end.
        self._deadline_timer = None
        if self._token != token or self._lost is not None:
            return
        self._declare_lost(
            f"no renewal was confirmed before its lease ended ({self.timeout:g} s lease, "
            f"counted from when the last acquire/renewal was sent, minus a {self.drift:g} s "
            "drift margin): Redis is slow or unreachable",
            None,
        )
        watchdog = self._watchdog
        if watchdog is not None and not watchdog.done():
            watchdog.cancel()

    def _stop_watchdog(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        timer, self._deadline_timer = self._deadline_timer, None
        if timer is not None:
            timer.cancel()

    async def _watch(self, token: str) -> None:
        loop = asyncio.get_running_loop()
        retry = max(0.01, self.renew_interval / 4)
        next_at = loop.time() + self.renew_interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if self._token != token or self._lost is not None:
                return
            deadline = self._valid_until - self.drift
            sent = loop.time()
            try:
                # Bounded by the lease: a renewal answered later is of no use.
                async with asyncio.timeout_at(deadline):
                    left = await self._remote_extend(token, self._lease_ms, True)
            except Exception as exc:
                if self._token != token or self._lost is not None:
                    return
                if loop.time() + retry >= deadline:
                    reason = (
                        "no renewal was confirmed before its lease ended"
                        if isinstance(exc, TimeoutError)
                        else f"the renewal failed until the lease ran out ({exc})"
                    )
                    self._declare_lost(reason, exc)
                    return
                log.warning("%s %r: renewal failed, retrying: %s", self._kind, self.name, exc)
                next_at = loop.time() + retry
                continue
            if self._token != token or self._lost is not None:
                return
            if left < 0:
                self._declare_lost("its key expired or another owner took it", None)
                return
            self._valid_until = sent + left / 1000
            self._arm_deadline(token)
            next_at = sent + self.renew_interval

    @traced("lock.lost", attrs=from_self(_LOCK_ATTRS), result=lambda _: "lost")
    def _declare_lost(self, reason: str, cause: BaseException | None) -> None:
        if self._lost is not None:
            return  # the deadline timer and the watchdog may both find it
        body = self._body
        cancel = body is not None and not self._exiting and not body.done()
        err = LockLost(
            f"{self._kind} {self.name!r} was lost while held: {reason}"
            + ("; the block under it was cancelled" if cancel else "")
            + ". Another owner may have run concurrently: use fencing tokens to protect "
            "the resource, or a longer timeout.",
            lock_name=self.name,
        )
        err.__cause__ = cause
        self._lost = err
        if cancel and body is not None:
            self._cancelled_body = True
            body.cancel(f"{self._kind} {self.name!r} lost")
        if self.on_lost is not None:
            try:
                result = self.on_lost(err)
                if inspect.isawaitable(result):
                    _in_background(_await(result))
            except Exception:
                log.exception("%s %r: on_lost callback failed", self._kind, self.name)

    async def extend(self, additional_time: Seconds, *, replace: bool = False) -> float:
        """Lengthen the lease by *additional_time*, or set it to that with ``replace=True``.

        One compare-and-extend script: only a lease still held with this
        owner's token is touched. Returns the new remaining lease in seconds.
        Raises ``LockNotOwned`` when the lease already expired or another owner
        holds it, ``RedisUnavailable`` when Redis is down. Cancelling it leaves
        the lease either extended or not, never shortened.
        """
        token = self._token
        if token is None:
            raise LockNotOwned(
                f"{self._kind} {self.name!r} is not held by this owner; acquire it before extend()",
                lock_name=self.name,
            )
        seconds = as_seconds(additional_time, "additional_time")
        sent = asyncio.get_running_loop().time()
        left = await self._remote_extend(token, _ms(seconds), replace)
        if left < 0:
            raise LockNotOwned(
                f"{self._kind} {self.name!r} expired or was taken by another owner before "
                f"extend(); acquire it again (and consider auto_renew=True)",
                lock_name=self.name,
            )
        if self._token == token and self._lost is None:
            self._valid_until = sent + left / 1000
            if self._deadline_timer is not None:
                self._arm_deadline(token)
        return left / 1000

    @traced("lock.release", attrs=from_self(_LOCK_ATTRS), result=lambda ok: _RELEASED[ok])
    async def _release_hold(self) -> bool:
        """End the current hold: compare-and-delete, completed even if the caller is cancelled."""
        token = self._token
        if token is None:
            raise LockNotOwned(
                f"{self._kind} {self.name!r} is not held by this owner (never acquired or "
                "already released)",
                lock_name=self.name,
            )
        self._token = None
        self._stop_watchdog()
        try:
            # Shielded: a cancellation of the caller is delivered at once (never lost
            # inside the client), while the release itself runs to completion.
            return await _shielded(self._remote_release(token))
        finally:
            self._after_release()

    def _release_in_background(self) -> None:
        """End a hold known to be lost: compare-and-delete without waiting for it."""
        token = self._token
        if token is None:
            return
        self._token = None
        self._stop_watchdog()
        try:
            _in_background(self._remote_release(token))
        finally:
            self._after_release()

    async def _release_lost_hold(self) -> None:
        """End a hold known to be lost, waiting for it no later than the deadline.

        The compare-and-delete is awaited only until ``deadline`` (a loss that
        the deadline itself declared does not wait); past that it finishes in the
        background, so a slow or stalled link cannot hold up ``LockLost``.
        """
        token = self._token
        if token is None:
            return
        self._token = None
        self._stop_watchdog()
        try:
            task = asyncio.ensure_future(self._remote_release(token))
            _background.add(task)
            task.add_done_callback(_report_background)
            left = self._valid_until - self.drift - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.wait({task}, timeout=left)
        finally:
            self._after_release()

    def _not_owned_on_release(self) -> LockNotOwned:
        return LockNotOwned(
            f"{self._kind} {self.name!r} expired or was taken by another owner before release() "
            f"(lease {self.timeout:g} s): the work under it may have overlapped with another "
            "owner's. Use auto_renew=True or a longer timeout, and fencing tokens.",
            lock_name=self.name,
        )

    def _arm_body(self) -> None:
        """Make the current task the guarded block (``__aenter__``).

        Raises ``LockLost`` instead, without entering, when the watchdog's
        deadline already passed: the acquire was confirmed too late to be of use.
        """
        token = self._token
        late = asyncio.get_running_loop().time() >= self._valid_until - self.drift
        if token is not None and self._deadline_timer is not None and late:
            self._deadline_passed(token)  # the timer would fire only at the block's first await
        if token is not None and self._lost is not None:
            lost = self._lost
            self._release_in_background()
            raise lost
        task = asyncio.current_task()
        self._body = task
        self._body_token = self._token
        self._body_cancelling = task.cancelling() if task is not None else 0
        self._cancelled_body = False

    def _lost_at_exit(self) -> LockLost:
        return LockLost(
            f"{self._kind} {self.name!r} expired or was taken by another owner before the block "
            f"finished (lease {self.timeout:g} s): the block may have overlapped with another "
            "owner's. Use auto_renew=True or a longer timeout, and fencing tokens.",
            lock_name=self.name,
        )

    async def _exit_body(
        self, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None:
        """``__aexit__``: release, and raise ``LockLost`` if exclusivity was not kept."""
        body, body_token, cancelled_by_us = self._body, self._body_token, self._cancelled_body
        self._body, self._body_token, self._cancelled_body = None, None, False
        self._stop_watchdog()
        ours = False  # the exception in flight is the cancellation the watchdog sent
        if cancelled_by_us and body is not None:
            ours = (
                body.uncancel() <= self._body_cancelling
                and exc_type is not None
                and issubclass(exc_type, asyncio.CancelledError)
            )
        # An outside cancellation or a KeyboardInterrupt is never replaced by our errors.
        keep_theirs = exc_type is not None and not issubclass(exc_type, Exception) and not ours
        self._exiting = True
        try:
            if self._token is not None and self._token == body_token:
                if self._lost is None:
                    released = await self._release_hold()
                else:
                    await self._release_lost_hold()
                    released = False
            else:
                released = True  # released by hand inside the block
        except (LockError, RedisUnavailable) as err:
            if keep_theirs:
                log.warning("%s %r: release failed while unwinding: %s", self._kind, self.name, err)
                return None
            if self._lost is not None:
                raise self._lost from err
            raise
        finally:
            self._exiting = False
        if keep_theirs:
            return None
        lost = self._lost
        if ours and lost is not None:
            if lost.__cause__ is None:
                raise lost from exc
            raise lost
        if lost is not None or not released:
            raise lost or self._lost_at_exit()
        return None


async def _await(awaitable: Awaitable[Any]) -> None:
    await awaitable


# -- RedisLock ---------------------------------------------------------------------------


class RedisLock(_Lease):
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
        key_prefix: default ``settings.redis_key_prefix``.
        drift: the drift margin (seconds or ``timedelta``): the holder gives the
            lease up this long before it can end in Redis. Default: 1 % of the
            lease plus 2 ms.

    Keys (one hash tag per name): ``<prefix>:lock:{name}`` (owner token, PX
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
        key_prefix: str | None = None,
        drift: Seconds | None = None,
    ) -> None:
        super().__init__(
            name,
            timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            drift=drift,
        )
        self.redis = redis
        self.blocking_timeout = (
            self.timeout
            if blocking_timeout is None
            else as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)
        )
        self.fair = fair
        keys = _lock_keys(key_prefix or get_settings().redis_key_prefix, name)
        self.key = keys.key
        self._wake_key = keys.wake
        fence_ms = max(_ms(as_seconds(fence_ttl, "fence_ttl")), self._lease_ms)
        # Non-fair acquirers take the fast script (SET NX PX and the fence; a failed attempt
        # sets the waiter flag); fair ones queue. A release skips the queue and the wake list
        # unless the waiter flag or the queue exists.
        self._acquire_script = _ACQUIRE if fair else _ACQUIRE_FAST
        self._acquire_keys = keys.fair if fair else keys.fast
        self._acquire_args: tuple[ScriptArg, ...] = (
            ("1", _WAITER_TTL_MS) if fair else (_WAITER_TTL_MS,)
        )
        self._acquire_head = (self._lease_ms, fence_ms)
        self._release_keys = keys.release
        self._breaker = breaker_for(redis)
        self._gate = asyncio.Lock()
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

    async def _eval(
        self, script: Script, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]
    ) -> Any:
        return await _guarded(
            lambda: script(self.redis, keys, args), self._breaker, "lock", self.name, self.timeout
        )

    async def _attempt(self, token: str) -> list[int]:
        reply: list[int] = await self._eval(
            self._acquire_script,
            self._acquire_keys,
            (token, *self._acquire_head, *self._acquire_args),
        )
        return reply

    async def _give_up(self, token: str) -> bool:
        return await self._remote_release(token)

    async def _remote_release(self, token: str) -> bool:
        released = await self._eval(
            _RELEASE, self._release_keys, (token, _WAKE_TTL_MS, _RECEIPT_TTL_MS)
        )
        if released:
            _notify_local(self.redis, self._wake_key)
        return bool(released)

    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        return int(await self._eval(_EXTEND, (self.key,), (token, ms, "1" if replace else "0")))

    def _after_release(self) -> None:
        if self._gate.locked():
            self._gate.release()

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

    @traced("lock.acquire", attrs=from_self(_LOCK_ATTRS), result=lambda r: _TAKEN[r[0]])
    async def _acquire(self, wait: float) -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if not await _take_gate(self._gate, wait):
            return False, max(0.0, self._valid_until - loop.time())
        try:
            token, reply, sent = await _contend(self, deadline)
        except BaseException:
            self._gate.release()
            raise
        if token is None:
            self._gate.release()
            return False, reply[1] / 1000
        self._fence = int(reply[1])
        self._hold(token, sent + self.timeout)
        return True, 0.0

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
        exists = await _guarded(
            lambda: self.redis.exists(self.key), self._breaker, "lock", self.name, self.timeout
        )
        return bool(exists)

    async def owned(self) -> bool:
        """Does this object hold the lock right now? (one ``GET``, compared with its token)."""
        token = self._token
        if token is None:
            return False
        value = await _guarded(
            lambda: self.redis.get(self.key), self._breaker, "lock", self.name, self.timeout
        )
        return _text(value) == token

    async def __aenter__(self) -> RedisLock:
        """Wait up to ``blocking_timeout``; raise ``LockNotAcquired`` (with ``retry_after``) if still held."""
        taken, hint = await self._acquire(self.blocking_timeout)
        if not taken:
            raise LockNotAcquired(
                f"lock {self.name!r} is held by another owner{_waited(self.blocking_timeout)}. "
                f"Retry after {hint:.1f} s, or raise blocking_timeout.",
                lock_name=self.name,
                retry_after=max(hint, 0.001),
            )
        self._arm_body()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release; raise ``LockLost`` if the lock expired or was taken during the block."""
        await self._exit_body(exc_type, exc)


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
    """
    ms = 0 if ttl is None else _ms(as_seconds(ttl, "ttl"))
    try:
        with breaker_for(redis):
            written = await _FENCED_WRITE(redis, (key,), (int(fence), value, ms))
    except RedisUnavailable as exc:
        raise RedisUnavailable(f"fenced write to {key!r}: Redis is unreachable ({exc})") from exc
    except RedisError as exc:
        raise LockError(f"fenced write to {key!r} failed: {exc}", lock_name=key) from exc
    return bool(written)
