"""Tasks that must finish even if their caller is cancelled (releases, clean-ups)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from app.core.background import keep
from app.services.locks._common import log

__all__ = ["in_background", "settle", "shielded"]

T = TypeVar("T")


def _report_background(error: BaseException) -> None:
    log.warning("lock clean-up finished in the background with an error: %s", error)


def _keep(task: asyncio.Task[Any]) -> None:
    keep(task, _report_background)  # close_redis() waits for it before closing the client


def in_background(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run *coro* as a task that is kept until it finishes (an error is logged)."""
    task = asyncio.ensure_future(coro)
    _keep(task)
    return task


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await *coro*; if the caller is cancelled meanwhile, it still runs to completion."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _keep(task)
        raise


async def settle(coro: Coroutine[Any, Any, Any]) -> None:
    """Shielded best-effort clean-up: errors are logged, never raised."""
    try:
        await shielded(coro)
    except Exception as exc:
        log.warning("lock clean-up failed: %s", exc)
