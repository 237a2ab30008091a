"""HTTP end to end: small FastAPI apps under uvicorn (uvloop + httptools, one worker,
no access log), loaded by ``wrk`` at 1 and at 50 connections.

Each app (``bench/apps/``) runs in its own uvicorn process on a free loopback
port. Every ratio divides an endpoint's requests/s by the plain app's
``/bare`` measured in the same round at the same connection count; each
app's own ``/bare`` shows what its app-wide middleware costs a route that does
not use it. Rounds rotate the order of the endpoints.

Before the timed runs, each app is started once more with its Redis traffic
through a counting proxy: every endpoint answers 50 sequential requests
there, which gives the Redis commands per request and checks that every
answer is 2xx with the expected cache or replay header. The idempotent POST
runs twice: with a fresh ``Idempotency-Key`` per request (claim, handler,
store) and with one key stored before the run (every request a replay).
Every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis

from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer, free_port
from bench.report import fmt_rate, markdown_table

ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).resolve().parents[1] / "apps" / "idempotency.lua"
BODY = b'{"amount": 1}'

APPS = {
    "plain": "bench.apps.plain:app",
    "ours": "bench.apps.ours:app",
    "ours-stateful": "bench.apps.ours_stateful:app",
    "ours-session-auto": "bench.apps.ours_session_auto:app",
    "fastapi-cache2": "bench.apps.peer_fastapi_cache2:app",
    "fastapi-limiter": "bench.apps.peer_fastapi_limiter:app",
    "fastapi-redis-sdk": "bench.apps.peer_fastapi_redis_sdk:app",
}
BARE = "plain /bare"
ONE_GET = "ours /redis (one GET, toolkit client)"


@dataclass
class Endpoint:
    name: str
    app: str
    path: str
    method: str = "GET"
    mode: str | None = None  # idempotency: "fresh" or "same"
    expect: tuple[str, str] | None = None  # a response header the cached answer must carry
    compare: str | None = None  # a second baseline (the one-GET endpoint)
    session: bool = False


ENDPOINTS = [
    Endpoint(BARE, "plain", "/bare"),
    Endpoint("plain /redis (one GET, redis.asyncio)", "plain", "/redis"),
    Endpoint("ours /bare", "ours", "/bare"),
    Endpoint(ONE_GET, "ours", "/redis"),
    Endpoint("ours /redis-dep (one GET, client from RedisDep)", "ours", "/redis-dep",
             compare=ONE_GET),
    Endpoint("ours /cached (@cached, Redis hit)", "ours", "/cached", compare=ONE_GET),
    Endpoint("ours /cached-local (@cached, local-tier hit)", "ours", "/cached-local", compare=ONE_GET),
    Endpoint("ours /http-cached (response cache, Redis hit)", "ours", "/http-cached",
             expect=("x-cache", "HIT"), compare=ONE_GET),
    Endpoint("ours /limited (1 policy)", "ours", "/limited", compare=ONE_GET),
    Endpoint("ours /limited3 (3 policies)", "ours", "/limited3", compare=ONE_GET),
    Endpoint("ours-stateful /bare (session + idempotency middleware)", "ours-stateful", "/bare"),
    Endpoint("ours-stateful /session (session read)", "ours-stateful", "/session",
             session=True, compare=ONE_GET),
    Endpoint("ours-session-auto /session (autoload, request.session, no dependency)",
             "ours-session-auto", "/session", session=True, compare=ONE_GET),
    Endpoint("ours-stateful POST /idem, fresh key per request", "ours-stateful", "/idem",
             method="POST", mode="fresh", compare=ONE_GET),
    Endpoint("ours-stateful POST /idem, same key (replays)", "ours-stateful", "/idem",
             method="POST", mode="same", expect=("idempotent-replayed", "true"), compare=ONE_GET),
    Endpoint("fastapi-cache2 /cached (@cache hit)", "fastapi-cache2", "/cached",
             expect=("x-fastapi-cache", "HIT"), compare=ONE_GET),
    Endpoint("fastapi-limiter 0.2 /limited", "fastapi-limiter", "/limited", compare=ONE_GET),
    Endpoint("fastapi-limiter 0.1.6 /limited016", "fastapi-limiter", "/limited016", compare=ONE_GET),
    Endpoint("fastapi-redis-sdk /bare (its 2 middlewares)", "fastapi-redis-sdk", "/bare"),
    Endpoint("fastapi-redis-sdk /cached (cache() hit)", "fastapi-redis-sdk", "/cached",
             expect=("x-redis-cache", "HIT"), compare=ONE_GET),
    Endpoint("fastapi-redis-sdk /limited", "fastapi-redis-sdk", "/limited", compare=ONE_GET),
]  # fmt: skip


class Uvicorn:
    """One uvicorn process serving *target*; stopped by its pid."""

    def __init__(self, target: str, redis_url: str, logdir: Path) -> None:
        self.target = target
        self.port = free_port()
        self.log = logdir / f"{target.split(':')[0]}.{self.port}.log"
        env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1",
                 "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
                 "--no-access-log", "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited: {self.log.read_text()[-2000:]}")
            try:
                if request(self.port, "GET", "/bare")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.target} did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str]]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        response = c.getresponse()
        response.read()
        found = {k.lower(): v for k, v in response.getheaders()}
        return response.status, found
    finally:
        if own:
            c.close()


@dataclass
class Prepared:
    """Per-run state an endpoint needs: the session cookie, the stored idempotency key."""

    cookie: str = ""
    same_key: str = field(default_factory=lambda: "bench-same-" + os.urandom(4).hex())
    prefix: str = field(default_factory=lambda: "bench-" + os.urandom(4).hex())


def _headers(ep: Endpoint, prep: Prepared, key: str | None = None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if ep.session:
        headers["Cookie"] = prep.cookie
    if ep.mode:
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = key or (
            prep.same_key if ep.mode == "same" else f"{prep.prefix}-{os.urandom(6).hex()}"
        )
    return headers


def _prepare(port: int, prep: Prepared) -> None:
    """Log in once (the session cookie) and store the response of the replayed key."""
    status, headers = request(port, "POST", "/session/login")
    cookie = headers.get("set-cookie", "")
    if status != 200 or not cookie:
        raise RuntimeError(f"session login answered {status}, cookie {cookie!r}")
    prep.cookie = cookie.split(";", 1)[0]
    status, _ = request(port, "POST", "/idem", {"Idempotency-Key": prep.same_key}, BODY)
    if status != 200:
        raise RuntimeError(f"the first POST /idem answered {status}")


def count_and_check(
    server: RedisServer, logdir: Path, prep: Prepared, requests: int = 50
) -> dict[str, dict[str, Any]]:
    """Commands per request (through a counting proxy) and a check of every endpoint."""
    proxy = TcpProxy(server.host, server.port).start()
    found: dict[str, dict[str, Any]] = {}
    try:
        for app, target in APPS.items():
            proc = Uvicorn(target, proxy.url, logdir)
            try:
                proc.wait_ready()
                if app == "ours-stateful":
                    _prepare(proc.port, prep)
                for ep in (e for e in ENDPOINTS if e.app == app):
                    found[ep.name] = _count(proc.port, ep, prep, proxy, requests)
            except Exception as exc:
                for ep in (e for e in ENDPOINTS if e.app == app):
                    found.setdefault(ep.name, {"error": f"{type(exc).__name__}: {exc}"[:300]})
            finally:
                proc.stop()
    finally:
        time.sleep(0.2)  # the stopped apps' connections wind down before the proxy closes
        proxy.close()
    return found


def _count(
    port: int, ep: Endpoint, prep: Prepared, proxy: TcpProxy, requests: int
) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = BODY if ep.method == "POST" else None
    try:
        for _ in range(3):  # warm up: the first answer may be a miss or a first claim
            request(port, ep.method, ep.path, _headers(ep, prep), body, conn)
        proxy.commands = proxy.writes = 0
        proxy.count = True
        statuses: set[int] = set()
        last: dict[str, str] = {}
        for _ in range(requests):
            status, last = request(port, ep.method, ep.path, _headers(ep, prep), body, conn)
            statuses.add(status)
        proxy.count = False
    finally:
        conn.close()
    result: dict[str, Any] = {
        "commands_per_request": round(proxy.commands / requests, 2),
        "statuses": sorted(statuses),
    }
    if any(s >= 300 for s in statuses):
        result["error"] = f"answered {sorted(statuses)}"
    elif ep.expect and last.get(ep.expect[0], "").upper() != ep.expect[1].upper():
        result["error"] = f"{ep.expect[0]}: {last.get(ep.expect[0])!r}, expected {ep.expect[1]}"
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process *pid* has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def redis_cpu(admin: Any) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def wrk(port: int, ep: Endpoint, prep: Prepared, conns: int, seconds: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    url = f"http://127.0.0.1:{port}{ep.path}"
    if ep.session:
        cmd += ["-H", f"Cookie: {prep.cookie}"]
    if ep.mode:
        key = prep.same_key if ep.mode == "same" else f"{prep.prefix}-{os.urandom(4).hex()}"
        cmd += ["-s", str(LUA), url, "--", ep.mode, key]
    else:
        cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk gave no rate: {out[-500:]}")
    result: dict[str, Any] = {"rps": float(rps.group(1))}
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = int(total.group(1)) if total else 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = errors.group(1) if errors else ""
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    return result


async def run(*, url: str, server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        print("wrk not found: the HTTP group is skipped (make bench installs it)")
        return {"skipped": "wrk not found"}
    c1, c50 = (max(1, round(float(x))) for x in str(args.http_seconds).split(","))
    durations = {1: c1, 50: c50}
    prep = Prepared()
    logdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    print("  http: counting Redis commands per request and checking every endpoint", flush=True)
    checks = count_and_check(server, logdir, prep)

    admin = SyncRedis(host=server.host, port=server.port)
    procs: dict[str, Uvicorn] = {}
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    ratios: dict[tuple[str, int, str], list[float]] = {}
    errors: dict[str, str] = {n: c["error"] for n, c in checks.items() if "error" in c}
    try:
        for app, target in APPS.items():
            procs[app] = Uvicorn(target, url, logdir)
        for app, proc in procs.items():
            try:
                proc.wait_ready()
            except RuntimeError as exc:
                for ep in ENDPOINTS:
                    if ep.app == app:
                        errors[ep.name] = str(exc)[:300]
        live = [ep for ep in ENDPOINTS if ep.name not in errors]
        for ep in live if args.http_warmup else ():  # open the apps' pools, fill caches
            wrk(procs[ep.app].port, ep, prep, 50, args.http_warmup)
        for r in range(args.http_rounds):
            for conns in (1, 50):
                shift = r % len(live)
                rates: dict[str, float] = {}
                for ep in live[shift:] + live[:shift]:
                    pid = procs[ep.app].proc.pid
                    try:
                        app_cpu, server_cpu = process_cpu(pid), redis_cpu(admin)
                        got = wrk(procs[ep.app].port, ep, prep, conns, durations[conns])
                        n = max(1, got["requests"])
                        got["app_cpu_us"] = (process_cpu(pid) - app_cpu) / n * 1e6
                        got["redis_cpu_us"] = (redis_cpu(admin) - server_cpu) / n * 1e6
                    except Exception as exc:
                        errors[ep.name] = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    if got["non2xx"]:
                        errors[ep.name] = f"{got['non2xx']} non-2xx answers at -c{conns}"
                    samples.setdefault((ep.name, conns), []).append(got)
                    rates[ep.name] = got["rps"]
                for ep in live:
                    for base in (BARE, ep.compare):
                        if base and ep.name in rates and rates.get(base):
                            key = (ep.name, conns, base)
                            ratios.setdefault(key, []).append(rates[ep.name] / rates[base])
            print(f"  http round {r + 1}/{args.http_rounds} done", flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
        admin.close()
    shutil.rmtree(logdir, ignore_errors=True)
    return _report(checks, samples, ratios, errors, durations, args.http_rounds)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _report(
    checks: dict[str, dict[str, Any]],
    samples: dict[tuple[str, int], list[dict[str, Any]]],
    ratios: dict[tuple[str, int, str], list[float]],
    errors: dict[str, str],
    durations: dict[int, int],
    rounds: int,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for conns in (1, 50):
        for ep in ENDPOINTS:
            got = samples.get((ep.name, conns), [])
            rps = [g["rps"] for g in got]
            med = _median(rps)
            vs_bare = _median(ratios.get((ep.name, conns, BARE), []))
            vs_get = _median(ratios.get((ep.name, conns, ep.compare), [])) if ep.compare else None
            rows.append(
                {
                    "endpoint": ep.name,
                    "conns": conns,
                    "median_rps": round(med, 1) if med else None,
                    "spread": round((max(rps) - min(rps)) / med, 3) if med and len(rps) > 1 else 0,
                    "ratio_vs_bare": None if vs_bare is None else round(vs_bare, 3),
                    "ratio_vs_one_get": None if vs_get is None else round(vs_get, 3),
                    "extra_us_vs_bare": None,
                    "p50_ms": _median([g["p50_ms"] for g in got if g["p50_ms"] is not None]),
                    "p99_ms": _median([g["p99_ms"] for g in got if g["p99_ms"] is not None]),
                    "app_cpu_us": _rounded(_median([g["app_cpu_us"] for g in got])),
                    "redis_cpu_us": _rounded(_median([g["redis_cpu_us"] for g in got])),
                    "samples": rps,
                    "commands_per_request": checks.get(ep.name, {}).get("commands_per_request"),
                    "error": errors.get(ep.name),
                }
            )
    bare = {row["conns"]: row["median_rps"] for row in rows if row["endpoint"] == BARE}
    for row in rows:
        if row["median_rps"] and bare.get(row["conns"]):
            row["extra_us_vs_bare"] = round(1e6 / row["median_rps"] - 1e6 / bare[row["conns"]], 1)
    table = [
        [row["endpoint"], str(row["conns"]),
         fmt_rate(row["median_rps"]) if row["median_rps"] else "-", f"{row['spread']:.0%}",
         "-" if row["ratio_vs_bare"] is None else f"{row['ratio_vs_bare']:.2f}",
         "-" if row["ratio_vs_one_get"] is None else f"{row['ratio_vs_one_get']:.2f}",
         "-" if row["extra_us_vs_bare"] is None else f"{row['extra_us_vs_bare']:+.0f}",
         "-" if row["p50_ms"] is None else f"{row['p50_ms']:.2f}",
         "-" if row["p99_ms"] is None else f"{row['p99_ms']:.2f}",
         "-" if row["app_cpu_us"] is None else f"{row['app_cpu_us']:.0f}",
         "-" if row["redis_cpu_us"] is None else f"{row['redis_cpu_us']:.0f}",
         "-" if row["commands_per_request"] is None else f"{row['commands_per_request']:g}"]
        for row in rows
    ]  # fmt: skip
    print(
        f"\n### http (wrk -t1, -c1 for {durations[1]} s and -c50 for {durations[50]} s, {rounds} rounds)\n"
    )
    header = ["endpoint", "conns", "req/s", "spread", "vs /bare", "vs one GET", "extra µs",
              "p50 ms", "p99 ms", "app CPU µs", "Redis CPU µs", "cmds/req"]  # fmt: skip
    print(markdown_table(header, table, "lrrrrrrrrrrr"))
    for name, error in errors.items():
        print(f"- {name}: {error}")
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "wrk": (version.stdout or version.stderr).splitlines()[0] if version else "",
        "durations": durations,
        "rounds": rounds,
        "endpoints": rows,
        "checks": checks,
    }
