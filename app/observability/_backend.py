"""The OpenTelemetry backend behind ``app.core.telemetry``: spans and metrics per operation."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    MeterProvider,
    Observation,
    get_meter_provider,
)
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app.core.errors import (
    IdempotencyConflict,
    IdempotencyMismatch,
    LockNotAcquired,
    LockNotOwned,
    RateLimitExceeded,
    RedisUnavailable,
    SessionConflict,
)
from app.core.telemetry import TRACEPARENT, Operation

__all__ = ["METRIC_ATTRIBUTES", "OtelBackend"]

SCOPE = "fastapi-redis-toolkit"

METRIC_ATTRIBUTES = frozenset(
    {
        "db.system.name",
        "toolkit.operation",
        "toolkit.outcome",
        "toolkit.ratelimit.policy",
        "toolkit.cache.namespace",
        "messaging.destination.name",
        "messaging.consumer.group.name",
        "error.type",
    }
)
"""Span attributes that are also metric attributes: low cardinality only (never keys,
lock names, identifiers or channels, which stay on spans)."""

_KINDS = {
    "internal": SpanKind.INTERNAL,
    "client": SpanKind.CLIENT,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
}

# The outcome of a call that raised, when the service did not report one.
_ERROR_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (SessionConflict, "conflict"),
    (IdempotencyConflict, "conflict"),
    (IdempotencyMismatch, "mismatch"),
    (LockNotAcquired, "timeout"),
    (LockNotOwned, "not_owned"),
    (RateLimitExceeded, "rejected"),
    (RedisUnavailable, "unavailable"),
)

_PROPAGATOR = TraceContextTextMapPropagator()


class _Call:
    __slots__ = ("error", "outcome")

    def __init__(self) -> None:
        self.outcome: str | None = None
        self.error: BaseException | None = None


_current: ContextVar[_Call | None] = ContextVar("toolkit_telemetry_call", default=None)


def _error_outcome(exc: BaseException) -> str:
    if isinstance(exc, BaseException) and not isinstance(exc, Exception):
        return "cancelled"
    for kind, name in _ERROR_OUTCOMES:
        if isinstance(exc, kind):
            return name
    return "error"


def _traceparent(fields: Mapping[Any, Any] | None) -> Context | None:
    if not fields:
        return None
    value = fields.get(TRACEPARENT)
    if value is None:
        value = fields.get(TRACEPARENT.encode())
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    return _PROPAGATOR.extract({TRACEPARENT: value})


class OtelBackend:
    """Spans from *tracer_provider*, metrics from *meter_provider* (globals when None).

    With ``spans=False`` no span is made (metrics only), e.g. when another
    instrumentation already traces every Redis call and service spans are not wanted.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        spans: bool = True,
    ) -> None:
        from app.observability import __version__

        self.tracer: Tracer | None = (
            trace.get_tracer(SCOPE, __version__, tracer_provider) if spans else None
        )
        self.meter: Meter = (meter_provider or get_meter_provider()).get_meter(SCOPE, __version__)
        self.duration = self.meter.create_histogram(
            "toolkit.operation.duration",
            unit="s",
            description="Duration of toolkit operations (a lock.acquire's is its wait).",
            explicit_bucket_boundaries_advisory=[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
            ],
        )  # fmt: skip
        # Counted here and observed at collection time: one dict increment per call
        # instead of a second SDK measurement (which costs as much as the histogram's).
        self._counts: dict[tuple[tuple[str, Any], ...], int] = {}
        self._labels: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.count = self.meter.create_observable_counter(
            "toolkit.operations",
            [self._observe_counts],
            unit="{operation}",
            description="Toolkit operations by outcome.",
        )

    def _observe_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self._counts.copy()  # atomic: collection may run in the reader's thread
        return [Observation(n, dict(key)) for key, n in counts.items()]

    # -- telemetry.Backend -------------------------------------------------------

    def outcome(self, value: str, error: BaseException | None) -> None:
        call = _current.get()
        if call is not None:
            call.outcome = value
            if error is not None:
                call.error = error

    def carrier(self) -> tuple[str, ...]:
        out: dict[str, str] = {}
        _PROPAGATOR.inject(out)
        value = out.get(TRACEPARENT)
        return () if value is None else (TRACEPARENT, value)

    def wrap(self, op: Operation) -> Callable[..., Any]:
        func = op.func
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                call, token, span, start, attrs = self._begin(op, args, kwargs)
                try:
                    value = await func(*args, **kwargs)
                except BaseException as exc:
                    self._end(op, call, span, start, attrs, None, exc)
                    raise
                finally:
                    _reset(token)
                self._end(op, call, span, start, attrs, value, None)
                return value

            return traced_async

        @functools.wraps(func)
        def traced_sync(*args: Any, **kwargs: Any) -> Any:
            call, token, span, start, attrs = self._begin(op, args, kwargs)
            try:
                value = func(*args, **kwargs)
            except BaseException as exc:
                self._end(op, call, span, start, attrs, None, exc)
                raise
            finally:
                _reset(token)
            self._end(op, call, span, start, attrs, value, None)
            return value

        return traced_sync

    def receive(self, message: Any, name: str) -> AbstractContextManager[trace.Span | None]:
        """A consumer span continuing the trace *message* carries (see ``continue_trace``)."""
        if self.tracer is None:
            return nullcontext()
        carried = getattr(message, "traceparent", None)
        fields = getattr(message, "fields", None)
        context = _traceparent({TRACEPARENT: carried} if carried else fields)
        attrs: dict[str, Any] = {"db.system.name": "redis", "messaging.system": "redis"}
        return self.tracer.start_as_current_span(
            name, context=context, kind=SpanKind.CONSUMER, attributes=attrs
        )

    # -- one call ----------------------------------------------------------------

    def _begin(
        self, op: Operation, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[_Call, Any, trace.Span | None, float, dict[str, Any]]:
        attrs: dict[str, Any] = {"db.system.name": "redis"}  # the span's name is the operation
        if op.attrs is not None:
            attrs.update(op.attrs(*args, **kwargs))
        span: trace.Span | None = None
        if self.tracer is not None:
            context = None
            if op.parent is not None:
                context = _traceparent(op.parent(*args, **kwargs))
            span = self.tracer.start_span(
                op.name, context=context, kind=_KINDS[op.kind], attributes=attrs
            )
        call = _Call()
        # the span is current while the method runs: Redis spans and the carrier()
        # of a producer nest under it
        ctx_token = None if span is None else attach(trace.set_span_in_context(span))
        token = (_current.set(call), ctx_token)
        return call, token, span, time.perf_counter(), attrs

    def _metric_labels(
        self, name: str, attrs: dict[str, Any], outcome: str, error_type: str | None
    ) -> tuple[Any, ...]:
        """(hashable key, attribute dict) of one call's metric point, built once per key."""
        values = tuple((k, v) for k, v in attrs.items() if k in METRIC_ATTRIBUTES)
        key = (name, values, outcome, error_type)
        found = self._labels.get(key)
        if found is None:
            labels = {"toolkit.operation": name, **dict(values), "toolkit.outcome": outcome}
            if error_type is not None:
                labels["error.type"] = error_type
            found = self._labels[key] = (tuple(labels.items()), labels)
        return found

    def _end(
        self,
        op: Operation,
        call: _Call,
        span: trace.Span | None,
        start: float,
        attrs: dict[str, Any],
        value: Any,
        exc: BaseException | None,
    ) -> None:
        elapsed = time.perf_counter() - start
        outcome = call.outcome
        if outcome is None:
            if exc is not None:
                outcome = _error_outcome(exc)
            elif op.result is not None:
                outcome = op.result(value)
        outcome = outcome or "ok"
        error = exc if exc is not None else call.error
        error_type = None if error is None else type(error).__qualname__
        labels = self._metric_labels(op.name, attrs, outcome, error_type)
        self.duration.record(elapsed, labels[1])
        self._counts[labels[0]] = self._counts.get(labels[0], 0) + 1
        if span is not None:
            span.set_attribute("toolkit.outcome", outcome)
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                if exc is not None and isinstance(exc, Exception):
                    span.record_exception(exc)
                if outcome in ("error", "unavailable", "failed"):
                    span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            span.end()


def _reset(token: tuple[Token[_Call | None], object | None]) -> None:
    call_token, ctx_token = token
    if ctx_token is not None:
        detach(ctx_token)  # type: ignore[arg-type]
    _current.reset(call_token)
