"""Demo routes for idempotency: a payment API that charges once per Idempotency-Key.

``POST /payments`` counts every execution of its handler in Redis;
``GET /payments/executions`` shows the count, so retries (``curl`` the same
request twice) visibly run the handler once. ``processing_seconds`` keeps the
handler busy to show the 409 a concurrent retry gets.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from app.api.deps import IDEMPOTENCY_RESPONSES, RedisDep, idempotency_key
from app.core.config import get_settings
from app.core.keys import KeySpace
from app.core.redis import Lifespan
from app.middleware.idempotency import IdempotencyMiddleware

__all__ = ["lifespan", "router", "setup"]

router = APIRouter(tags=["idempotency"])
lifespan: Lifespan | None = None

PATHS = ("/payments",)
"""Path prefixes the demo's IdempotencyMiddleware guards (POST and PATCH)."""
_DEMO_TTL = 86400


def _keys() -> KeySpace:
    return KeySpace(get_settings().redis_key_prefix, "idempotency.demo")


class PaymentIn(BaseModel):
    amount: int = Field(gt=0, description="Amount in minor units (cents).")
    currency: str = Field(default="EUR", pattern="^[A-Z]{3}$")
    processing_seconds: float = Field(
        default=0.0, ge=0, le=5, description="Simulated processing time (try a concurrent retry)."
    )


class Payment(BaseModel):
    id: str
    amount: int
    currency: str
    execution: int = Field(description="How many times the handler had run, this run included.")


@router.post(
    "/payments",
    status_code=201,
    summary="Charge once per Idempotency-Key (the handler counts its executions)",
    dependencies=[Depends(idempotency_key(required=True))],
    responses=IDEMPOTENCY_RESPONSES,
)
async def create_payment(payment: PaymentIn, redis: RedisDep, response: Response) -> Payment:
    """Records the execution, simulates processing, stores the payment; 201 with Location."""
    keys = _keys()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.incr(keys.key("executions"))
        pipe.expire(keys.key("executions"), _DEMO_TTL)
        execution, _ = await pipe.execute()
    if payment.processing_seconds:
        await asyncio.sleep(payment.processing_seconds)
    created = Payment(
        id=uuid.uuid4().hex,
        amount=payment.amount,
        currency=payment.currency,
        execution=int(execution),
    )
    await redis.set(keys.key("payment", created.id), created.model_dump_json(), ex=_DEMO_TTL)
    response.headers["Location"] = f"/payments/{created.id}"
    return created


@router.get("/payments/executions", summary="How many times POST /payments' handler ran")
async def payment_executions(redis: RedisDep) -> dict[str, Any]:
    raw = await redis.get(_keys().key("executions"))
    return {"executions": int(raw or 0)}


@router.get("/payments/{payment_id}", summary="A payment created by POST /payments")
async def get_payment(payment_id: str, redis: RedisDep) -> Payment:
    raw = await redis.get(_keys().key("payment", payment_id))
    if raw is None:
        raise HTTPException(status_code=404, detail="no such payment")
    return Payment.model_validate_json(raw)


def setup(app: FastAPI) -> None:
    """Guard the demo's unsafe ``/payments`` requests (other demo routes stay unguarded)."""
    app.add_middleware(IdempotencyMiddleware, paths=PATHS)
