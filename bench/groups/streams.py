"""Streams: messages per second produced (single and pipelined) and consumed with acks.

Production runs through the common harness (``seq`` and ``c50`` shapes)
against raw ``XADD`` (one, or a pipeline of 100), every producer trimming with
``MAXLEN ~ 100000`` as a bounded production stream would.

Consumption is timed per trial: a fresh stream is filled with ``--stream-messages``
messages (not timed), then one or three consumers of one group (in this
process, sharing its event loop and client) handle and acknowledge all of
them; the time runs until the last ack is confirmed. The raw floor is a loop
of ``XREADGROUP COUNT 16`` + one ``XACK`` per batch per consumer. An end-to-end
trial produces 1,000 messages in batches of 100 while one consumer handles them.

The issue's reference expectations (from a production streams test suite)
become rates: a single publish under 1 ms is >= 1,000 messages/s, a
100-message batch under 10 ms is >= 10,000 messages/s, 1,000 messages under
500 ms is >= 2,000 messages/s; the target is 10x each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer
from bench.common import (
    SMALL,
    SMALL_BYTES,
    closing,
    raw_client,
    settle_and_close,
    toolkit_client,
)
from bench.harness import Case, CaseResult, Op, run_group
from bench.report import fmt_rate, markdown_table, print_table

MAXLEN = 100_000
BATCH = 100
RAW_COUNT = 16  # the consumer's default batch_size
PAYLOAD = b"payload"


# -- production (harness cases) -------------------------------------------------------


@asynccontextmanager
async def raw_xadd(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    key = "bench:raw:stream"
    async with closing(r):
        yield lambda: r.xadd(key, {PAYLOAD: SMALL_BYTES}, maxlen=MAXLEN, approximate=True)


@asynccontextmanager
async def raw_xadd_pipeline(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    key = "bench:raw:stream"

    async def op() -> None:
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(BATCH):
                pipe.xadd(key, {PAYLOAD: SMALL_BYTES}, maxlen=MAXLEN, approximate=True)
            await pipe.execute()

    async with closing(r):
        yield op


def ours_add(*, batch: bool) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.streams import StreamProducer

        r = toolkit_client(url)
        producer = StreamProducer(r, "bench-produce", maxlen=MAXLEN)
        payloads = [SMALL] * BATCH
        async with closing(r):
            yield (lambda: producer.add_many(payloads)) if batch else (lambda: producer.add(SMALL))

    return make


def production_cases() -> list[Case]:
    return [
        Case("raw XADD", raw_xadd),
        Case("ours StreamProducer.add", ours_add(batch=False), "raw XADD"),
        Case("raw pipeline of 100 XADD (msgs/s)", raw_xadd_pipeline, unit_per_op=BATCH),
        Case("ours add_many(100) (msgs/s)", ours_add(batch=True),
             "raw pipeline of 100 XADD (msgs/s)", unit_per_op=BATCH),
    ]  # fmt: skip


# -- consumption (timed trials) ---------------------------------------------------------


async def _fill(r: Any, key: str, n: int) -> None:
    from app.core.codec import default_codec

    data = default_codec().encode(SMALL)  # what StreamProducer writes
    for start in range(0, n, 500):
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(min(500, n - start)):
                pipe.xadd(key, {PAYLOAD: data})
            await pipe.execute()


async def _pending(r: Any, key: str, group: str) -> int:
    summary = await r.xpending(key, group)
    return int(summary["pending"])


async def consume_ours(url: str, consumers: int, n: int, **options: Any) -> float:
    """Seconds for *consumers* StreamConsumers to handle and ack *n* prefilled messages."""
    from app.services.streams import StreamConsumer, stream_keys

    r = toolkit_client(url)
    name = f"bench-consume-{os.urandom(4).hex()}"
    key = stream_keys(name).stream
    handled = 0
    done = asyncio.Event()

    async def handler(message: Any) -> None:
        nonlocal handled
        handled += 1
        if handled >= n:
            done.set()

    async with closing(r):
        await _fill(r, key, n)
        group = [
            StreamConsumer(r, name, "g", f"c{i}", handler, **options) for i in range(consumers)
        ]
        await group[0].ensure_group()
        started = time.perf_counter()
        tasks = [asyncio.create_task(c.run()) for c in group]
        try:
            await asyncio.wait_for(done.wait(), timeout=max(30.0, n / 500))
            await asyncio.gather(*(c.stop() for c in group))
            elapsed = time.perf_counter() - started
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        left = await _pending(r, key, "g")
        await r.delete(key)
    if left or handled != n:
        raise RuntimeError(f"{handled} handled of {n}, {left} still pending")
    return elapsed


async def consume_raw(url: str, consumers: int, n: int) -> float:
    """The floor: XREADGROUP COUNT 16 then one XACK per batch, per consumer."""
    import orjson

    r = raw_client(url)
    key = f"bench:raw:consume:{os.urandom(4).hex()}"
    handled = 0

    async def worker(name: str) -> None:
        nonlocal handled
        while handled < n:
            reply = await r.xreadgroup("g", name, {key: ">"}, count=RAW_COUNT)
            if not reply:
                await asyncio.sleep(0)
                continue
            entries = reply[key.encode()][0] if isinstance(reply, dict) else reply[0][1]
            ids = []
            for entry_id, fields in entries:
                orjson.loads(fields[PAYLOAD][3:])  # the payload behind the envelope header
                ids.append(entry_id)
            await r.xack(key, "g", *ids)
            handled += len(ids)

    async with closing(r):
        await _fill(r, key, n)
        await r.xgroup_create(key, "g", id="0")
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(worker(f"c{i}") for i in range(consumers))), timeout=max(30.0, n / 500)
        )
        elapsed = time.perf_counter() - started
        left = await _pending(r, key, "g")
        await r.delete(key)
    if left:
        raise RuntimeError(f"{left} still pending")
    return elapsed


async def end_to_end(url: str, n: int = 1000) -> float:
    """Seconds to produce *n* messages (add_many of 100) and have one consumer ack them all."""
    from app.services.streams import StreamConsumer, StreamProducer

    r = toolkit_client(url)
    name = f"bench-e2e-{os.urandom(4).hex()}"
    handled = 0
    done = asyncio.Event()

    async def handler(message: Any) -> None:
        nonlocal handled
        handled += 1
        if handled >= n:
            done.set()

    async with closing(r):
        producer = StreamProducer(r, name, maxlen=MAXLEN)
        consumer = StreamConsumer(r, name, "g", "c0", handler, start_id="0")
        await consumer.ensure_group()
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(0.05)  # the consumer is waiting on its blocking read
        started = time.perf_counter()
        try:
            for _ in range(n // BATCH):
                await producer.add_many([SMALL] * BATCH)
            await asyncio.wait_for(done.wait(), timeout=30.0)
            await consumer.stop()
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await r.delete(producer.keys.stream)
    return elapsed


TRIALS: dict[str, tuple[str | None, Callable[[str, int], Awaitable[float]]]] = {
    "raw XREADGROUP + XACK, 1 consumer": (None, lambda url, n: consume_raw(url, 1, n)),
    "raw XREADGROUP + XACK, 3 consumers": (None, lambda url, n: consume_raw(url, 3, n)),
    "ours StreamConsumer, 1 consumer": (
        "raw XREADGROUP + XACK, 1 consumer",
        lambda url, n: consume_ours(url, 1, n),
    ),
    "ours StreamConsumer, 3 consumers": (
        "raw XREADGROUP + XACK, 3 consumers",
        lambda url, n: consume_ours(url, 3, n),
    ),
    "ours StreamConsumer, 1 consumer, batch_size=100, concurrency=100": (
        "raw XREADGROUP + XACK, 1 consumer",
        lambda url, n: consume_ours(url, 1, n, batch_size=100, concurrency=100),
    ),
}


async def _count_per_message(server: RedisServer, name: str, n: int = 1000) -> float:
    proxy = TcpProxy(server.host, server.port).start()
    try:
        proxy.count = True
        await TRIALS[name][1](proxy.url, n)
        return proxy.commands / n
    finally:
        await settle_and_close(proxy)


async def run(*, url: str, server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    """Production through the harness, then consumption and end-to-end trials."""
    counting = TcpProxy(server.host, server.port).start()
    try:
        produced = await run_group(
            "streams", production_cases(), url=url, rounds=args.rounds, seconds=args.seconds,
            counting_proxy=counting, progress=lambda m: print(m, flush=True),
        )  # fmt: skip
    finally:
        await settle_and_close(counting)
    print_table("streams: production", produced)

    n = args.stream_messages
    samples: dict[str, list[float]] = {name: [] for name in TRIALS}
    ratios: dict[str, list[float]] = {name: [] for name in TRIALS}
    errors: dict[str, str] = {}
    e2e: list[float] = []
    names = list(TRIALS)
    rounds = max(1, min(args.rounds, 3))
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        rates: dict[str, float] = {}
        for name in order:
            try:
                rates[name] = n / await TRIALS[name][1](url, n)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            samples[name].append(rates[name])
        for name, (base, _) in TRIALS.items():
            if base and name in rates and rates.get(base):
                ratios[name].append(rates[name] / rates[base])
        try:
            e2e.append(await end_to_end(url))
        except Exception as exc:
            errors["end to end"] = f"{type(exc).__name__}: {exc}"[:200]
        print(f"  streams/consume round {r + 1}/{rounds} done", flush=True)
    commands: dict[str, float] = {}
    if not args.latency_ms:
        for name in ("raw XREADGROUP + XACK, 1 consumer", "ours StreamConsumer, 1 consumer"):
            try:
                commands[name] = round(await _count_per_message(server, name), 3)
            except Exception as exc:
                errors.setdefault(name, f"count failed: {exc}")

    consumed = []
    for name, (base, _) in TRIALS.items():
        values = samples[name]
        med = statistics.median(values) if values else 0.0
        consumed.append(
            {
                "case": name,
                "baseline": base,
                "median_msgs_per_s": round(med, 1),
                "spread": round((max(values) - min(values)) / med, 3) if len(values) > 1 else 0,
                "ratio": round(statistics.median(ratios[name]), 3) if ratios[name] else None,
                "samples": [round(v, 1) for v in values],
                "commands_per_message": commands.get(name),
                "error": errors.get(name),
            }
        )
    rows = [
        [c["case"], fmt_rate(c["median_msgs_per_s"]), f"{c['spread']:.0%}",
         "-" if c["ratio"] is None else f"{c['ratio']:.2f}",
         "-" if c["commands_per_message"] is None else f"{c['commands_per_message']:g}",
         c["baseline"] or "(itself)"]
        for c in consumed
    ]  # fmt: skip
    print(f"\n### streams: consumption ({n:,} messages per trial, {rounds} rounds)\n")
    print(
        markdown_table(
            ["case", "msgs/s", "spread", "ratio", "cmds/msg", "baseline"], rows, "lrrrrl"
        )
    )
    for name, error in errors.items():
        print(f"- {name}: {error}")

    reference = _reference(produced, consumed, e2e)
    print("\n### streams: against the reference expectations (target: 10x each)\n")
    rows = [
        [r["expectation"], r["reference"], r["measured"], f"{r['times']:.1f}x",
         "yes" if r["met"] else "no"]
        for r in reference
    ]  # fmt: skip
    header = ["expectation", "reference", "measured", "x reference", "10x met"]
    print(markdown_table(header, rows, "lllrl"))
    return {
        "production": [x.as_dict() for x in produced],
        "consumption": consumed,
        "end_to_end_1000_s": [round(v, 4) for v in e2e],
        "reference": reference,
    }


def _reference(
    produced: list[CaseResult], consumed: list[dict[str, Any]], e2e: list[float]
) -> list[dict[str, Any]]:
    def rate(name: str, shape: str) -> float:
        found = [r for r in produced if r.name == name and r.shape == shape and r.samples]
        return found[0].median if found else 0.0

    rows: list[dict[str, Any]] = []

    def add(expectation: str, reference: str, measured: str, times: float) -> None:
        rows.append(
            {
                "expectation": expectation,
                "reference": reference,
                "measured": measured,
                "times": round(times, 2),
                "met": times >= 10,
            }
        )

    single_seq = rate("ours StreamProducer.add", "seq")
    single_c50 = rate("ours StreamProducer.add", "c50")
    batch_seq = rate("ours add_many(100) (msgs/s)", "seq")
    if single_seq:
        add("single publish, one task (latency)", "< 1 ms",
            f"{1e3 / single_seq:.3f} ms", single_seq / 1e3)  # fmt: skip
    if single_c50:
        add("single publish, 50 tasks (per message)", "< 1 ms",
            f"{1e3 / single_c50:.3f} ms", single_c50 / 1e3)  # fmt: skip
    if batch_seq:
        add("100-message batch, one task", "< 10 ms",
            f"{1e3 * BATCH / batch_seq:.2f} ms", batch_seq / 1e4)  # fmt: skip
    for c in consumed:
        if c["case"].startswith("ours") and c["median_msgs_per_s"]:
            per_1000 = 1e3 / c["median_msgs_per_s"] * 1e3
            add(f"1,000 messages consumed+acked: {c['case'][5:]}", "< 500 ms",
                f"{per_1000:.0f} ms", 500 / per_1000)  # fmt: skip
    if e2e:
        med = statistics.median(e2e) * 1e3
        add("1,000 messages produced, consumed and acked (end to end)", "< 500 ms",
            f"{med:.0f} ms", 500 / med)  # fmt: skip
    return rows
