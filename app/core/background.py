"""Clean-ups that outlive their caller, and a bounded wait for them before a client closes.

A service sometimes cannot await its own clean-up: a lock released after its
holder was cancelled, a lost hold's compare-and-delete that must not delay
``LockLost``. Such a task is *kept* here (a task nobody references can be
garbage-collected mid-flight) until it finishes. Before a client is closed,
``drain()`` waits, bounded, for the kept tasks of the running loop, so a
release in flight reaches Redis instead of reopening a connection on a client
that was just closed: ``close_redis()`` (and so the app's lifespan) and the
test plugin's client fixtures do this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DRAIN_TIMEOUT", "drain", "keep"]

T = TypeVar("T")

DRAIN_TIMEOUT = 5.0
"""Seconds ``drain()`` waits by default: a few socket timeouts, bounded for shutdown."""

_kept: set[asyncio.Task[Any]] = set()


def keep(
    task: asyncio.Task[T], on_error: Callable[[BaseException], None] | None = None
) -> asyncio.Task[T]:
    """Keep *task* until it finishes; *on_error* gets its exception, if it raised one."""

    def done(finished: asyncio.Task[Any]) -> None:
        _kept.discard(finished)
        if on_error is not None and not finished.cancelled():
            error = finished.exception()
            if error is not None:
                on_error(error)

    _kept.add(task)
    task.add_done_callback(done)
    return task


async def drain(timeout: float = DRAIN_TIMEOUT) -> int:
    """Wait up to *timeout* s for the kept tasks of this loop; return how many still run."""
    loop = asyncio.get_running_loop()
    mine = {task for task in _kept if task.get_loop() is loop and not task.done()}
    if not mine:
        return 0
    _, pending = await asyncio.wait(mine, timeout=timeout)
    return len(pending)
