"""JSON logs carry the trace and span of the toolkit operation that logged."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from app.observability.logs import json_logs
from app.observability.testing import Capture
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    toolkit = logging.getLogger("app")
    level = toolkit.level
    handler = json_logs(stream=stream)
    try:
        yield stream
    finally:
        toolkit.removeHandler(handler)
        toolkit.setLevel(level)


async def test_a_failed_handler_logs_json_with_the_handle_spans_ids(
    fake_redis: Any, log_stream: io.StringIO
) -> None:
    async def handler(message: StreamMessage[Any]) -> None:
        raise RuntimeError("card declined")

    with Capture() as otel:
        producer = StreamProducer(fake_redis, "payments")
        consumer = StreamConsumer(fake_redis, "payments", "g", "w", handler, max_deliveries=5)
        await consumer.ensure_group()
        await producer.add({"id": 1})
        await consumer.run_once()
        handle = otel.span("stream.handle")

    lines = [orjson.loads(line) for line in log_stream.getvalue().splitlines()]
    [retry] = [line for line in lines if "card declined" in line["message"]]
    assert retry["level"] == "WARNING" and retry["logger"].startswith("app")
    assert handle.context is not None
    assert retry["trace_id"] == format(handle.context.trace_id, "032x")
    assert retry["span_id"] == format(handle.context.span_id, "016x")


def test_lines_outside_any_span_have_no_ids_and_keep_extra_fields(
    log_stream: io.StringIO,
) -> None:
    logging.getLogger("app.demo").warning("plain %s", "line", extra={"job": 7})
    [line] = [orjson.loads(x) for x in log_stream.getvalue().splitlines()]
    assert line["message"] == "plain line" and line["job"] == 7
    assert "trace_id" not in line and "span_id" not in line
