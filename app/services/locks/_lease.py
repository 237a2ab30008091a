"""One held lease (a lock, a permit): ownership token, renewal watchdog, loss detection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

from app.core.clock import LOOP_CLOCK, Clock, Timer
from app.core.errors import ConfigurationError, LockError, LockLost, LockNotOwned, RedisUnavailable
from app.core.guard import as_seconds, to_ms
from app.core.telemetry import from_self, traced
from app.services.locks._common import (
    LOCK_ATTRS,
    TAKEN,
    LostCallback,
    Seconds,
    lease_timing,
    log,
)
from app.services.locks._tasks import in_background

__all__ = ["Lease"]

_RELEASED = {True: "released", False: "not_owned"}

_E = TypeVar("_E", bound=LockError)


async def _await(awaitable: Awaitable[Any]) -> None:
    await awaitable


# At DESIGN.md's ~400 lines, on purpose: Lease is the one place every lock kind (lock,
# permit, Redlock) gets its acquire skeleton, watchdog, loss detection and release, so
# each is written once; splitting the watchdog out would hand it half of Lease's state.
class Lease:
    """A held lease (a lock, a permit): token, renewal watchdog, loss detection.

    Subclasses supply ``_remote_extend`` and ``_remote_release``. Every local
    reading of the lease (when it was sent, ``deadline``, the watchdog's waits and
    timers) is on ``clock`` (default ``LOOP_CLOCK``, the event loop's time).
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
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"a {self._kind} name must be a non-empty string, got {name!r}"
            )
        self.name = name
        self.auto_renew = auto_renew
        self.timeout, self.renew_interval, self.drift = lease_timing(
            timeout, renew_interval, drift, auto_renew=auto_renew
        )
        """The drift margin: a held lease counts as ended this long before it can end in Redis."""
        self.on_lost = on_lost
        self.clock: Clock = LOOP_CLOCK if clock is None else clock
        """The clock the lease is tracked on locally (``deadline``, the watchdog)."""
        self._lease_ms = to_ms(self.timeout)
        self._token: str | None = None
        # Clock time at which the lease may end in Redis at the earliest: when the
        # acquire/extend that set it was sent, plus its length.
        self._valid_until = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self._deadline_timer: Timer | None = None
        self._lost: LockLost | None = None
        self._body: asyncio.Task[Any] | None = None
        self._body_token: str | None = None
        self._body_cancelling = 0
        self._cancelled_body = False
        self._exiting = False
        self._gate = asyncio.Lock()
        """One object, one owner: tasks sharing a lock object queue here for their turn
        (asyncio.Lock rules); a ``Permit``, held from the start, never takes it."""

    # subclass hooks
    async def _remote_extend(self, token: str, ms: int, replace: bool) -> int:
        raise NotImplementedError

    async def _remote_release(self, token: str) -> bool:
        raise NotImplementedError

    async def _take(self, deadline: float) -> float | None:
        """Try until *deadline* (loop time) to take the lease: None once held (``_hold``
        done), else a retry hint in seconds. Only objects that acquire (not a ``Permit``)."""
        raise NotImplementedError

    async def _wait_for_gate(self, wait: float) -> bool:
        """Take this object's gate, which another task of this process holds, waiting up to
        *wait*; False if still taken."""
        if wait <= 0:
            return False
        try:
            async with asyncio.timeout(wait):
                await self._gate.acquire()
        except TimeoutError:
            return False
        return True

    @traced("lock.acquire", attrs=from_self(LOCK_ATTRS), result=lambda r: TAKEN[r[0]])
    async def _acquire(self, wait: float) -> tuple[bool, float]:
        """Take the gate, then the lease, within *wait* seconds: (taken, retry hint in seconds).

        The gate stays taken while the lease is held; it is given back when the lease is
        not taken, whatever the reason (no result, an error, a cancellation).
        """
        deadline = asyncio.get_running_loop().time() + wait
        gate = self._gate
        if not gate.locked():
            await gate.acquire()  # free: returns without suspending
        elif not await self._wait_for_gate(wait):
            return False, max(0.0, self._valid_until - self.clock.now())  # what is left of it
        try:
            hint = await self._take(deadline)
        except BaseException:
            if self._token is None:
                self._open_gate()
            raise
        if hint is None:
            return True, 0.0
        self._open_gate()
        return False, hint

    def _open_gate(self) -> None:
        """Let the next task of this process take the object (runs even if the caller is cancelled)."""
        if self._gate.locked():
            self._gate.release()

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
        """When (on ``clock``; ``loop.time()`` by default) this holder stops counting on the lease.

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
        self._deadline_timer = self.clock.call_at(
            self._valid_until - self.drift, partial(self._deadline_passed, token)
        )

    def _deadline_passed(self, token: str) -> None:
        # A clock timer, not the watchdog task: the watchdog may be stuck in a renewal
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
        clock = self.clock
        retry = max(0.01, self.renew_interval / 4)
        next_at = clock.now() + self.renew_interval
        while True:
            await clock.sleep(max(0.0, next_at - clock.now()))
            if self._token != token or self._lost is not None:
                return
            deadline = self._valid_until - self.drift
            sent = clock.now()
            try:
                # Bounded by the lease: a renewal answered later is of no use.
                async with clock.timeout_at(deadline):
                    left = await self._remote_extend(token, self._lease_ms, True)
            except Exception as exc:
                if self._token != token or self._lost is not None:
                    return
                if clock.now() + retry >= deadline:
                    reason = (
                        "no renewal was confirmed before its lease ended"
                        if isinstance(exc, TimeoutError)
                        else f"the renewal failed until the lease ran out ({exc})"
                    )
                    self._declare_lost(reason, exc)
                    return
                log.warning("%s %r: renewal failed, retrying: %s", self._kind, self.name, exc)
                next_at = clock.now() + retry
                continue
            if self._token != token or self._lost is not None:
                return
            if left < 0:
                self._declare_lost("its key expired or another owner took it", None)
                return
            self._valid_until = sent + left / 1000
            self._arm_deadline(token)
            next_at = sent + self.renew_interval

    @traced("lock.lost", attrs=from_self(LOCK_ATTRS), result=lambda _: "lost")
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
                    in_background(_await(result))
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
        sent = self.clock.now()
        left = await self._remote_extend(token, to_ms(seconds), replace)
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

    def _end_hold(self) -> str | None:
        """Forget the current token and stop the watchdog; the token (None when not held).

        The first step of every release: from here on the hold is over locally, whatever
        the compare-and-delete in Redis then answers.
        """
        token, self._token = self._token, None
        if token is not None:
            self._stop_watchdog()
        return token

    @traced("lock.release", attrs=from_self(LOCK_ATTRS), result=lambda ok: _RELEASED[ok])
    async def _release_hold(self) -> bool:
        """End the current hold: compare-and-delete, completed even if the caller is cancelled."""
        token = self._end_hold()
        if token is None:
            raise LockNotOwned(
                f"{self._kind} {self.name!r} is not held by this owner (never acquired or "
                "already released)",
                lock_name=self.name,
            )
        try:
            # In the caller's task (a task of its own would cost three more loop turns per
            # release): every client delivers a cancellation to its caller (app.core.pool
            # sees to redis.asyncio's), and a cancelled release is sent again in the
            # background, which is safe: a compare-and-delete with this token can run twice
            # (the second finds the key gone, or the first's receipt).
            try:
                return await self._remote_release(token)
            except asyncio.CancelledError:
                in_background(self._remote_release(token))
                raise
        finally:
            self._open_gate()

    def _release_in_background(self) -> None:
        """End a hold known to be lost: compare-and-delete without waiting for it."""
        token = self._end_hold()
        if token is None:
            return
        try:
            in_background(self._remote_release(token))
        finally:
            self._open_gate()

    async def _release_lost_hold(self) -> None:
        """End a hold known to be lost, waiting for it no later than the deadline.

        The compare-and-delete is awaited only until ``deadline`` (a loss that
        the deadline itself declared does not wait); past that it finishes in the
        background, so a slow or stalled link cannot hold up ``LockLost``.
        """
        token = self._end_hold()
        if token is None:
            return
        try:
            task = in_background(self._remote_release(token))
            deadline = self._valid_until - self.drift
            if deadline > self.clock.now():
                with contextlib.suppress(TimeoutError):
                    async with self.clock.timeout_at(deadline):
                        await asyncio.wait({task})
        finally:
            self._open_gate()

    def _overlapped(self, error: type[_E], before: str, work: str) -> _E:
        """*error* saying the hold ended in Redis *before* something and *work* may have overlapped."""
        return error(
            f"{self._kind} {self.name!r} expired or was taken by another owner before {before} "
            f"(lease {self.timeout:g} s): {work} may have overlapped with another owner's. "
            "Use auto_renew=True or a longer timeout, and fencing tokens.",
            lock_name=self.name,
        )

    def _not_owned_on_release(self) -> LockNotOwned:
        return self._overlapped(LockNotOwned, "release()", "the work under it")

    def _arm_body(self) -> None:
        """Make the current task the guarded block (``__aenter__``).

        Raises ``LockLost`` instead, without entering, when the watchdog's
        deadline already passed: the acquire was confirmed too late to be of use.
        """
        token = self._token
        late = self.clock.now() >= self._valid_until - self.drift
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release; raise ``LockLost`` if the hold expired or was taken during the block."""
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
            raise lost or self._overlapped(LockLost, "the block finished", "the block")
        return None
