"""Handlers for stream worker processes started by the integration tests.

``python -m app.worker --handler tests.integration.services._streams_handlers:record``:
each handled entry is appended to the list ``PROCESSED_KEY`` as ``"<id> <consumer>
<deliveries>"`` after ``STREAMS_TEST_DELAY`` seconds of "work", so a test can count what
every process did, including processes it SIGKILLed. Its id is appended to ``STARTED_KEY``
when the handler starts: an entry in a consumer's PEL may still wait in its local queue
(``prefetch``), so the PEL does not say which handlers run.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from app.core.redis import get_redis
from app.services.streams import StreamMessage

__all__ = ["PROCESSED_KEY", "STARTED_KEY", "record"]

PROCESSED_KEY = "streams-test:processed"
STARTED_KEY = "streams-test:started"


async def record(message: StreamMessage[Any]) -> None:
    await get_redis().rpush(STARTED_KEY, message.id)
    await asyncio.sleep(float(os.environ.get("STREAMS_TEST_DELAY", "0.02")))
    await get_redis().rpush(PROCESSED_KEY, f"{message.id} {message.consumer} {message.deliveries}")
