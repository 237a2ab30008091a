"""Soak test: the demo service under mixed load for a bounded time, then four checks.

    python scripts/soak.py [--seconds 60] [--concurrency 16]      (make soak)

It starts a private ``redis-server`` and the demo (``uvicorn app.main:app``,
``APP_ENV=production``, one worker) pointed at it, drives every capability
with an httpx load generator (bounded concurrency and duration), then checks:

1. **Memory is flat**: the median RSS of the app process over the second half
   of the run is within ``--rss-tolerance`` (default 10 %, and never less than
   ``--rss-floor-mb``, default 8 MB) of the first half's (the first 20 % of the
   run is warm-up and not compared).
2. **Redis connections are stable**: the most connections the server held in
   the second half is at most the first half's peak plus ``--conn-slack`` (2).
3. **Every key the toolkit promised a TTL has one**: SCAN + TTL over the key
   prefix; keys documented as persistent are allowlisted (``PERSISTENT``).
4. **Nothing was logged at ERROR** (or a traceback) on the app's stderr, and no
   response was a 5xx.

It prints the figures and exits 1 when a check fails, 2 when it could not run.
Only processes it started are stopped (by pid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from app.testing.servers import RedisServer, free_port  # noqa: E402

PREFIX = "soak"
PERSISTENT = {
    # Streams are durable queues: the stream and its dead letters live until trimmed
    # (maxlen on XADD), never by TTL (docs/streams.md).
    re.compile(rf"^{PREFIX}:stream:\{{[^}}]*\}}$"): "stream (trimmed by MAXLEN, not expired)",
    re.compile(rf"^{PREFIX}:stream:\{{[^}}]*\}}:dlq$"): "dead-letter stream (kept for inspection)",
}
"""Keys documented as persistent (pattern -> why); any other key without a TTL fails."""

LOG_ERROR = re.compile(r"^(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")

Action = Callable[[httpx.AsyncClient, "Worker"], Awaitable[httpx.Response]]


@dataclass
class Worker:
    """Per-worker state: its session cookie and the idempotency keys it may replay."""

    rng: random.Random
    cookie: str | None = None
    keys: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"cookie": f"session={self.cookie}"} if self.cookie else {}

    def remember(self, response: httpx.Response) -> None:
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            if name.strip() == "session":
                value = rest.split(";", 1)[0]
                self.cookie = None if "Max-Age=0" in rest or not value else value


# -- the mixed load: (weight, action) per capability ------------------------------


async def session_counter(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    r = await c.post("/session/counter", headers=w.headers())
    w.remember(r)
    return r


async def session_login_logout(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    r = await c.post(
        "/session/login", json={"user": f"u{w.rng.randrange(50)}"}, headers=w.headers()
    )
    w.remember(r)
    if w.rng.random() < 0.5:
        r = await c.post("/session/logout", headers=w.headers())
        w.remember(r)
    return r


async def payment(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    if w.keys and w.rng.random() < 0.3:
        key = w.rng.choice(w.keys)  # a retry: replayed
    else:
        key = f'"{uuid.uuid4()}"'
        w.keys = [*w.keys[-20:], key]
    return await c.post("/payments", json={"amount": 100}, headers={"Idempotency-Key": key})


async def http_cache_read(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.get(f"/http-cache/items/{w.rng.randrange(40)}")


async def http_cache_write(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.put(f"/http-cache/items/{w.rng.randrange(40)}")


async def cache_item(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    key = f"k{w.rng.randrange(200)}"
    if w.rng.random() < 0.3:
        return await c.put(f"/cache/items/{key}", json={"value": {"n": key}, "ttl": 5})
    return await c.get(f"/cache/items/{key}")


async def cache_user(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.get(f"/cache/users/{w.rng.randrange(30)}")


async def rate_limited(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.get("/limits/user", headers={"X-User": f"u{w.rng.randrange(100)}"})


async def rate_limited_stacked(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.get("/limits/stacked")


async def publish(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.post(f"/publish/room{w.rng.randrange(5)}", json={"t": time.time()})


async def produce(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.post("/streams/events", json={"payload": {"n": w.rng.randrange(1000)}})


async def job(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.post(f"/jobs/j{w.rng.randrange(20)}/run", params={"seconds": 0})


async def healthz(c: httpx.AsyncClient, w: Worker) -> httpx.Response:
    return await c.get("/healthz")


MIX: list[tuple[int, str, Action]] = [
    (12, "/session/counter", session_counter),
    (3, "/session/login", session_login_logout),
    (10, "/payments", payment),
    (14, "/http-cache/items/{item_id}", http_cache_read),
    (2, "/http-cache/items/{item_id}", http_cache_write),
    (12, "/cache/items/{key}", cache_item),
    (6, "/cache/users/{user_id}", cache_user),
    (10, "/limits/user", rate_limited),
    (4, "/limits/stacked", rate_limited_stacked),
    (6, "/publish/{channel}", publish),
    (6, "/streams/events", produce),
    (4, "/jobs/{job_id}/run", job),
    (1, "/healthz", healthz),
]
"""(weight, OpenAPI path it needs, action): actions whose route the app lacks are skipped."""


# -- measuring ------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)


async def sample(
    pid: int, admin: Redis, samples: Samples, start: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        samples.times.append(time.monotonic() - start)
        samples.rss.append(rss_bytes(pid))
        samples.connections.append(len(await admin.client_list()) - 1)  # minus this one
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def load(
    base_url: str, seconds: float, concurrency: int, seed: int, mix: list[tuple[int, Action]]
) -> tuple[Counter[str], Counter[int], list[str]]:
    weights = [w for w, _ in mix]
    actions = [a for _, a in mix]
    outcomes: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    # Idle connections are dropped by the client (2 s) before uvicorn closes them (5 s), so a
    # request never races the server's keep-alive timeout on a reused connection.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as client:

        async def worker(n: int) -> None:
            state = Worker(random.Random(seed * 1000 + n))
            while time.monotonic() < deadline:
                action = state.rng.choices(actions, weights)[0]
                try:
                    response = await action(client, state)
                except httpx.HTTPError as exc:
                    outcomes["transport error"] += 1
                    failures.append(f"{action.__name__}: {type(exc).__name__}: {exc}")
                    continue
                statuses[response.status_code] += 1
                outcomes[action.__name__] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{action.__name__}: {response.status_code} {response.text[:200]}"
                    )

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return outcomes, statuses, failures


async def keys_without_ttl(admin: Redis) -> tuple[int, list[str], Counter[str]]:
    scanned, missing, allowed = 0, [], Counter[str]()
    async for raw in admin.scan_iter(match=f"{PREFIX}:*", count=1000):
        scanned += 1
        key = raw.decode("utf-8", "replace")
        if await admin.ttl(raw) != -1:
            continue
        reason = next((why for rx, why in PERSISTENT.items() if rx.match(key)), None)
        if reason is None:
            missing.append(key)
        else:
            allowed[reason] += 1
    return scanned, missing, allowed


def halves(samples: Samples, warmup: float) -> tuple[list[int], list[int], list[int], list[int]]:
    end = samples.times[-1] if samples.times else 0.0
    start = end * warmup
    middle = start + (end - start) / 2
    first = [i for i, t in enumerate(samples.times) if start <= t < middle]
    second = [i for i, t in enumerate(samples.times) if t >= middle]
    return (
        [samples.rss[i] for i in first],
        [samples.rss[i] for i in second],
        [samples.connections[i] for i in first],
        [samples.connections[i] for i in second],
    )


# -- running the service ----------------------------------------------------------------


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "WARNING", "handlers": ["stderr"]},
    "loggers": {"uvicorn.access": {"level": "WARNING"}},
}


def start_app(redis_url: str, port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log_config = workdir / "log.json"
    log_config.write_text(json.dumps(LOG_CONFIG))
    stderr_path = workdir / "app.stderr"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": PREFIX,
        "APP_ENV": "production",
        "DEMO_DESTRUCTIVE_ROUTES": "true",  # the soak drives POST /publish
        "SECRET_KEY": "soak-" + uuid.uuid4().hex + uuid.uuid4().hex,
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable, "-m", "uvicorn", "app.main:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-config", str(log_config),
    ]  # fmt: skip
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    return proc, stderr_path


async def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited at start with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the app did not answer /healthz within {timeout}s")


def stop_app(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def soak(args: argparse.Namespace) -> int:
    server = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc, stderr_path = start_app(server.url, port, workdir)
    admin = Redis.from_url(server.url)
    try:
        await wait_ready(base_url, proc)
        schema = httpx.get(f"{base_url}/openapi.json", timeout=10).json()
        mix = [(w, a) for w, path, a in MIX if path in schema["paths"]]
        skipped = [path for _, path, _ in MIX if path not in schema["paths"]]
        print(f"soak: {args.seconds:g}s, {args.concurrency} concurrent clients, "
              f"{len(mix)} request kinds (app pid {proc.pid}, redis {server.address})")  # fmt: skip
        if skipped:
            print(f"  routes not in this build, skipped: {', '.join(sorted(set(skipped)))}")
        samples, stop = Samples(), asyncio.Event()
        sampler = asyncio.create_task(sample(proc.pid, admin, samples, time.monotonic(), stop))
        started = time.monotonic()
        outcomes, statuses, failures = await load(
            base_url, args.seconds, args.concurrency, args.seed, mix
        )
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
        scanned, missing, allowed = await keys_without_ttl(admin)
    finally:
        await admin.aclose()
        stop_app(proc)
        server.cleanup()
    log_lines = stderr_path.read_text(errors="replace").splitlines()
    errors = [line for line in log_lines if LOG_ERROR.search(line)]
    warnings = [line for line in log_lines if line.startswith("WARNING")]
    return report(args, elapsed, outcomes, statuses, failures, samples, scanned, missing,
                  allowed, errors, warnings)  # fmt: skip


def report(
    args: argparse.Namespace,
    elapsed: float,
    outcomes: Counter[str],
    statuses: Counter[int],
    failures: list[str],
    samples: Samples,
    scanned: int,
    missing: list[str],
    allowed: Counter[str],
    errors: list[str],
    warnings: list[str],
) -> int:
    mb = 1024 * 1024
    total = sum(statuses.values())
    print(f"\nrequests: {total} in {elapsed:.1f}s ({total / elapsed:.0f}/s)")
    print("  statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print("  by kind:  " + ", ".join(f"{k}: {n}" for k, n in outcomes.most_common()))
    rss1, rss2, conn1, conn2 = halves(samples, 0.2)
    ok = True

    def check(passed: bool, line: str) -> None:
        nonlocal ok
        ok &= passed
        print(f"  [{'ok' if passed else 'FAIL'}] {line}")

    print("\nchecks:")
    check(not failures, f"no 5xx and no transport errors ({len(failures)})")
    for failure in failures[:5]:
        print(f"         {failure}")
    if rss1 and rss2:
        m1, m2 = statistics.median(rss1), statistics.median(rss2)
        allowed_growth = max(m1 * args.rss_tolerance, args.rss_floor_mb * mb)
        check(
            m2 - m1 <= allowed_growth,
            f"memory flat: app RSS median {m1 / mb:.1f} MB -> {m2 / mb:.1f} MB "
            f"({(m2 - m1) / mb:+.1f} MB; tolerance {allowed_growth / mb:.1f} MB = "
            f"max({args.rss_tolerance:.0%}, {args.rss_floor_mb} MB)); "
            f"min/max {min(samples.rss) / mb:.1f}/{max(samples.rss) / mb:.1f} MB",
        )
        peak1, peak2 = max(conn1), max(conn2)
        check(
            peak2 <= peak1 + args.conn_slack,
            f"Redis connections stable: peak {peak1} in the first half, {peak2} in the second "
            f"(slack {args.conn_slack}); min/max over the run {min(samples.connections)}/"
            f"{max(samples.connections)}",
        )
    else:
        check(False, "too few samples to compare halves (run longer)")
    check(
        not missing,
        f"every key has a TTL unless documented persistent: {scanned} keys scanned, "
        f"{len(missing)} without TTL" + (f", allowlisted: {dict(allowed)}" if allowed else ""),
    )
    for key in missing[:10]:
        print(f"         no TTL: {key}")
    check(
        not errors, f"no error logged by the app ({len(errors)} errors, {len(warnings)} warnings)"
    )
    for line in errors[:10]:
        print(f"         {line}")
    print("\nsoak " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the load mix")
    parser.add_argument(
        "--rss-tolerance", type=float, default=0.10, help="RSS growth allowed (0.10)"
    )
    parser.add_argument(
        "--rss-floor-mb", type=float, default=8.0, help="RSS growth always allowed (8 MB)"
    )
    parser.add_argument("--conn-slack", type=int, default=2, help="extra connections allowed (2)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1:
        parser.error("--seconds must be > 0 and --concurrency >= 1")
    try:
        return asyncio.run(soak(args))
    except (RuntimeError, OSError) as exc:
        print(f"soak could not run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
