"""Wait for a condition, never for a time: the one polling helper of the test suite.

A test that sleeps "long enough" passes on a quiet laptop and fails on a loaded
2-core CI machine. :func:`eventually` instead asks the condition until it holds,
with a deadline generous enough for a loaded machine, and fails with a message
that says what was awaited (and the last error the check raised, if any).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

__all__ = ["DEFAULT_DEADLINE", "ManualClock", "cancel_after", "eventually", "pop_signal"]

#: Seconds a condition may take on a loaded machine before the test fails. Deadlines
#: bound a hang; they are never a speed assertion, so they are deliberately long.
DEFAULT_DEADLINE = 30.0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    what: str = "the condition",
    *,
    timeout: float = DEFAULT_DEADLINE,
    interval: float = 0.01,
    errors_mean_not_yet: bool = False,
) -> None:
    """Return as soon as ``check()`` is true; raise ``AssertionError`` after *timeout* s.

    *check* may be a plain or an async callable. With ``errors_mean_not_yet`` an
    exception from *check* (a server still failing over, say) counts as "not yet"
    and the last one is named in the failure message; otherwise it propagates.
    """
    last_error: BaseException | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    result = check()
                    if inspect.isawaitable(result):
                        result = await result
                    if result:
                        return
                except Exception as exc:
                    if not errors_mean_not_yet:
                        raise
                    last_error = exc
                await asyncio.sleep(interval)
    except TimeoutError:
        detail = f" (last error: {last_error!r})" if last_error is not None else ""
        raise AssertionError(f"not within {timeout:g} s: {what}{detail}") from None


class _ListPopper(Protocol):
    """What :func:`pop_signal` needs of a client: ``BLPOP`` (redis.asyncio, any decoding)."""

    def blpop(self, keys: Any, timeout: Any = ...) -> Awaitable[Any]: ...


async def pop_signal(
    client: _ListPopper, key: str, what: str = "", *, timeout: float = DEFAULT_DEADLINE
) -> Any:
    """Wait for an item pushed on list *key* (a start signal between processes) and return it.

    One long ``BLPOP`` would outlive the client's socket timeout (redis-py 8 reads
    for at most 5 s by default) and fail with ``TimeoutError`` whenever the other
    side is slow to start, so this pops in one-second slices until *timeout*.
    Raises ``AssertionError`` naming *what* (or the key) when nothing came.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        item = await client.blpop([key], timeout=max(0.01, min(1.0, left)))
        if item is not None:
            return item
    raise AssertionError(f"not within {timeout:g} s: {what or f'an item on {key!r}'}")


async def cancel_after(
    turns: int, start: Callable[[], Awaitable[Any]]
) -> Literal["finished", "cancelled", "lost"]:
    """Run ``start()`` in a task, cancel it after *turns* loop turns, and wait for the task.

    ``"finished"``: it had ended before the cancel (nothing to deliver).
    ``"cancelled"``: the cancel was accepted and the task ended with ``CancelledError``.
    ``"lost"``: the cancel was accepted, yet the task returned normally: it ran on after
    its caller gave up. Any other error of the task propagates.
    """
    task = asyncio.ensure_future(start())
    for _ in range(turns):
        await asyncio.sleep(0)
    if not task.cancel():
        await task
        return "finished"
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "lost"


class ManualClock:
    """A monotonic clock that moves only when the test says so, for code that takes ``clock=``.

    Pass it where a service accepts a clock (``LocalCache(clock=...)``, ``CircuitBreaker``)
    and call :meth:`advance` instead of sleeping through a TTL or a cool-down.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock *seconds* forward."""
        self.now += seconds
