"""``python -m bench``: start a private redis-server, run the groups, print ratios, save JSON.

Every server and process this starts is stopped by its pid; all traffic stays
on 127.0.0.1; every load is bounded in time (``--seconds`` per case per round).
``--quick`` is a ~2 minute smoke run of every group (fewer, shorter rounds).
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

from app.core.config import get_settings
from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer
from bench import redis_benchmark
from bench.harness import run_group
from bench.latency_proxy import LatencyProxy
from bench.report import fmt_rate, print_table
from bench.targets import print_targets

GROUPS = [
    "baseline",
    "client",
    "cache",
    "ratelimit",
    "locks",
    "idempotency",
    "streams",
    "http",
    "telemetry",
]
RESULTS = Path(__file__).parent / "results" / "latest.json"
# (full, --quick) defaults of the options that size the run
PROFILES: dict[str, tuple[Any, Any]] = {
    "rounds": (7, 2),
    "seconds": (0.22, 0.12),
    "rb_requests": (20000, 4000),
    "stream_messages": (5000, 1000),
    "http_rounds": (3, 1),
    "http_seconds": ("1,2", "1,1"),
    "http_warmup": (1, 0),
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = RedisServer().start()
    latency_proxy: LatencyProxy | None = None
    counting_proxy: TcpProxy | None = None
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "quick": args.quick,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "rounds": args.rounds,
        "seconds_per_case_round": args.seconds,
        "latency_ms": args.latency_ms,
        "groups": {},
    }
    try:
        url = server.url
        if args.latency_ms:
            latency_proxy = LatencyProxy(server.host, server.port, args.latency_ms)
            url = latency_proxy.url
        # Our services read settings at construction, the HTTP apps' processes too.
        os.environ["REDIS_URL"] = url
        os.environ.setdefault("SECRET_KEY", "bench-" + "k" * 40)
        get_settings.cache_clear()
        counting_proxy = TcpProxy(server.host, server.port).start()
        if "baseline" in args.groups and not args.latency_ms:
            print("redis-benchmark (the server's own limit) ...", flush=True)
            out["redis_benchmark"] = redis_benchmark.run(
                server.port, rounds=min(args.rounds, 3), requests=args.rb_requests
            )
        for group in args.groups:
            module = importlib.import_module(f"bench.groups.{group}")
            print(f"\n== {group} ==", flush=True)
            if hasattr(module, "run"):  # groups with their own method (HTTP load, streams)
                out["groups"][group] = await module.run(url=url, server=server, args=args)
                continue
            results = await run_group(
                group, module.cases(), url=url, rounds=args.rounds, seconds=args.seconds,
                counting_proxy=counting_proxy, progress=lambda m: print(m, flush=True),
            )  # fmt: skip
            out["groups"][group] = [r.as_dict() for r in results]
            print_table(group, results)
    finally:
        await asyncio.sleep(0.2)  # let the proxies see their clients' connections close
        for proxy in (latency_proxy, counting_proxy):
            if proxy is not None:
                proxy.close()
        server.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help="comma-separated: " + ",".join(GROUPS)
    )
    parser.add_argument("--quick", action="store_true", help="~2 minute smoke run")
    parser.add_argument("--rounds", type=int, help="rounds per group (default 7; quick 2)")
    parser.add_argument(
        "--seconds", type=float, help="per case per round (default 0.22; quick 0.12)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="add this RTT through a proxy"
    )
    parser.add_argument("--rb-requests", type=int, help="redis-benchmark -n (x pipeline)")
    parser.add_argument(
        "--stream-messages", type=int, help="messages per consumption trial (5000; quick 1000)"
    )
    parser.add_argument("--http-rounds", type=int, help="wrk rounds (default 3; quick 1)")
    parser.add_argument(
        "--http-seconds", help="wrk run length for -c1,-c50 in seconds (default 1,2)"
    )
    parser.add_argument(
        "--http-warmup", type=int, help="wrk -c50 warm-up per endpoint, s (default 1; quick 0)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name, (full, quick) in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups: {unknown}")
    started = time.monotonic()
    out = asyncio.run(run(args))
    out["wall_seconds"] = round(time.monotonic() - started, 1)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "redis_benchmark" in out:
        print(
            "\n### redis-benchmark\n\n| test | -c | -P | median req/s | spread |\n|---|---:|---:|---:|---:|"
        )
        for row in out["redis_benchmark"]:
            if "error" in row:
                print(f"| {row['error']} |")
                continue
            print(
                f"| {row['test']} | {row['clients']} | {row['pipeline']} | {fmt_rate(row['median_rps'])} | {row['spread']:.0%} |"
            )
    out["targets"] = print_targets(out)
    if args.quick:
        print("\n(--quick: few short rounds; ratios are indicative only, rerun without --quick)")
    print(
        f"\nload average (1 min) at start / end: {out['load_average_at_start'][0]} / "
        f"{out['load_average_at_end'][0]} on {os.cpu_count()} cores; other work on the "
        "machine shows as spread"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {args.output} ({out['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
