"""``python -m bench``: start a private redis-server, run the groups, print ratios, save JSON.

Every server and process this starts is stopped by its pid; all traffic stays
on 127.0.0.1; every load is bounded in time (``--seconds`` per case per round).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer
from bench import redis_benchmark
from bench.harness import CaseResult, run_group

GROUPS = ["baseline", "cache", "ratelimit", "locks", "idempotency", "streams", "http"]
RESULTS = Path(__file__).parent / "results" / "latest.json"


def _fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:,.0f}"


def print_table(group: str, results: list[CaseResult]) -> None:
    print(f"\n### {group}\n")
    print(
        "| case | seq ops/s | seq spread | seq ratio | c50 ops/s | c50 spread | c50 ratio | cmds/op | baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    names: list[str] = []
    for r in results:
        if r.name not in names:
            names.append(r.name)
    for name in names:
        row = {r.shape: r for r in results if r.name == name}
        cells = []
        for shape in ("seq", "c50"):
            r = row.get(shape)
            if r is None or r.error:
                cells += ["-", "-", (r.error or "n/a")[:40] if r else "n/a"]
                continue
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            cells += [_fmt_rate(r.median), f"{r.spread:.0%}", ratio]
        any_r = next(iter(row.values()))
        cmds = "-" if any_r.commands_per_op is None else f"{any_r.commands_per_op:g}"
        print(f"| {name} | " + " | ".join(cells) + f" | {cmds} | {any_r.baseline or '(itself)'} |")
    notes = {r.name: r.note for r in results if r.note}
    for name, note in notes.items():
        print(f"\n- {name}: {note}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = RedisServer().start()
    latency_proxy: TcpProxy | None = None
    counting_proxy: TcpProxy | None = None
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "rounds": args.rounds,
        "seconds_per_case_round": args.seconds,
        "latency_ms": args.latency_ms,
        "groups": {},
    }
    try:
        url = server.url
        if args.latency_ms:
            latency_proxy = TcpProxy(server.host, server.port).start()
            latency_proxy.latency = args.latency_ms / 2000  # per direction
            url = latency_proxy.url
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="per case per round")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="add this RTT through a proxy"
    )
    parser.add_argument(
        "--rb-requests", type=int, default=20000, help="redis-benchmark -n (x pipeline)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups: {unknown}")
    started = time.monotonic()
    out = asyncio.run(run(args))
    out["wall_seconds"] = round(time.monotonic() - started, 1)
    if "redis_benchmark" in out:
        print(
            "\n### redis-benchmark\n\n| test | -c | -P | median req/s | spread |\n|---|---:|---:|---:|---:|"
        )
        for row in out["redis_benchmark"]:
            if "error" in row:
                print(f"| {row['error']} |")
                continue
            print(
                f"| {row['test']} | {row['clients']} | {row['pipeline']} | {_fmt_rate(row['median_rps'])} | {row['spread']:.0%} |"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {args.output} ({out['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
