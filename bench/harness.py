"""Benchmark method: time-calibrated rounds, round-robin with rotating order, ratios per round.

A *case* is an async context manager factory ``make(url) -> op``: it sets up a
client (and whatever the library needs) for the server at *url* and yields
``op``, a coroutine function doing ONE operation. Each case names the baseline
it is compared with (a raw ``redis.asyncio`` case of the same shape).

For every shape (``seq``: one task awaiting in sequence; ``c50``: 50
concurrent tasks on the same objects) and every round, each case runs for
``seconds``; the order of cases rotates each round so no case always runs
warm or cold. Reported per case: the median ops/s over rounds, the spread
((max - min) / median) and the median over rounds of case / baseline measured
in the same round. Commands sent per operation are counted on the wire
through a counting proxy (``app.testing.proxy.TcpProxy``), so a regression in
round trips shows even when timing is noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from app.testing.proxy import TcpProxy

__all__ = ["Case", "CaseResult", "Op", "run_group"]

Op = Callable[[], Awaitable[Any]]
Factory = Callable[[str], AbstractAsyncContextManager[Op]]
SHAPES = {"seq": 1, "c50": 50}


@dataclass
class Case:
    """One benchmarked operation."""

    name: str
    make: Factory
    baseline: str | None = None
    note: str = ""
    unit_per_op: int = 1  # e.g. 100 for a pipeline of 100 commands, reported per command
    shapes: tuple[str, ...] = ("seq", "c50")


@dataclass
class CaseResult:
    group: str
    name: str
    shape: str
    baseline: str | None
    samples: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    commands_per_op: float | None = None
    writes_per_op: float | None = None
    note: str = ""
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def spread(self) -> float:
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "case": self.name,
            "shape": self.shape,
            "baseline": self.baseline,
            "median_ops_per_s": round(self.median, 1),
            "spread": round(self.spread, 3),
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "samples": [round(s, 1) for s in self.samples],
            "commands_per_op": self.commands_per_op,
            "writes_per_op": self.writes_per_op,
            "note": self.note,
            "error": self.error,
        }


async def _measure(op: Op, concurrency: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        n = 0
        while loop.time() < deadline:
            await op()
            n += 1
        counts[i] = n

    start = loop.time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (loop.time() - start)


async def _count_commands(
    case: Case, proxy: TcpProxy, concurrency: int = 1, ops: int = 50
) -> tuple[float, float]:
    """Commands (and write bursts) per op, counted in the shape: at 50 tasks a library
    that coalesces concurrent calls sends fewer commands than one per call."""
    per_task = max(2, ops // concurrency) if concurrency > 1 else ops

    async def worker(op: Op) -> None:
        for _ in range(per_task):
            await op()

    async with case.make(proxy.url) as op:
        # warm up: connect, load scripts, fill caches
        await asyncio.gather(*(op() for _ in range(concurrency)))
        proxy.commands = proxy.writes = 0
        proxy.count = True
        await asyncio.gather(*(worker(op) for _ in range(concurrency)))
        proxy.count = False
    total = per_task * concurrency
    return proxy.commands / total, proxy.writes / total


async def run_group(
    group: str,
    cases: list[Case],
    *,
    url: str,
    rounds: int,
    seconds: float,
    counting_proxy: TcpProxy | None,
    progress: Callable[[str], None] = print,
) -> list[CaseResult]:
    """Run every case of *group* in every shape; returns one result per (case, shape)."""
    results: list[CaseResult] = []
    for shape, concurrency in SHAPES.items():
        active = [c for c in cases if shape in c.shapes]
        by_name = {
            c.name: CaseResult(group, c.name, shape, c.baseline, note=c.note) for c in active
        }
        async with contextlib.AsyncExitStack() as stack:
            ops: dict[str, Op] = {}
            for case in active:
                try:
                    ops[case.name] = await stack.enter_async_context(case.make(url))
                    # warm up in the shape: connect the whole pool, load scripts, fill caches
                    await asyncio.gather(*(ops[case.name]() for _ in range(concurrency)))
                except Exception as exc:  # a peer that does not install or run here
                    by_name[case.name].error = f"{type(exc).__name__}: {exc}"[:200]
            runnable = [c for c in active if c.name in ops]
            for r in range(rounds):
                shift = r % max(1, len(runnable))
                order = runnable[shift:] + runnable[:shift]
                round_values: dict[str, float] = {}
                for case in order:
                    try:
                        value = await _measure(ops[case.name], concurrency, seconds)
                    except Exception as exc:
                        by_name[case.name].error = f"{type(exc).__name__}: {exc}"[:200]
                        continue
                    round_values[case.name] = value * case.unit_per_op
                    by_name[case.name].samples.append(value * case.unit_per_op)
                for case in runnable:
                    base = case.baseline
                    if base and case.name in round_values and round_values.get(base):
                        by_name[case.name].ratios.append(
                            round_values[case.name] / round_values[base]
                        )
                progress(f"  {group}/{shape} round {r + 1}/{rounds} done")
        if counting_proxy is not None:
            for case in active:
                if by_name[case.name].error is None:
                    try:
                        cmds, writes = await _count_commands(case, counting_proxy, concurrency)
                        by_name[case.name].commands_per_op = round(cmds / case.unit_per_op, 2)
                        by_name[case.name].writes_per_op = round(writes / case.unit_per_op, 2)
                    except Exception as exc:
                        by_name[case.name].note += f" (count failed: {exc})"
        results.extend(by_name.values())
    return results


@contextlib.asynccontextmanager
async def simple(
    make_op: Callable[[], Awaitable[tuple[Op, Callable[[], Awaitable[None]]]]],
) -> AsyncIterator[Op]:
    """Helper: turn ``async () -> (op, close)`` into a case factory body."""
    op, close = await make_op()
    try:
        yield op
    finally:
        await close()


def now() -> float:
    return time.perf_counter()
