"""Worker process for the multi-process rate-limit test.

``python -m tests.integration.services._rate_limit_worker <redis-url> <requests> <limit>``
waits until every worker is connected, then fires
*requests* concurrent checks at one identifier for every algorithm (and as
many concurrency-slot acquisitions), all at once, and prints how many were
admitted as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import get_args

from app.core.redis import AnyRedis, build_client
from app.services.rate_limit import (
    Algorithm,
    ConcurrencyLimiter,
    RateLimitDecision,
    RateLimiter,
)
from app.testing.waiting import pop_signal

ARRIVALS = "test:rate-limit:arrivals"
START = "test:rate-limit:start"
WORKERS = 2


async def _start_together(client: AnyRedis) -> None:
    """The last worker to arrive releases everyone at once (BLPOP wakes all waiters)."""
    if await client.incr(ARRIVALS) == WORKERS:
        await client.rpush(START, *["go"] * WORKERS)
    await client.expire(ARRIVALS, 60)
    await pop_signal(client, START, "the other worker", timeout=60)


async def main(url: str, requests: int, limit: int) -> dict[str, int]:
    client = build_client(url=url)
    try:
        limiters = [
            RateLimiter(
                client,
                max_requests=limit,
                window_seconds=3600,
                algorithm=name,
                failure_mode="closed",
            )
            for name in get_args(Algorithm)
        ]
        slots = ConcurrencyLimiter(client, limit, lease_seconds=60, failure_mode="closed")
        # open the connections first, so both processes fire at full speed from the start
        await asyncio.gather(*(client.ping() for _ in range(100)))
        await _start_together(client)
        # interleaved, so every limiter is contended from the first to the last request
        checks: list[Awaitable[bool | RateLimitDecision]] = []
        for _ in range(requests):
            checks += [limiter.is_allowed("contended") for limiter in limiters]
            checks.append(slots.acquire("contended"))
        outcomes = await asyncio.gather(*checks)
        stride = len(limiters) + 1
        admitted: dict[str, int] = {
            limiter.algorithm: sum(outcome is True for outcome in outcomes[i::stride])
            for i, limiter in enumerate(limiters)
        }
        admitted["concurrency"] = sum(
            isinstance(outcome, RateLimitDecision) and outcome.allowed
            for outcome in outcomes[len(limiters) :: stride]
        )
        return admitted
    finally:
        await client.aclose()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))))
