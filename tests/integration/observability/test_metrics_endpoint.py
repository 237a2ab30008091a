"""The demo's ``GET /metrics`` after traffic, on a real redis-server through ASGI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.main import create_app
from app.testing.plugin import AppClientFactory
from app.testing.waiting import eventually

DASHBOARD = Path(__file__).resolve().parents[3] / "app/observability/grafana-dashboard.json"

FAMILIES = {
    "toolkit_operation_duration_seconds": "histogram",
    "toolkit_operations": "counter",
    "toolkit_stream_lag": "gauge",
    "toolkit_stream_pending": "gauge",
    "toolkit_stream_dead_letters": "gauge",
    "db_client_connection_count": "gauge",
    "db_client_connection_pending_requests": "gauge",
    "toolkit_breaker_state": "gauge",
}

OPERATIONS = {
    "cache.get",
    "cache.set",
    "ratelimit.check",
    "lock.acquire",
    "lock.release",
    "idempotency.claim",
    "session.save",
    "stream.produce",
    "stream.handle",
}


async def test_metrics_after_traffic_has_every_family_and_no_caller_data(
    real_redis: Redis,
    make_app_client: AppClientFactory,
    settings_override: Callable[..., None],
) -> None:
    settings_override(telemetry_enabled=True, streams_demo_worker="eager")
    client = await make_app_client(create_app(), real_redis)

    assert (await client.put("/cache/items/secret-key-1", json={"value": 1})).status_code < 300
    assert (await client.get("/cache/items/secret-key-1")).status_code == 200
    assert (await client.get("/cache/items/absent-key")).status_code < 500
    for _ in range(6):
        await client.get("/limits/user", headers={"X-User": "user-alice-77"})
    assert (await client.post("/jobs/job-secret-9/run", params={"seconds": 0})).status_code == 200
    headers = {"Idempotency-Key": "idem-key-abc-123", "Authorization": "Bearer tok-xyz"}
    for _ in range(2):
        reply = await client.post("/payments", json={"amount": 5}, headers=headers)
        assert reply.status_code == 201, reply.text
    assert (await client.post("/session/login", json={"user": "bob-the-user"})).status_code == 200
    assert (await client.post("/streams/events", json={"payload": {"n": 1}})).status_code == 201

    async def scrape() -> str:
        reply = await client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        return str(reply.text)

    async def handled() -> bool:
        return 'toolkit_operation="stream.handle"' in await scrape()

    await eventually(handled, "the demo worker handled the event")
    text = await scrape()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
    seen = {s.labels.get("toolkit_operation") for s in families["toolkit_operations"].samples}
    assert seen >= OPERATIONS, OPERATIONS - seen
    rejected = [
        s
        for s in families["toolkit_operations"].samples
        if s.labels.get("toolkit_operation") == "ratelimit.check"
        and s.labels.get("toolkit_outcome") == "rejected"
    ]
    assert rejected and rejected[0].labels["toolkit_ratelimit_policy"]
    [lag] = [s for s in families["toolkit_stream_lag"].samples if s.labels]
    assert lag.labels["messaging_destination_name"] == "events"
    [breaker] = families["toolkit_breaker_state"].samples
    assert breaker.value == 0  # closed
    read = {_family(metric, set(families)) for metric in _dashboard_metrics()}
    assert None not in read, "the dashboard reads a metric /metrics does not serve"
    assert read == set(FAMILIES)  # and every family has a panel
    for secret in ("secret-key-1", "user-alice-77", "job-secret-9", "idem-key", "tok-xyz", "bob"):
        assert secret not in text, f"{secret!r} leaked into /metrics"


async def test_metrics_is_absent_unless_enabled(
    real_redis: Redis, make_app_client: AppClientFactory
) -> None:
    client = await make_app_client(create_app(), real_redis)
    assert (await client.get("/metrics")).status_code == 404


def _family(metric: str, families: set[str]) -> str | None:
    """The family a sample name belongs to (``x_bucket`` -> ``x``), or None."""
    if metric in families:
        return metric
    base = re.sub(r"_(bucket|total|count|sum)$", "", metric)
    return base if base in families else None


def _dashboard_metrics() -> set[str]:
    """Metric names the Grafana dashboard's queries read."""
    names: set[str] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            # drop label matchers ({...}) and groupings (by (...)): what is left names metrics
            expr = re.sub(r"\bby \([^)]*\)", "", re.sub(r"\{[^}]*\}", "", target["expr"]))
            for metric in re.findall(r"\b((?:toolkit|db_client)_[a-z_]+)", expr):
                names.add(metric)
    return names
