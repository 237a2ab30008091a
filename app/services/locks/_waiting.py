"""Waiting for a release: wake lists, in-process parking, back-off polling.

``contend`` is the acquire loop shared by ``RedisLock`` and ``Semaphore``:
attempt, then wait (woken by releases) until the deadline, and never leave a
key behind when cancelled. ``OnOneRedis`` is how both run their scripts, and a
release wakes this process's waiters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import Sequence
from typing import Any, Final, Protocol

from app.core.clock import Clock
from app.core.guard import Guard, PerClient, block_cap
from app.core.redis import AnyRedis
from app.core.scripts import Script, ScriptArg
from app.services.locks._common import new_token
from app.services.locks._tasks import in_background, settle

__all__ = ["Contender", "OnOneRedis", "contend", "notify_local"]

_MAX_STEP: Final = 1.0  # longest single wait before a waiter re-checks the lock
_MIN_BLOCK: Final = 0.02  # shorter waits poll instead of BLPOP
_POLL_FIRST: Final = 0.1  # wake-ups do the work; polling is the safety net
_POLL_MAX: Final = 0.5
_MAX_BLOCKED_PER_CLIENT: Final = 16  # BLPOPs in flight per client (each holds a connection)


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


class _Waits:
    """The waiting state of one client in this process: rooms by wake list, BLPOPs in flight."""

    __slots__ = ("block_cap", "blocked", "rooms")

    def __init__(self, client: object) -> None:
        self.rooms: dict[str, _Room] = {}
        self.blocked = 0
        self.block_cap = block_cap(client, _MAX_STEP)
        """The longest BLPOP on the client that returns before its ``socket_timeout``."""


_waits: PerClient[_Waits] = PerClient(_Waits)


def notify_local(client: Any, wake_key: str) -> None:
    """Wake one waiter of *wake_key* parked in this process (a release happened here)."""
    room = _waits(client).rooms.get(wake_key)
    if room is not None:
        room.wake_one()


class OnOneRedis:
    """The script calls of a lock or semaphore on one Redis (``RedisLock``, ``Semaphore``).

    Every script runs behind the object's guard; a release that freed something
    also wakes one waiter parked in this process, without a round trip.
    """

    redis: AnyRedis
    key: str
    _guard: Guard
    _wake_key: str

    async def _eval(
        self, script: Script, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]
    ) -> Any:
        with self._guard:
            return await script(self.redis, keys, args)

    async def _release_waking(
        self, script: Script, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]
    ) -> bool:
        """Run a release *script*; True (and one local waiter woken) if it released."""
        with self._guard:  # not through _eval: one coroutine less on every release
            released = await script(self.redis, keys, args)
        if released:
            notify_local(self.redis, self._wake_key)
        return bool(released)

    async def _extend_with(self, script: Script, token: str, ms: int, replace: bool) -> int:
        """Run an extend *script* on ``key``: the lease left in ms, or < 0 if not held."""
        return int(await self._eval(script, (self.key,), (token, ms, "1" if replace else "0")))


class Contender(Protocol):
    """What ``contend`` needs from a lock or semaphore."""

    redis: Any
    name: str
    fair: bool
    timeout: float
    clock: Clock
    _guard: Guard
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

    __slots__ = ("_c", "_delay", "_waits")

    def __init__(self, contender: Contender) -> None:
        self._c = contender
        self._waits = _waits(contender.redis)
        self._delay = _POLL_FIRST

    def _take_slot(self) -> bool:
        waits = self._waits
        if waits.blocked >= _MAX_BLOCKED_PER_CLIENT:
            return False
        waits.blocked += 1
        return True

    def _free_slot(self) -> None:
        waits = self._waits
        waits.blocked = max(0, waits.blocked - 1)

    async def _blpop(self, key: str, seconds: float) -> None:
        c = self._c
        with c._guard:
            await c.redis.blpop([key], timeout=round(seconds, 3))

    async def wait(self, step: float, own_key: str | None, *, head: bool = False) -> None:
        """Wait at most *step* seconds for a release.

        *own_key*: this fair waiter's own wake list (a release wakes the queue
        head through it); *head*: it is first in the queue, so it blocks even
        when the per-client cap on blocked connections is reached.
        """
        block = min(step, self._waits.block_cap)
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
        rooms = self._waits.rooms
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


async def contend(c: Contender, deadline: float) -> tuple[str | None, list[int], float]:
    """Attempt, then wait for releases until *deadline* (loop time).

    Returns ``(token, reply, sent_at)``: the token is None when the wait ran
    out; ``sent_at`` (when the winning attempt was sent) is on the contender's
    ``clock``, the time its lease is tracked on. Cancellation (or an error) after an attempt may have reached Redis
    runs the compare-and-delete for this call's token, so no key is orphaned.
    """
    loop = asyncio.get_running_loop()
    token = new_token()
    waiter: _Waiter | None = None
    try:
        while True:
            sent = c.clock.now()
            reply = await c._attempt(token)
            if reply[0] == 1:
                return token, reply, sent
            remaining = deadline - loop.time()
            if remaining <= 0:
                if c.fair:
                    await settle(c._give_up(token))  # leave the FIFO queue now
                return None, reply, sent
            if waiter is None:
                waiter = _Waiter(c)
            hint = reply[1] / 1000
            own = f"{c._wake_key}:{token}" if c.fair else None
            step = min(remaining, hint + 0.002) if hint > 0 else remaining
            await waiter.wait(step, own, head=c.fair and reply[2] == 1)
    except asyncio.CancelledError:
        await settle(c._give_up(token))
        raise
    except BaseException:
        in_background(c._give_up(token))
        raise
