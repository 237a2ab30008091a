"""Capture the toolkit's spans and metrics in memory, for tests (needs opentelemetry-sdk).

    with Capture() as otel:
        await cache.get("k")
    assert otel.span("cache.get").attributes["toolkit.outcome"] == "miss"
    assert otel.count("cache.get", outcome="miss") == 1

``Capture`` installs the toolkit backend with its own providers (not the global ones)
and removes it on exit, so every service method is its plain self again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import observability

__all__ = ["Capture"]


class Capture:
    """An in-memory span exporter and metric reader wired to ``observability.instrument``."""

    def __init__(self, *, spans: bool = True) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self._spans = spans

    def __enter__(self) -> Capture:
        observability.instrument(self.tracer_provider, self.meter_provider, spans=self._spans)
        return self

    def __exit__(self, *exc: object) -> None:
        observability.uninstrument()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    # -- spans -----------------------------------------------------------------

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans (of *name*), oldest first."""
        found = self.exporter.get_finished_spans()
        return [s for s in found if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        """The last finished span called *name* (AssertionError when there is none)."""
        found = self.spans(name)
        assert found, f"no {name!r} span among {[s.name for s in self.spans()]}"
        return found[-1]

    def outcomes(self, name: str) -> list[str]:
        """``toolkit.outcome`` of each finished *name* span, oldest first."""
        return [str((s.attributes or {}).get("toolkit.outcome")) for s in self.spans(name)]

    def clear(self) -> None:
        self.exporter.clear()

    # -- metrics ---------------------------------------------------------------

    def points(self, metric: str) -> Iterator[tuple[dict[str, Any], Any]]:
        """``(attributes, point)`` of *metric* collected now."""
        data = self.reader.get_metrics_data()
        if data is None:
            return
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        for point in m.data.data_points:
                            yield dict(point.attributes or {}), point

    def count(self, operation: str, **attrs: Any) -> int:
        """``toolkit.operations`` of *operation* whose attributes include *attrs*
        (``outcome=`` stands for ``toolkit.outcome``)."""
        want = {"toolkit.operation": operation}
        if "outcome" in attrs:
            want["toolkit.outcome"] = attrs.pop("outcome")
        want.update(attrs)
        total = 0
        for labels, point in self.points("toolkit.operations"):
            if all(labels.get(k) == v for k, v in want.items()):
                total += int(point.value)
        return total

    def durations(self, operation: str) -> int:
        """How many ``toolkit.operation.duration`` samples *operation* recorded."""
        total = 0
        for labels, point in self.points("toolkit.operation.duration"):
            if labels.get("toolkit.operation") == operation and isinstance(
                point, HistogramDataPoint
            ):
                total += point.count
        return total

    def gauge(self, metric: str, **attrs: Any) -> list[Any]:
        """Values of the observable gauge *metric* whose attributes include *attrs*."""
        return [
            point.value
            for labels, point in self.points(metric)
            if all(labels.get(k) == v for k, v in attrs.items())
        ]
