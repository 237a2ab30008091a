"""``GET /metrics``: the toolkit's OpenTelemetry metrics in Prometheus text format.

Registered by ``create_app`` only when ``TELEMETRY_ENABLED=1``. The app's lifespan
installs ``app.observability`` with a ``MeterProvider`` whose Prometheus reader writes
to a registry of this app (not prometheus-client's global one, so two apps in one
process never collide), and removes it at shutdown. Each scrape first samples the
stream gauges (``observability.refresh()``). The same recipe for your own app is in
docs/operations.md, "Metrics and traces".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

__all__ = ["install_metrics"]

router = APIRouter(tags=["observability"])


@router.get(
    "/metrics", summary="Toolkit metrics in Prometheus text format", response_class=Response
)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from app import observability

    await observability.refresh()
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )


def install_metrics(app: FastAPI, inner: Any) -> Any:
    """Serve ``GET /metrics`` on *app*; return *inner* (its lifespan) wrapped to instrument.

    Importing OpenTelemetry and prometheus-client happens here, so an app that never
    enables telemetry never imports them.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    from app import observability

    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    app.include_router(router)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=registry, disable_target_info=True)]
        )
        observability.instrument(meter_provider=provider)
        try:
            async with inner(app):
                yield
        finally:
            observability.uninstrument()
            provider.shutdown()

    return lifespan
