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

__all__ = ["DEFAULT_DEADLINE", "eventually"]

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
