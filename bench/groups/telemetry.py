"""What telemetry costs on the hot paths: a cache hit and a rate-limit check, in three modes.

* ``off``: no backend installed, so the services run their plain methods. This is also
  exactly the code path of an install without the ``otel`` extra (``@traced`` hands the
  class its function back; nothing of OpenTelemetry is called).
* ``api``: ``observability.instrument()`` with the API's no-op providers (the API
  installed, no SDK configured): the wrappers run, spans are non-recording.
* ``sdk``: the SDK recording every span (batch processor, an exporter that drops) and
  every metric (an in-memory reader): the real cost of tracing and metrics.
* ``sdk 1%``: the same with a ``ParentBased(TraceIdRatioBased(0.01))`` sampler, the usual
  production setting: every metric, one trace in a hundred.

Modes alternate within each round (rotated order) on one client and one private
redis-server; the table gives the median rate of each mode and its overhead against
``off`` measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.core.telemetry import from_self, traced
from app.services.cache import CacheService
from app.services.rate_limit import RateLimiter
from app.testing.servers import RedisServer
from bench.common import closing, toolkit_client
from bench.report import fmt_rate, markdown_table

Op = Callable[[], Awaitable[Any]]


def _modes() -> dict[str, Callable[[], Callable[[], None]]]:
    """Mode name -> installer returning its uninstaller."""
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    from app import observability

    def off() -> Callable[[], None]:
        return lambda: None

    def api() -> Callable[[], None]:
        observability.instrument(NoOpTracerProvider(), NoOpMeterProvider())
        return observability.uninstrument

    modes = {"off": off, "api": api}
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:  # the SDK is not installed here: two modes only
        return modes

    class _Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def sdk(ratio: float) -> Callable[[], Callable[[], None]]:
        def install() -> Callable[[], None]:
            tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
            tracer_provider.add_span_processor(BatchSpanProcessor(_Drop()))
            meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            observability.instrument(tracer_provider, meter_provider)

            def stop() -> None:
                observability.uninstrument()
                tracer_provider.shutdown()
                meter_provider.shutdown()

            return stop

        return install

    modes["sdk"] = sdk(1.0)
    modes["sdk 1%"] = sdk(0.01)
    return modes


async def _rate(op: Op, seconds: float) -> float:
    """Sequential operations per second for *seconds* (after a short warm-up)."""
    for _ in range(50):
        await op()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            await op()
        done += 50
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


class _Probe:
    """A traced method that does nothing: what the hook itself costs, without Redis."""

    namespace = "probe"

    @traced("bench.probe", attrs=from_self({"toolkit.cache.namespace": "namespace"}))
    async def op(self) -> int:
        return 1


async def _hook_cost(
    modes: dict[str, Callable[[], Callable[[], None]]], rounds: int
) -> dict[str, float]:
    """Median µs per call of ``_Probe.op`` in each mode (CPU only, no I/O)."""
    probe = _Probe()
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, install in modes.items():
            stop = install()
            try:
                start = time.perf_counter()
                for _ in range(2000):
                    await probe.op()
                samples[mode].append((time.perf_counter() - start) / 2000 * 1e6)
            finally:
                stop()
    return {mode: statistics.median(values) for mode, values in samples.items()}


async def run(*, url: str, server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    modes = _modes()
    client = toolkit_client(url)
    cache = CacheService(client, namespace="bench-telemetry")
    limiter = RateLimiter(client, max_requests=10**9, window_seconds=3600)
    await cache.set("hot", {"id": 1, "name": "x" * 80}, ttl=3600)
    ops: dict[str, Op] = {
        "cache.get (hit)": lambda: cache.get("hot"),
        "ratelimit.check": lambda: limiter.is_allowed("bench"),
    }
    samples: dict[tuple[str, str], list[float]] = {(o, m): [] for o in ops for m in modes}
    names = list(modes)
    rounds = max(3, args.rounds)
    async with closing(client):
        for r in range(rounds):
            for mode in names[r % len(names) :] + names[: r % len(names)]:
                stop = modes[mode]()
                try:
                    for op_name, op in ops.items():
                        samples[(op_name, mode)].append(await _rate(op, args.seconds))
                finally:
                    stop()
            print(f"  round {r + 1}/{rounds}", flush=True)
    rows: list[list[str]] = []
    out: dict[str, Any] = {}
    for op_name in ops:
        base = statistics.median(samples[(op_name, "off")])
        for mode in names:
            median = statistics.median(samples[(op_name, mode)])
            overhead = base / median - 1  # extra time per operation, relative to off
            rows.append(
                [op_name, mode, fmt_rate(median), f"{1e6 / median:.1f}", f"{overhead:+.1%}"]
            )
            out[f"{op_name} / {mode}"] = {
                "median_ops_per_s": median,
                "samples": samples[(op_name, mode)],
                "overhead_vs_off": overhead,
            }
    print("\n### telemetry (sequential, one client)\n")
    print(markdown_table(["operation", "mode", "ops/s", "µs/op", "vs off"], rows, "llrrr"))
    hook = await _hook_cost(modes, rounds)
    out["hook_us_per_call"] = hook
    print("\n### telemetry: the hook alone (CPU µs per call, no Redis)\n")
    print(markdown_table(["mode", "µs/call"], [[m, f"{v:.2f}"] for m, v in hook.items()], "lr"))
    return out
