"""OpenTelemetry traces and metrics for the toolkit (the ``otel`` extra).

Nothing of this package is imported by the services: they call the hooks of
``app.core.telemetry``, which do nothing until ``instrument()`` installs the
backend here. Then every traced operation (``cache.get``, ``lock.acquire``,
``stream.handle``...) opens a span and records ``toolkit.operation.duration`` and
``toolkit.operations``; stream entries carry the producer's ``traceparent`` and the
consumer's ``stream.handle`` span continues that trace. See docs/operations.md, "Metrics and traces".

    from app.observability import instrument
    instrument()  # the global TracerProvider / MeterProvider, or pass your own

Importing this package imports ``opentelemetry`` (``pip install
fastapi-redis-toolkit[otel]``); the SDK and exporters are the application's choice.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("fastapi-redis-toolkit")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0"

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, TracerProvider

from app.core import telemetry
from app.observability._backend import METRIC_ATTRIBUTES, OtelBackend
from app.observability._gauges import BREAKER_STATES, Gauges

__all__ = [
    "BREAKER_STATES",
    "METRIC_ATTRIBUTES",
    "OtelBackend",
    "continue_trace",
    "instrument",
    "instrumented",
    "refresh",
    "uninstrument",
]

_gauges: Gauges | None = None


def instrument(
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    *,
    spans: bool = True,
) -> OtelBackend:
    """Report every toolkit operation to OpenTelemetry (process-wide).

    *tracer_provider* / *meter_provider* default to the global ones (set by your
    SDK setup or ``opentelemetry-instrument``). ``spans=False`` keeps the metrics and
    makes no span. Calling it again replaces the previous backend.
    """
    global _gauges
    backend = OtelBackend(tracer_provider, meter_provider, spans=spans)
    _gauges = Gauges(backend.meter)
    telemetry.install(backend)
    return backend


def uninstrument() -> None:
    """Stop reporting: every service method is its plain self again."""
    global _gauges
    telemetry.uninstall()
    _gauges = None


def instrumented() -> bool:
    """Is a backend installed?"""
    return telemetry.active() is not None


async def refresh(*consumers: Any, timeout: float = 1.0) -> None:
    """Sample the stream gauges (lag, pending, dead letters).

    Gauges are read synchronously at collection time, so call this before a scrape
    (the demo's ``GET /metrics`` does) or from a periodic task. It samples every running
    consumer (``run()``) and the *consumers* given (e.g. ones driven by ``run_once``):
    one pipelined round trip each, bounded by *timeout*; a failed sample keeps the last.
    """
    gauges = _gauges
    if gauges is not None:
        await gauges.refresh(consumers, timeout)


def continue_trace(
    message: Any, name: str = "pubsub.receive"
) -> AbstractContextManager[Span | None]:
    """A consumer span (``with continue_trace(message): ...``) in the publisher's trace.

    *message* is a pub/sub ``Message`` (its ``traceparent``) or anything with stream
    ``fields``. Without a traceparent the span starts a new trace; while telemetry is
    off this is a no-op context (it yields None).
    """
    backend = telemetry.active()
    if not isinstance(backend, OtelBackend):
        return nullcontext()
    return backend.receive(message, name)
