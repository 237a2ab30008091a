"""Kept clean-ups and the bounded wait for them (app/core/background.py)."""

from __future__ import annotations

import asyncio

from app.core.background import drain, keep


async def test_drain_waits_for_a_kept_clean_up_to_finish() -> None:
    finished: list[str] = []

    async def release() -> None:
        await asyncio.sleep(0.05)  # the clean-up's own round trip, not synchronisation
        finished.append("released")

    keep(asyncio.ensure_future(release()))
    assert await drain(timeout=10) == 0
    assert finished == ["released"]


async def test_drain_is_bounded_and_says_how_many_still_run() -> None:
    stuck = keep(asyncio.ensure_future(asyncio.Event().wait()))
    try:
        assert await drain(timeout=0.05) == 1
        assert not stuck.done()
    finally:
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
    assert await drain(timeout=0.05) == 0  # a finished task is no longer kept


async def test_an_error_of_a_kept_task_goes_to_its_handler() -> None:
    errors: list[BaseException] = []

    async def fails() -> None:
        raise ConnectionError("gone")

    keep(asyncio.ensure_future(fails()), errors.append)
    assert await drain(timeout=10) == 0
    assert [str(e) for e in errors] == ["gone"]


async def test_drain_with_nothing_kept_returns_at_once() -> None:
    assert await drain(timeout=0) == 0
