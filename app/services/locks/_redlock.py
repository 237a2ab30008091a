"""Redlock: one lock over several independent Redis masters (quorum of N).

``Redlock``'s docstring states the algorithm, its timing assumptions and why it has
no fencing tokens.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.core.clock import Clock
from app.core.errors import ConfigurationError, LockNotAcquired, RedisUnavailable
from app.core.guard import as_seconds, as_text
from app.core.keys import KeySpace, deprecated_prefix
from app.core.redis import AnyRedis
from app.services.locks._common import (
    WAKE_TTL_MS,
    LostCallback,
    Seconds,
    blocking_bound,
    lease_guard,
    log,
    new_token,
    wait_bound,
    waited,
)
from app.services.locks._lease import Lease
from app.services.locks._scripts import LOCK_EXTEND, LOCK_RELEASE
from app.services.locks._tasks import settle

__all__ = ["Redlock"]

_Outcome = Any  # a node's reply, or the exception it raised


class Redlock(Lease):
    """A lock held on a majority of independent Redis masters.

    ::

        lock = Redlock([r1, r2, r3], "billing:run", timeout=10)
        async with lock:                       # needs 2 of 3 within the validity time
            ...

    Algorithm (the Redis documentation's "Redlock"): with a fresh random token,
    ``SET key token NX PX ttl`` on every master at once, each call bounded by
    ``node_timeout`` so a dead master costs milliseconds. The lock is held if a
    majority (``N//2 + 1``) said yes and the time left, ``validity = ttl - elapsed
    - drift`` with ``drift = ttl * drift_factor + 2 ms``, is positive. Otherwise
    the keys are deleted on every master (also those whose reply was lost) and
    the attempt is retried after a random delay until ``blocking_timeout``.
    Release and extend are the same compare-and-act scripts as ``RedisLock``, sent
    to every master; an extension counts only if a majority confirms it.

    Timing assumptions, stated plainly. Redlock is safe only if (1) the holder
    finishes before its validity runs out, i.e. no process pause (GC, swap, a
    blocked event loop) or network delay eats the margin, (2) the masters'
    clocks advance at about the same rate (``drift_factor`` bounds the
    difference; a clock jump on one master shortens its lease), and (3) a
    master that restarts either persists every write (``appendfsync always``)
    or stays down for longer than the longest lease, otherwise it forgets the
    key and a second majority can form. None of these is checked.

    Fencing: Redlock cannot issue safe fencing tokens, because no single counter
    sees every acquisition (the largest of N per-node counters does not grow
    monotonically across majorities). If correctness, not just efficiency,
    depends on mutual exclusion, protect the resource with a fencing token from
    one linearizable source: ``RedisLock.fence`` on a single Redis, or a
    database sequence checked by the resource (``UPDATE ... WHERE fence <=
    :fence``), or use a consensus system (etcd, ZooKeeper).

    When fewer than a quorum of masters answer, ``acquire`` raises
    ``RedisUnavailable`` (a busy lock returns False: the two are never confused).

    Args:
        clients: one client per master (3 or 5 independent servers; not
            replicas of each other, not a Cluster).
        name: what is locked (escaped into the key ``<prefix>:lock:{name}`` on
            every master, the same key ``RedisLock`` uses).
        timeout: the lease in seconds (or ``timedelta``); required.
        blocking_timeout: how long blocking acquires and ``async with`` wait
            (default: the lease).
        auto_renew, renew_interval, on_lost: the watchdog, as for ``RedisLock``
            (a renewal must reach a majority). The block is cancelled with
            ``LockLost`` when the validity time runs out (``deadline``) without
            a renewal confirmed by a majority, whatever the masters are doing.
        drift_factor: clock-drift allowance as a fraction of the lease; the
            drift margin (``drift``) is ``timeout * drift_factor + 2 ms``.
        node_timeout: bound on each master's reply (default: 1/20 of the
            lease, between 50 and 250 ms).
        retry_delay: upper bound of the random pause between attempts.
        namespace: the key space (``<REDIS_KEY_PREFIX>:<namespace>:{name}`` on
            every node, default ``lock``).
        key_prefix: deprecated (``DeprecationWarning``): overrides the root prefix
            instead. Use ``namespace=``.
        clock: the clock the validity time is measured and the lease tracked
            on locally, as for ``RedisLock`` (default ``LOOP_CLOCK``, the event
            loop's time); the pauses between acquire rounds stay on real time.
    """

    def __init__(
        self,
        clients: Sequence[AnyRedis],
        name: str,
        timeout: Seconds,
        *,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: LostCallback | None = None,
        drift_factor: float = 0.01,
        node_timeout: Seconds | None = None,
        retry_delay: Seconds = 0.2,
        namespace: str = "lock",
        clock: Clock | None = None,
        key_prefix: str | None = None,
    ) -> None:
        if not 0 <= drift_factor < 0.5:
            raise ConfigurationError(f"drift_factor must be in [0, 0.5), got {drift_factor!r}")
        lease = as_seconds(timeout, "timeout (the lease)")
        super().__init__(
            name,
            timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            drift=lease * drift_factor + 0.002,
            clock=clock,
        )
        self.clients = list(clients)
        if not self.clients:
            raise ConfigurationError("Redlock needs at least one client (3 or 5 masters)")
        self.quorum = len(self.clients) // 2 + 1
        self.drift_factor = drift_factor
        self.blocking_timeout = blocking_bound(blocking_timeout, self.timeout)
        self.node_timeout = (
            min(0.25, max(0.05, self.timeout / 20))
            if node_timeout is None
            else as_seconds(node_timeout, "node_timeout")
        )
        self.retry_delay = as_seconds(retry_delay, "retry_delay")
        space = KeySpace.of(namespace, deprecated_prefix(key_prefix, "Redlock"))
        self.key = key = space.tagged(name)
        self._release_keys = (key, key + ":wake", key + ":queue", key + ":queue-heartbeats")
        self._guards = [lease_guard(c, "Redlock", name, self.timeout) for c in self.clients]
        self.validity: float = 0.0
        """Seconds the lock was valid for when acquired (or last extended)."""

    def __repr__(self) -> str:
        state = "held" if self._token else "free"
        return f"Redlock({self.name!r}, nodes={len(self.clients)}, quorum={self.quorum}, {state})"

    async def _on_all(self, call: Callable[[Any], Awaitable[Any]]) -> list[_Outcome]:
        """*call* on every master at once, each bounded by ``node_timeout``.

        Each outcome is the reply or the master's error: ``RedisUnavailable``,
        ``LockError`` (a refused command) or ``TimeoutError`` (``node_timeout``).
        """

        async def one(index: int) -> Any:
            # node_timeout is outside the guard: it is this lock's own budget, not a sign
            # that the client is down, so it must not open the breaker the client's other
            # users share (the guard sees a cancellation, which counts as neither).
            async with asyncio.timeout(self.node_timeout):
                with self._guards[index]:
                    return await call(self.clients[index])

        return await asyncio.gather(
            *(one(i) for i in range(len(self.clients))), return_exceptions=True
        )

    def _unreachable(self, outcomes: list[_Outcome], what: str) -> RedisUnavailable:
        answered = sum(not isinstance(o, BaseException) for o in outcomes)
        errors = {type(o).__name__ for o in outcomes if isinstance(o, BaseException)}
        return RedisUnavailable(
            f"Redlock {self.name!r}: only {answered} of {len(self.clients)} masters answered "
            f"the {what} ({', '.join(sorted(errors))}); a quorum of {self.quorum} is needed. "
            "Retry when the masters are back."
        )

    async def _release_all(self, token: str) -> list[_Outcome]:
        return await self._on_all(
            lambda c: LOCK_RELEASE(c, self._release_keys, (token, WAKE_TTL_MS))
        )

    async def _remote_release(self, token: str) -> bool:
        outcomes = await self._release_all(token)
        released = sum(o == 1 for o in outcomes if not isinstance(o, BaseException))
        if released >= self.quorum:
            return True
        not_ours = sum(o == 0 for o in outcomes if not isinstance(o, BaseException))
        if not_ours > len(self.clients) - self.quorum:
            return False
        raise self._unreachable(outcomes, "release")

    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        clock = self.clock
        start = clock.now()
        outcomes = await self._on_all(
            lambda c: LOCK_EXTEND(c, (self.key,), (token, ms, "1" if replace else "0"))
        )
        answered = [int(o) for o in outcomes if not isinstance(o, BaseException)]
        extended = sorted((o for o in answered if o >= 0), reverse=True)
        if len(extended) < self.quorum:
            if len(answered) < self.quorum:
                raise self._unreachable(outcomes, "extension")
            return -1
        agreed = extended[self.quorum - 1]  # the lease a quorum holds, from when it was sent
        # what is left of it once this round trip and clock drift are taken off
        validity = agreed / 1000 - (clock.now() - start) - self.drift
        if validity <= 0:
            return -1
        self.validity = validity
        return agreed

    async def acquire(
        self, blocking: bool = False, blocking_timeout: Seconds | None = None
    ) -> bool:
        """Take the lock on a majority of masters; True if taken.

        One round of ``SET NX PX`` to every master in parallel (non-blocking,
        the default), or rounds separated by random pauses until
        *blocking_timeout*. A failed round deletes what it set. Raises
        ``RedisUnavailable`` when fewer than a quorum of masters answer (a
        busy lock returns False). Cancelling it deletes whatever it set.
        """
        taken, _ = await self._acquire(
            wait_bound(blocking, blocking_timeout, self.blocking_timeout)
        )
        return taken

    async def _take(self, deadline: float) -> float | None:
        loop = asyncio.get_running_loop()
        while True:
            token = await self._round()
            if isinstance(token, str):
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                if token is not None:
                    raise token
                return self.retry_delay
            await asyncio.sleep(min(remaining, random.uniform(0.5, 1.0) * self.retry_delay))

    async def _round(self) -> str | RedisUnavailable | None:
        """One attempt: the token if held, else the reason (None: busy)."""
        clock = self.clock
        token = new_token()
        ms = self._lease_ms
        start = clock.now()
        try:
            outcomes = await self._on_all(lambda c: c.set(self.key, token, nx=True, px=ms))
        except asyncio.CancelledError:
            await settle(self._release_all(token))
            raise
        elapsed = clock.now() - start
        granted = sum(o is True for o in outcomes)
        validity = self.timeout - elapsed - self.drift
        if granted >= self.quorum and validity > 0:
            self.validity = validity
            # deadline = start + timeout - drift = now + validity
            self._hold(token, start + self.timeout)
            return token
        await settle(self._release_all(token))  # undo a minority (or a late majority)
        answered = sum(not isinstance(o, BaseException) for o in outcomes)
        if answered < self.quorum:
            return self._unreachable(outcomes, "acquire")
        for o in outcomes:
            if isinstance(o, BaseException) and not isinstance(o, (RedisUnavailable, TimeoutError)):
                log.warning("Redlock %r: a master failed: %r", self.name, o)
        return None

    async def release(self) -> None:
        """Delete the lock on every master (compare-and-delete with this owner's token).

        Raises ``LockNotOwned`` when a majority no longer had it (it expired or
        was taken), ``RedisUnavailable`` when too few masters answered to tell
        (the keys expire after the lease). Completes even if cancelled.
        """
        if not await self._release_hold():
            raise self._not_owned_on_release()

    async def locked(self) -> bool:
        """Does a majority of masters hold the key (for any owner)?"""
        outcomes = await self._on_all(lambda c: c.exists(self.key))
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        if len(answered) < self.quorum:
            raise self._unreachable(outcomes, "check")
        return sum(bool(o) for o in answered) >= self.quorum

    async def owned(self) -> bool:
        """Does a majority of masters still hold the key with this owner's token?"""
        token = self._token
        if token is None:
            return False
        outcomes = await self._on_all(lambda c: c.get(self.key))
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        if len(answered) < self.quorum:
            raise self._unreachable(outcomes, "check")
        return sum(1 for o in answered if as_text(o) == token) >= self.quorum

    async def __aenter__(self) -> Redlock:
        """Wait up to ``blocking_timeout``; raise ``LockNotAcquired`` if still held elsewhere."""
        taken, hint = await self._acquire(self.blocking_timeout)
        if not taken:
            raise LockNotAcquired(
                f"Redlock {self.name!r} is held by another owner{waited(self.blocking_timeout)}. "
                "Retry later, or raise blocking_timeout.",
                lock_name=self.name,
                retry_after=max(hint, 0.001),
            )
        self._arm_body()
        return self
