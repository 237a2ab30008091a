"""Fault-injection harness: demo routes on a Redis topology, a workload, and its verdict.

A fault test builds an app from some demo capability modules (``service_app``)
on a ``FaultTarget`` (standalone, Cluster or Sentinel; see ``conftest.py``),
starts it with its lifespan so the global client is built from settings exactly
as in production (``FAULT_SETTINGS``: short socket/connect timeouts, one retry,
a fast breaker), then runs a ``Workload``: a few concurrent workers per
``Probe`` send requests in a loop while the test breaks Redis. Every answer is
judged by the probe: *healthy* (what a working Redis gives), *degraded* (the
documented answer while Redis is unreachable: 503 problem+json for fail-closed
services, the origin's answer for fail-open ones) or *bad* (anything else: a
500, an unhandled exception, a request that did not finish within
``REQUEST_BOUND``). A fault test passes when nothing was bad and the probes are
healthy again afterwards without restarting the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import ModuleType
from typing import Any, Literal, TypeVar

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from starlette.types import ASGIApp

from app.api.problems import PROBLEM_CONTENT_TYPE, install_problem_handlers
from app.api.routes import health
from app.core import redis as core_redis
from app.core.config import FailureMode
from app.core.redis import AnyRedis, CircuitBreaker, breaker_for, redis_lifespan
from app.middleware.stack import install_toolkit
from app.testing.fault_targets import FaultTarget, Proxies
from app.testing.waiting import DEFAULT_DEADLINE, eventually

T = TypeVar("T")

__all__ = [
    "FAULT_SETTINGS",
    "REQUEST_BOUND",
    "ROOMY_TIMEOUTS",
    "Observation",
    "Probe",
    "Workload",
    "admin_client",
    "app_breaker",
    "burst",
    "connected_clients",
    "is_problem",
    "is_unavailable",
    "lose_one_reply",
    "new_client",
    "no_connection_left",
    "on_every_node",
    "service_app",
    "topology_connections",
]

FAULT_SETTINGS: dict[str, Any] = {
    "redis_socket_timeout": 0.25,
    "redis_connect_timeout": 0.25,
    "redis_retry_attempts": 1,
    "redis_retry_backoff_base": 0.01,
    "redis_retry_backoff_cap": 0.05,
    "redis_pool_timeout": 1.0,
    "redis_init_timeout": 5,
    "breaker_failure_threshold": 3,
    "breaker_reset_timeout": 0.2,
    "secret_key": "fault-tests-" + "k" * 40,
}
"""Settings of every fault test: each Redis call is bounded by 0.25 s (x2 with the retry)."""

ROOMY_TIMEOUTS = {"redis_socket_timeout": 2.0, "redis_connect_timeout": 2.0}
"""For tests whose subject is a dead connection or a lost script, not a slow server: a
reconnect (on Sentinel after a master lookup) or an EVAL after NOSCRIPT, through the
threaded proxy, can pass the fault suite's 0.25 s budget on a busy machine, and the
request then fails on the timeout instead of showing what the test is about."""

REQUEST_BOUND = 5.0
"""No request may take longer than this (a generous bound: it proves "no hang", not speed)."""

Verdict = Literal["healthy", "degraded", "bad"]


def is_problem(response: httpx.Response, status: int) -> bool:
    """True for an RFC 9457 answer with this status (and no stack trace: a JSON body)."""
    if response.status_code != status:
        return False
    if not response.headers.get("content-type", "").startswith(PROBLEM_CONTENT_TYPE):
        return False
    body = response.json()
    return isinstance(body, dict) and body.get("status") == status and "Traceback" not in str(body)


def is_unavailable(response: httpx.Response) -> bool:
    """The fail-closed answer: 503 problem+json with ``Retry-After``."""
    return is_problem(response, 503) and "retry-after" in response.headers


@dataclass(frozen=True)
class Probe:
    """One service as a fault test drives it through its demo routes.

    ``send`` makes one request (``state`` is per worker: cookies, counters);
    ``healthy``/``degraded`` classify an answer; ``works`` asserts, on a fresh
    client (and with the app at hand), that the service fully works: writes
    persist, entries are served, subscribers receive, consumers consume.
    """

    name: str
    modules: tuple[ModuleType, ...]
    failure: FailureMode
    send: Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[httpx.Response]]
    healthy: Callable[[httpx.Response], bool]
    degraded: Callable[[httpx.Response], bool]
    works: Callable[[httpx.AsyncClient, FastAPI], Awaitable[None]]
    script: str | None = None
    """The Lua script (a file in a ``lua/`` under ``app/services``) that ``send`` runs once warm."""
    settings: Mapping[str, object] = field(default_factory=dict)
    """Settings this probe runs with (e.g. a failure mode)."""
    cycle: int = 1
    """Requests a worker sends before it repeats one (the HTTP cache probe cycles over four
    URLs): until each was answered once, a working service may rightly answer the next one
    otherwise (the first request for a URL is a cache MISS)."""
    describe: Callable[[httpx.Response], str] | None = None
    """What to record of an answer that is not healthy (default: status, type and body)."""

    def app(self) -> FastAPI:
        """The app this probe drives: its demo modules only."""
        return service_app(*self.modules)

    def judge(self, response: httpx.Response) -> Verdict:
        if self.healthy(response):
            return "healthy"
        if self.degraded(response):
            return "degraded"
        return "bad"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Observation:
    probe: str
    phase: str  # when the request started
    end_phase: str  # when its answer came
    verdict: Verdict
    status: int | None
    elapsed: float
    detail: str = ""


def service_app(*modules: ModuleType) -> FastAPI:
    """An app wired like ``create_app()`` but with only these capability modules."""

    @asynccontextmanager
    async def capabilities(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for module in modules:
                if module.lifespan is not None:
                    await stack.enter_async_context(module.lifespan(app))
            yield

    app = FastAPI(lifespan=redis_lifespan(capabilities), title="fault test")
    install_problem_handlers(app)
    app.include_router(health.router)
    for module in modules:
        app.include_router(module.router)
        module.setup(app)
    install_toolkit(app)  # as create_app() does: the toolkit's middleware in the safe order
    return app


def new_client(app: ASGIApp) -> httpx.AsyncClient:
    """An httpx client over ASGI that keeps no cookies (probes manage their own).

    Unhandled app exceptions propagate (``raise_app_exceptions``): in production
    they would be a 500 with a stack trace, so the workload records them as bad.
    """
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://testserver",
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


async def burst(probe: Probe, client: httpx.AsyncClient, states: list[dict[str, Any]]) -> set[str]:
    """One request per worker state, all at once; the set of their verdicts."""
    async with asyncio.timeout(REQUEST_BOUND):
        answers = await asyncio.gather(*(probe.send(client, state) for state in states))
    return {probe.judge(r) for r in answers}


def app_breaker() -> CircuitBreaker:
    """The breaker of the app's global client."""
    assert core_redis.redis_client is not None, "the app is not started"
    return breaker_for(core_redis.redis_client)


def admin_client(target: FaultTarget) -> AnyRedis:
    """A client of the test's own on *target* (5 s timeouts), past the proxies where it can be.

    Cluster: started from the nodes themselves; the slot map it loads names the
    proxies (the nodes announce them), so it is only for steps without a fault.
    """
    if target.kind == "cluster":
        nodes = [ClusterNode(n.host, n.port) for n in target.nodes]
        return RedisCluster(startup_nodes=nodes, socket_timeout=5)
    return Redis.from_url(target.node_urls()[0], socket_timeout=5)


async def on_every_node(target: FaultTarget, command: Callable[[Redis], Awaitable[T]]) -> list[T]:
    """Run *command* on a direct connection to each data node of *target*; their answers."""
    answers = []
    for url in target.node_urls():
        node = Redis.from_url(url, socket_timeout=5)
        try:
            answers.append(await command(node))
        finally:
            await node.aclose()
    return answers


def topology_connections(target: FaultTarget) -> int:
    """Connections a healthy client may hold to one node beyond its pool.

    On Cluster, redis-py refreshes the slot map through its startup nodes, which
    keep ``ClusterNode`` objects (and a connection) of their own beside the ones
    commands use: one more connection to whichever node answered the refresh.
    """
    return 1 if target.kind == "cluster" else 0


async def connected_clients(target: FaultTarget) -> int:
    """The most connections the app holds to one data node (the asker and sentinels not counted)."""

    async def app_connections(node: Redis) -> int:
        clients = await node.client_list()
        mine = await node.client_id()
        return sum(
            1
            for c in clients
            if int(c["id"]) != mine and not str(c.get("name", "")).startswith("sentinel-")
        )

    return max(await on_every_node(target, app_connections))


async def no_connection_left(target: FaultTarget) -> None:
    """Wait until no app connection is left on any data node (after the app shut down).

    Exact where a count under load can only be bounded: a connection that no pool
    owns any more (leaked across a restart, say) is not closed by the shutdown.
    """

    async def none_left() -> bool:
        return await connected_clients(target) == 0

    await eventually(none_left, "every app connection closed after the app shut down")


async def lose_one_reply(
    proxy: Proxies, marker: bytes, call: Awaitable[httpx.Response]
) -> httpx.Response:
    """*call*'s answer when the reply to its command containing *marker* was lost once.

    The command reached Redis, which ran it; its reply never came back and the
    connection broke, so the client library retried it on a new connection.
    """
    lost = proxy.lost
    proxy.arm(marker)
    try:
        response = await call
    finally:
        proxy.arm(None)
    assert proxy.lost == lost + 1, "the armed command never went through the proxy"
    return response


@dataclass
class Workload:
    """Concurrent workers per probe, sending requests in a loop until the block ends.

    ``phase`` labels the requests started from now on; ``observations`` keeps every answer.
    """

    app: ASGIApp
    probes: Sequence[Probe]
    workers: int = 3
    pause: float = 0.005
    phase: str = "before"
    observations: list[Observation] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    async def __aenter__(self) -> Workload:
        for probe in self.probes:
            for _ in range(self.workers):
                client = new_client(self.app)
                self._clients.append(client)
                self._tasks.append(asyncio.create_task(self._worker(probe, client)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            async with asyncio.timeout(REQUEST_BOUND * 2):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            for client in self._clients:
                await client.aclose()

    async def _worker(self, probe: Probe, client: httpx.AsyncClient) -> None:
        state: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            phase, started = self.phase, loop.time()
            status: int | None = None
            detail = ""
            try:
                async with asyncio.timeout(REQUEST_BOUND):
                    response = await probe.send(client, state)
                status = response.status_code
                verdict = probe.judge(response)
                if verdict != "healthy":
                    detail = (
                        probe.describe(response)
                        if probe.describe is not None
                        else f"{status} {response.headers.get('content-type')} "
                        f"{response.text[:200]}"
                    )
            except TimeoutError:
                verdict, detail = "bad", f"no answer within {REQUEST_BOUND}s (hung)"
            except Exception as exc:  # an unhandled app exception: a 500 with a stack trace
                verdict, detail = "bad", f"unhandled {type(exc).__name__}: {exc}"
            self.observations.append(
                Observation(
                    probe.name, phase, self.phase, verdict, status, loop.time() - started, detail
                )
            )
            await asyncio.sleep(self.pause)

    # -- reading the record ------------------------------------------------------

    def answers(
        self, *, probe: Probe | None = None, phase: str | None = None, whole: bool = False
    ) -> list[Observation]:
        """Answers to requests started in *phase* (``whole``: and answered in it too)."""
        return [
            o
            for o in self.observations
            if (probe is None or o.probe == probe.name)
            and (phase is None or o.phase == phase)
            and (not whole or o.end_phase == o.phase)
        ]

    def healthy_streak(self, probe: Probe) -> int:
        streak = 0
        for o in reversed(self.answers(probe=probe)):
            if o.verdict != "healthy":
                break
            streak += 1
        return streak

    def all_recovered(self, streak: int) -> bool:
        return all(self.healthy_streak(p) >= streak for p in self.probes)

    async def until_recovered(self, *, streak: int = 6, timeout: float = DEFAULT_DEADLINE) -> None:
        await eventually(
            lambda: self.all_recovered(streak),
            f"{streak} healthy answers in a row from each of {[p.name for p in self.probes]}; "
            f"last answers: {self.observations[-6:]}",
            timeout=timeout,
        )

    async def until_warm(self, *, timeout: float = DEFAULT_DEADLINE) -> None:
        """Until every request each worker cycles through was answered healthy at least once.

        ``workers x cycle`` healthy answers in a row: by pigeonhole one worker gave ``cycle``
        of them in a row, one for each request of its cycle (every worker sends the same
        cycle). A shorter streak can come from workers that lag behind and get HITs on
        URLs already stored while a URL of the cycle is still uncached, and the next
        request for that URL is then rightly a MISS (``app.middleware.http_cache``:
        "Miss ... the origin answers; a storable response is stored").
        """
        cycle = max(p.cycle for p in self.probes)
        await self.until_recovered(streak=max(3, self.workers * cycle), timeout=timeout)

    async def until_answers(self, n: int, *, phase: str, timeout: float = DEFAULT_DEADLINE) -> None:
        def enough() -> bool:
            return all(len(self.answers(probe=p, phase=phase)) >= n for p in self.probes)

        await eventually(enough, f"{n} answers per probe in phase {phase!r}", timeout=timeout)

    def assert_nothing_bad(self) -> None:
        bad = [o for o in self.observations if o.verdict == "bad"]
        assert not bad, f"{len(bad)} bad answers, e.g. {bad[:5]}"

    def assert_outage_answers(self, phase: str) -> None:
        """During *phase* (Redis unreachable) each probe gave its documented answer.

        Fail-closed probes: at least one 503 problem+json, and nothing but 503 or
        a healthy answer (a request may finish before the fault bites).
        Fail-open probes: every answer is a success (2xx): the service kept answering.
        """
        for probe in self.probes:
            seen = self.answers(probe=probe, phase=phase)
            assert seen, f"{probe}: no answers during {phase}"
            if probe.failure == "closed":
                assert any(o.verdict == "degraded" for o in seen), (
                    f"{probe}: fail-closed but never answered 503 during {phase}: {seen[:5]}"
                )
            else:
                statuses = {o.status for o in seen}
                assert all(s is not None and 200 <= s < 300 for s in statuses), (
                    f"{probe}: fail-open but answered {statuses} during {phase}"
                )
