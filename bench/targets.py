"""The issue's targets, checked against the results of this run (ratios measured in it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.report import markdown_table

__all__ = ["TARGETS", "evaluate", "print_targets"]

Lookup = Callable[[dict[str, Any]], float | None]


def _case(group: str, case: str, shape: str, field: str = "ratio") -> Lookup:
    def get(out: dict[str, Any]) -> float | None:
        for row in out.get("groups", {}).get(group, []) or []:
            if isinstance(row, dict) and row.get("case") == case and row.get("shape") == shape:
                value = row.get(field)
                return None if row.get("error") else value
        return None

    return get


def _http(endpoint: str, conns: int, field: str) -> Lookup:
    def get(out: dict[str, Any]) -> float | None:
        group = out.get("groups", {}).get("http") or {}
        for row in group.get("endpoints", []):
            if row["endpoint"] == endpoint and row["conns"] == conns and not row.get("error"):
                value = row.get(field)
                return None if value is None else float(value)
        return None

    return get


def _streams(expectation: str) -> Lookup:
    def get(out: dict[str, Any]) -> float | None:
        group = out.get("groups", {}).get("streams") or {}
        for row in group.get("reference", []):
            if row["expectation"] == expectation:
                return float(row["times"])
        return None

    return get


LOCAL = "ours /cached-local (@cached, local-tier hit)"
REDIS_HIT = "ours /cached (@cached, Redis hit)"
LIMITED = "ours /limited (1 policy)"

# (target, shape, lookup, minimum, what the peers measured per the issue)
TARGETS: list[tuple[str, str, Lookup, float, str]] = [
    ("CacheService.get hit / raw GET", "seq", _case("cache", "ours CacheService.get hit", "seq"), 0.95, ""),
    ("CacheService.get hit / raw GET", "c50", _case("cache", "ours CacheService.get hit", "c50"), 0.95, ""),
    ("@cached hit / raw GET", "seq", _case("cache", "ours @cached hit", "seq"), 0.9, "cashews 0.66, fastapi-cache2 0.69"),
    ("@cached hit / raw GET", "c50", _case("cache", "ours @cached hit", "c50"), 0.9, "cashews 0.35, fastapi-cache2 0.55"),
    ("local-tier hit / raw GET", "seq", _case("cache", "ours local-tier hit", "seq"), 20, ""),
    ("local-tier hit / raw GET", "c50", _case("cache", "ours local-tier hit", "c50"), 20, ""),
    ("rate-limit check, 1 policy / raw EVALSHA", "seq", _case("ratelimit", "ours is_allowed, 1 policy", "seq"), 0.95, "limits 0.85-0.89, fastapi-limiter 0.73-0.92"),
    ("rate-limit check, 1 policy / raw EVALSHA", "c50", _case("ratelimit", "ours is_allowed, 1 policy", "c50"), 0.95, "limits 0.75-0.80, fastapi-limiter 0.24-0.85"),
    ("rate-limit check, 3 policies / raw EVALSHA", "seq", _case("ratelimit", "ours is_allowed, 3 policies", "seq"), 0.9, ""),
    ("rate-limit check, 3 policies / raw EVALSHA", "c50", _case("ratelimit", "ours is_allowed, 3 policies", "c50"), 0.9, ""),
    ("rate-limit check, 3 policies: round trips", "seq", _case("ratelimit", "ours is_allowed, 3 policies", "seq", "commands_per_op"), 1, "at most 1 (checked as <= 1)"),
    ("lock acquire+release / raw SET NX PX + EVALSHA", "seq", _case("locks", "ours RedisLock acquire+release", "seq"), 1.0, "redis-py Lock 0.98"),
    ("lock acquire+release / raw SET NX PX + EVALSHA", "c50", _case("locks", "ours RedisLock acquire+release", "c50"), 1.0, "redis-py Lock 0.86"),
    ("HTTP local-tier hit / bare", "c1", _http(LOCAL, 1, "ratio_vs_bare"), 0.9, ""),
    ("HTTP local-tier hit / bare", "c50", _http(LOCAL, 50, "ratio_vs_bare"), 0.9, ""),
    ("HTTP Redis hit / one-GET endpoint", "c1", _http(REDIS_HIT, 1, "ratio_vs_one_get"), 1.0, "fastapi-cache2 hit 0.39-0.49 of bare, one GET 0.52-0.62"),
    ("HTTP Redis hit / one-GET endpoint", "c50", _http(REDIS_HIT, 50, "ratio_vs_one_get"), 1.0, ""),
    ("HTTP rate-limited / one-GET endpoint", "c1", _http(LIMITED, 1, "ratio_vs_one_get"), 0.95, "fastapi-limiter 0.37-0.56 of bare"),
    ("HTTP rate-limited / one-GET endpoint", "c50", _http(LIMITED, 50, "ratio_vs_one_get"), 0.95, ""),
    ("streams: single publish vs < 1 ms", "seq", _streams("single publish, one task (latency)"), 10, ""),
    ("streams: single publish vs < 1 ms", "c50", _streams("single publish, 50 tasks (per message)"), 10, ""),
    ("streams: 100-message batch vs < 10 ms", "seq", _streams("100-message batch, one task"), 10, ""),
    ("streams: 1,000 messages consumed (1 consumer) vs < 500 ms", "-", _streams("1,000 messages consumed+acked: StreamConsumer, 1 consumer"), 10, ""),
    ("streams: 1,000 messages consumed (3 consumers) vs < 500 ms", "-", _streams("1,000 messages consumed+acked: StreamConsumer, 3 consumers"), 10, ""),
    ("streams: 1,000 messages end to end vs < 500 ms", "-", _streams("1,000 messages produced, consumed and acked (end to end)"), 10, ""),
]  # fmt: skip


def evaluate(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target, shape, lookup, minimum, peers in TARGETS:
        value = lookup(out)
        if value is None:
            continue  # the group did not run
        is_count = "round trips" in target
        met = value <= minimum if is_count else value >= minimum
        rows.append(
            {
                "target": target,
                "shape": shape,
                "required": minimum,
                "measured": round(value, 3),
                "met": met,
                "short_by": None if met or is_count else round(1 - value / minimum, 3),
                "peers_in_issue": peers,
            }
        )
    return rows


def print_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = evaluate(out)
    if not rows:
        return rows
    print("\n### targets (issue 11), measured in this run\n")
    table = [
        [r["target"], r["shape"], f"{r['required']:g}", f"{r['measured']:g}",
         "yes" if r["met"] else f"no ({r['short_by']:.0%} short)" if r["short_by"] else "no",
         r["peers_in_issue"]]
        for r in rows
    ]  # fmt: skip
    print(
        markdown_table(
            ["target", "shape", "required", "measured", "met", "peers (issue)"], table, "llrrll"
        )
    )
    return rows
