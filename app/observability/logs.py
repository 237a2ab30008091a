"""Structured JSON logs with the current trace and span ids.

    from app.observability.logs import json_logs
    json_logs()  # every "app.*" (toolkit) log line becomes one JSON object

Each line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``trace_id`` and
``span_id`` (hex, as trace backends show them) when a span is current (a request's, or a
toolkit operation's while telemetry is on), ``exception`` when one is attached, and any
``extra={...}`` fields given to the log call. ``JsonFormatter`` alone can go on handlers
of your own logging setup.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson
from opentelemetry import trace

__all__ = ["JsonFormatter", "json_logs"]

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with ``trace_id`` / ``span_id`` of the current span."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format(context.trace_id, "032x")
            line["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        return orjson.dumps(line, default=str).decode()


def json_logs(
    logger: str = "app", *, level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send *logger* (default: every toolkit logger) as JSON lines to *stream* (stderr).

    Replaces handlers this function added before; returns the handler it installed.
    """
    target = logging.getLogger(logger)
    for old in [h for h in target.handlers if getattr(h, "_toolkit_json", False)]:
        target.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._toolkit_json = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(level)
    return handler
