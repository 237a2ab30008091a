"""Demo routes for distributed locks and semaphores.

* ``POST /jobs/{job_id}/run?seconds=0.5``: runs a (simulated) job under the
  lock ``jobs:{job_id}``; a second run of the same job while the first is in
  progress, in any worker, answers 409 problem+json with ``Retry-After``.
  The response carries the fencing token the run got.
* ``GET /jobs/{job_id}/lock``: whether that job's lock is held right now.
* ``POST /exports?seconds=0.5``: at most 2 exports run at once across every
  worker (a ``Semaphore``); a third answers 409 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query

from app.api.deps import LOCK_RESPONSES, RedisDep, request_lock, request_semaphore
from app.core.redis import Lifespan
from app.services.locks import Permit, RedisLock

__all__ = ["EXPORT_LIMIT", "lifespan", "router", "setup"]

router = APIRouter(tags=["locks"])
lifespan: Lifespan | None = None

EXPORT_LIMIT = 2
"""How many exports may run at once (across every worker)."""

WorkSeconds = Annotated[
    float, Query(ge=0, le=10, description="How long the simulated work takes, in seconds.")
]


def setup(app: FastAPI) -> None:
    """Nothing to install: the routes use per-request dependencies."""


@router.post(
    "/jobs/{job_id}/run",
    summary="Run a job under a distributed lock (409 while the same job runs elsewhere)",
    responses=LOCK_RESPONSES,
)
async def run_job(
    job_id: str,
    lock: Annotated[RedisLock, request_lock("jobs:{job_id}", timeout=10)],
    seconds: WorkSeconds = 0.5,
) -> dict[str, Any]:
    """Hold ``jobs:{job_id}`` (renewed every few seconds) while the work runs."""
    await asyncio.sleep(seconds)
    return {"job_id": job_id, "fence": lock.fence, "worked_seconds": seconds}


@router.get("/jobs/{job_id}/lock", summary="Is this job's lock held right now?")
async def job_lock(job_id: str, redis: RedisDep) -> dict[str, Any]:
    """``{"job_id": ..., "locked": true|false}`` (one ``EXISTS``)."""
    locked = await RedisLock(redis, f"jobs:{job_id}", timeout=10).locked()
    return {"job_id": job_id, "locked": locked}


@router.post(
    "/exports",
    summary=f"Semaphore-limited work: at most {EXPORT_LIMIT} exports at once across workers",
    responses=LOCK_RESPONSES,
)
async def run_export(
    permit: Annotated[Permit, request_semaphore("exports", limit=EXPORT_LIMIT, timeout=10)],
    seconds: WorkSeconds = 0.5,
) -> dict[str, Any]:
    """Hold one of the export permits while the work runs."""
    await asyncio.sleep(seconds)
    return {"running_at_start": permit.holders, "limit": EXPORT_LIMIT, "worked_seconds": seconds}
