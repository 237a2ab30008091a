"""``python -m bench.cpu``: CPU time per operation, client and server, for the harness groups.

Throughput on a shared 2-core machine moves with whatever else runs; CPU
time spent per operation hardly does. For every case of the chosen groups
this runs ``--ops`` sequential operations and reports the benchmark process's
CPU time per operation (``time.process_time``: the library's Python work,
redis-py's and ours) and the Redis server's (``INFO cpu`` deltas: command
and script execution, network syscalls). Where a ratio in the main tables
misses, these columns say which side the extra time is spent on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from app.core.config import get_settings
from app.testing.servers import RedisServer
from bench.harness import Case
from bench.report import markdown_table

GROUPS = ["baseline", "cache", "ratelimit", "locks", "idempotency"]


async def _server_cpu(admin: Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(case: Case, url: str, admin: Redis, ops: int) -> tuple[float, float]:
    """(client, server) CPU microseconds per operation."""
    async with case.make(url) as op:
        for _ in range(min(200, ops)):
            await op()
        server_before = await _server_cpu(admin)
        client_before = time.process_time()
        for _ in range(ops):
            await op()
        client = time.process_time() - client_before
        server = await _server_cpu(admin) - server_before
    return client / ops * 1e6 / case.unit_per_op, server / ops * 1e6 / case.unit_per_op


async def run(groups: list[str], ops: int, repeats: int) -> dict[str, Any]:
    server = RedisServer().start()
    os.environ["REDIS_URL"] = server.url  # our services read settings at construction
    get_settings.cache_clear()
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "ops": ops,
        "repeats": repeats,
        "groups": {},
    }
    try:
        admin = Redis.from_url(server.url)
        for group in groups:
            cases = importlib.import_module(f"bench.groups.{group}").cases()
            rows: dict[str, dict[str, Any]] = {}
            for case in cases:
                samples: list[tuple[float, float]] = []
                try:
                    for _ in range(repeats):
                        samples.append(await measure(case, server.url, admin, ops))
                except Exception as exc:
                    rows[case.name] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
                    continue
                client = min(s[0] for s in samples)  # the least disturbed repeat
                server_us = min(s[1] for s in samples)
                rows[case.name] = {
                    "client_us": round(client, 1),
                    "server_us": round(server_us, 1),
                    "baseline": case.baseline,
                }
            for row in rows.values():
                base = rows.get(row.get("baseline") or "")
                if base and "error" not in base and "error" not in row:
                    row["extra_client_us"] = round(row["client_us"] - base["client_us"], 1)
                    row["extra_server_us"] = round(row["server_us"] - base["server_us"], 1)
            out["groups"][group] = rows
            table = cpu_table(rows)
            print(f"\n### {group}: CPU µs per operation (sequential, best of {repeats})\n")
            print(table, flush=True)
        await admin.aclose()
    finally:
        server.cleanup()
    return out


def cpu_table(rows: dict[str, dict[str, Any]]) -> str:
    """The markdown table of one group's CPU rows (``python -m bench.page`` uses it too)."""
    table = [
        [name] + (
            [r["error"], "", "", "", ""] if "error" in r else
            [f"{r['client_us']:.1f}", f"{r['server_us']:.1f}",
             f"{r.get('extra_client_us', 0):+.1f}" if r.get("baseline") else "-",
             f"{r.get('extra_server_us', 0):+.1f}" if r.get("baseline") else "-",
             r.get("baseline") or "(itself)"]
        )
        for name, r in rows.items()
    ]  # fmt: skip
    header = ["case", "client µs", "server µs", "client vs base", "server vs base",
              "baseline"]  # fmt: skip
    return markdown_table(header, table, "lrrrrl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "cpu.json"
    )
    args = parser.parse_args(argv)
    out = asyncio.run(run([g for g in args.groups.split(",") if g], args.ops, args.repeats))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
