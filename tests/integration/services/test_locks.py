"""RedisLock on real servers: exclusion across processes, contract, fencing, extend,
watchdog, wake-ups, the fair queue, cancellation, and the FastAPI dependency.

Tests taking ``redis`` run on every topology (``topology_client``: standalone, a
3-primary Cluster and Sentinel, clients built as the app builds them; decoded
replies on standalone and Cluster); those taking ``topology_redis`` run on the
three topologies with the app's client. The rest need a standalone server of
their own (several OS processes, a reply-delaying proxy, the demo app).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.api.deps import request_lock
from app.api.problems import install_problem_handlers
from app.api.routes import locks as lock_routes
from app.core.errors import LockLost, LockNotOwned
from app.core.redis import is_cluster
from app.services.locks import RedisLock, fenced_write
from app.testing.clients import ready, twin
from app.testing.plugin import AppClientFactory, RedisServerInfo
from app.testing.waiting import DEFAULT_DEADLINE, cancel_after, eventually
from tests.integration.services import _locks_worker as worker

ROOT = Path(__file__).resolve().parents[3]  # the checkout under test

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(topology_client: Any) -> Any:
    """A client of the topology (flushed per test), as the app builds it, or its decoded twin."""
    return topology_client


async def _expired(lock: RedisLock) -> None:
    """Wait until nobody holds *lock*'s key (its lease ran out, or it was released)."""

    async def free() -> bool:
        return not await lock.locked()

    await eventually(free, f"lock {lock.name!r} to be free")


async def _renewed_through(lease: Any, leases: int) -> None:
    """Wait (real time: Redis's TTL must really pass) until *lease*'s watchdog has kept it
    for *leases* lease lengths: a renewal sent that long after the hold began was confirmed."""
    start = lease.deadline

    def kept() -> bool:
        deadline = lease.deadline
        return deadline is not None and deadline >= start + leases * lease.timeout

    await eventually(kept, f"{leases} leases of renewals")


async def blocked_clients(client: Any, key: str) -> int:
    """Connections blocked (``BLPOP``) on the server, or Cluster primary, that holds *key*."""
    if is_cluster(client):
        info = await client.info("clients", target_nodes=client.get_node_from_key(key))
    else:
        info = await client.info("clients")
    return int(info["blocked_clients"])


# -- mutual exclusion across OS processes -------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.services._locks_worker", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return (await asyncio.to_thread(proc.stdout.readline)).strip()


async def test_two_processes_of_50_tasks_increment_exactly_2000_times(
    redis_server: RedisServerInfo, real_redis: Redis
) -> None:
    procs = [_spawn("increment", redis_server.url, "50", "20") for _ in range(2)]
    try:
        assert [await _read_line(p) for p in procs] == ["ready", "ready"]
        await real_redis.lpush(worker.GO_KEY, "go", "go")  # both start together
        assert [await _read_line(p) for p in procs] == ["done", "done"]
        for p in procs:
            assert await asyncio.to_thread(p.wait, 30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    # 2 processes x 50 tasks x 20 GET/yield/SET rounds; any overlap would lose an update
    assert int(await real_redis.get(worker.COUNTER_KEY) or 0) == 2000


# -- the DESIGN.md contract ----------------------------------------------------------


async def test_second_acquire_fails_at_once_and_succeeds_after_release(redis: Any) -> None:
    first = RedisLock(redis, "resource:1", timeout=5)
    second = RedisLock(redis, "resource:1", timeout=5)
    assert await first.acquire() is True
    assert await second.acquire() is False
    await first.release()
    assert await second.acquire() is True
    assert await second.owned()
    await second.release()
    assert not await second.locked()


async def test_a_lock_expires_after_its_timeout(redis: Any) -> None:
    first = RedisLock(redis, "resource:1", timeout=0.2)
    assert await first.acquire()
    await _expired(first)
    assert not await first.owned()
    assert await RedisLock(redis, "resource:1", timeout=5).acquire()


async def test_of_five_concurrent_non_blocking_acquirers_exactly_one_wins(redis: Any) -> None:
    for round_ in range(5):
        locks = [RedisLock(redis, f"resource:{round_}", timeout=5) for _ in range(5)]
        results = await asyncio.gather(*(lock.acquire() for lock in locks))
        assert sorted(results) == [False, False, False, False, True]
        winner = locks[results.index(True)]
        assert await winner.owned()
        await winner.release()


async def test_release_after_expiry_raises_and_spares_the_new_owner(redis: Any) -> None:
    old = RedisLock(redis, "resource:1", timeout=0.1)
    await old.acquire()
    await _expired(old)
    new = RedisLock(redis, "resource:1", timeout=5)
    assert await new.acquire()
    with pytest.raises(LockNotOwned):
        await old.release()
    assert await new.owned()
    await new.release()


# -- fencing ----------------------------------------------------------------------------


async def test_fencing_tokens_strictly_increase_across_holders_and_expiry(redis: Any) -> None:
    fences: list[int] = []

    async def take(timeout: float) -> RedisLock:
        lock = RedisLock(redis, "resource:1", timeout=timeout, fence_ttl=60)
        assert await lock.acquire(blocking=True, blocking_timeout=DEFAULT_DEADLINE)
        assert lock.fence is not None
        fences.append(lock.fence)
        return lock

    await (await take(5)).release()  # released normally
    await take(0.1)  # this holder dies: its lease runs out
    await _expired(await take(0.1))  # taken after the expiry, and left to expire
    await redis.delete(RedisLock(redis, "resource:1", timeout=1).key + ":fence")  # counter expired
    await (await take(5)).release()
    assert all(a < b for a, b in itertools.pairwise(fences)), fences


async def test_fenced_write_stops_a_holder_that_outlived_its_lease(redis: Any) -> None:
    slow = RedisLock(redis, "report", timeout=0.1)
    await slow.acquire()
    await _expired(slow)  # a "GC pause" past the lease
    fast = RedisLock(redis, "report", timeout=5)
    assert await fast.acquire()
    assert fast.fence is not None and slow.fence is not None
    assert await fenced_write(redis, "report:1", "from fast", fast.fence)
    assert not await fenced_write(redis, "report:1", "from slow", slow.fence)
    assert await redis.hget("report:1", "value") in (b"from fast", "from fast")
    await fast.release()


# -- watchdog ----------------------------------------------------------------------------


async def test_watchdog_holds_the_lock_through_three_times_its_timeout(
    topology_redis: Any,
) -> None:
    redis = await ready(topology_redis)
    rival_wins = 0
    stop = asyncio.Event()

    async def rival() -> None:
        nonlocal rival_wins
        other = RedisLock(redis, "jobs:1", timeout=5)
        while not stop.is_set():
            if await other.acquire():
                rival_wins += 1
                await other.release()
            await asyncio.sleep(0.02)

    # The rival starts only once the lock is held: started before, it may win the first
    # acquire (the scheduler decides), which is no failure of the watchdog. It is stopped by
    # an event, so it ends between attempts, having released whatever it won. A 2 s lease
    # renewed every ~0.7 s leaves a loaded machine room for loop stalls.
    async with RedisLock(redis, "jobs:1", timeout=2, auto_renew=True) as lock:
        contender = asyncio.create_task(rival())
        try:
            await _renewed_through(lock, 3)
            assert await lock.owned()
        finally:
            stop.set()
            await asyncio.wait_for(contender, 5)
    assert rival_wins == 0
    assert not await redis.exists(lock.key)


async def test_deleting_the_key_cancels_the_body_and_raises_lock_lost(redis: Any) -> None:
    lost: list[LockLost] = []
    progress: list[str] = []
    with pytest.raises(LockLost) as caught:
        async with RedisLock(
            redis, "jobs:1", timeout=0.3, auto_renew=True, on_lost=lost.append
        ) as lock:
            progress.append("started")
            await redis.delete(lock.key)
            await asyncio.sleep(10)
            progress.append("finished")
    assert progress == ["started"]
    assert lost == [caught.value]
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)


async def test_a_renewal_that_finds_another_owner_does_not_touch_its_lease(redis: Any) -> None:
    thief = RedisLock(redis, "jobs:1", timeout=30)
    with pytest.raises(LockLost):
        async with RedisLock(redis, "jobs:1", timeout=0.3, auto_renew=True) as lock:
            await redis.delete(lock.key)
            assert await thief.acquire()
            await asyncio.sleep(5)
    assert await thief.owned()
    assert await redis.pttl(thief.key) > 25_000
    await thief.release()


# -- waiting ----------------------------------------------------------------------------------


async def test_a_waiter_in_another_process_is_woken_by_the_release(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=60)
    await holder.acquire()
    wake_list = holder.key + ":wake"
    elsewhere = twin(redis)  # its own connections, like another worker
    try:
        blocked_before = await blocked_clients(redis, wake_list)
        waiter = asyncio.create_task(
            RedisLock(await ready(elsewhere), "jobs:1", timeout=5).acquire(
                blocking=True, blocking_timeout=DEFAULT_DEADLINE
            )
        )

        async def blocked() -> bool:  # in BLPOP on the node of the lock's slot
            return await blocked_clients(redis, wake_list) > blocked_before

        await eventually(blocked, "the waiter to block on the wake list")
        await holder.release()
        assert await waiter  # long before the 60 s lease would have run out
        # The release's wake marker was popped by that BLPOP: the waiter was woken by the
        # release, not by polling (an unused marker would still be there for 2 s).
        assert not await redis.exists(wake_list)
    finally:
        await elsewhere.aclose()


async def test_fair_waiters_are_served_in_arrival_order(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    await holder.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with RedisLock(redis, "jobs:1", timeout=30, fair=True, blocking_timeout=10):
            order.append(n)

    async def queued(waiters: int) -> bool:
        return int(await redis.zcard(holder.key + ":queue")) == waiters

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiter(n)))
        await eventually(functools.partial(queued, n + 1), f"waiter {n} to queue")
    await holder.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_release_pushes_to_the_fair_queue_heads_own_wake_list(redis: Any) -> None:
    """The head's wake list is named inside the release script (``<wake key>:<token>``).

    It shares the lock's hash tag, so on a Cluster the script may write it on
    the lock's node, and the head's ``BLPOP`` (routed by the client) reads it there.
    """
    holder = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    assert await holder.acquire() and holder.fence is not None
    queued = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    reply = await queued._attempt("head-token")  # one attempt: queued, first in line
    assert (reply[0], reply[2]) == (0, 1)
    await holder.release()
    assert await redis.blpop([holder.key + ":wake:head-token"], timeout=1) is not None
    assert await queued._attempt("head-token") == [1, holder.fence + 1]
    assert await queued._give_up("head-token")  # released with the token it was taken with


async def test_an_uncontended_hold_writes_no_wake_marker_and_no_queue(redis: Any) -> None:
    """Nobody waits: the release is a compare-and-delete; no wake list or queue appears."""
    lock = RedisLock(redis, "jobs:1", timeout=30)
    assert await lock.acquire()
    await lock.release()
    leftovers = [lock.key + s for s in (":wake", ":waiting", ":queue", ":queue-heartbeats")]
    assert await redis.exists(*leftovers) == 0
    assert not await lock.locked()


async def test_a_waiter_arriving_on_a_fast_hold_is_woken_by_its_release(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30)
    assert await holder.acquire()
    waiter = RedisLock(redis, "jobs:1", timeout=30)
    reply = await waiter._attempt("waiter-token")  # one failed attempt leaves its mark
    assert reply[0] == 0 and 0 < reply[1] <= 30_000
    await holder.release()
    # The release saw the waiter and pushed a wake marker (same slot as the lock's key).
    assert await redis.blpop([holder.key + ":wake"], timeout=1) is not None
    assert await waiter._attempt("waiter-token") == [1, (holder.fence or 0) + 1]
    assert await waiter._give_up("waiter-token")


async def test_a_fast_release_wakes_the_head_of_a_fair_queue(redis: Any) -> None:
    """A non-fair holder's release with a fair waiter queued wakes that waiter's own list."""
    holder = RedisLock(redis, "jobs:1", timeout=30)
    assert await holder.acquire()
    queued = RedisLock(redis, "jobs:1", timeout=30, fair=True)
    reply = await queued._attempt("head-token")
    assert (reply[0], reply[2]) == (0, 1)
    await holder.release()
    assert await redis.blpop([holder.key + ":wake:head-token"], timeout=1) is not None
    assert await queued._attempt("head-token") == [1, (holder.fence or 0) + 1]
    assert await queued._give_up("head-token")


async def test_fences_of_fast_and_fair_acquires_increase_together(redis: Any) -> None:
    """The fence is there right after acquire, whichever path took the lock."""
    fences: list[int] = []
    for fair in (False, True, False, False, True):
        lock = RedisLock(redis, "jobs:1", timeout=30, fair=fair)
        assert await lock.acquire()
        assert lock.fence is not None
        fences.append(lock.fence)
        await lock.release()
    assert fences == sorted(set(fences))  # strictly increasing, one per acquisition


# -- extend ------------------------------------------------------------------------------------


async def test_extend_lengthens_or_replaces_only_its_own_lease(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=1)
    assert await lock.acquire()
    assert 5.5 < await lock.extend(5) <= 6
    assert 5_500 < await redis.pttl(lock.key) <= 6_000
    assert await lock.extend(0.2, replace=True) == 0.2
    await _expired(lock)  # the replaced lease ran out
    other = RedisLock(redis, "jobs:1", timeout=30)
    assert await other.acquire()
    with pytest.raises(LockNotOwned):
        await lock.extend(5)
    assert await redis.pttl(other.key) > 29_000  # the new owner's lease is untouched
    await other.release()


# -- cancellation ----------------------------------------------------------------------------


class _SlowReplies:
    """A TCP proxy that forwards commands at once but holds replies back for *delay* s."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> _SlowReplies:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for coro in (self._pipe(client_r, server_w, 0), self._pipe(server_r, client_w, self.delay)):
            task = asyncio.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def test_a_task_cancelled_after_its_set_reached_redis_leaves_no_key(
    redis_server: RedisServerInfo, real_redis: Redis
) -> None:
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    proxy = await _SlowReplies(port, delay=0.3).start()
    slow = Redis(host="127.0.0.1", port=proxy.port, driver_info=None)
    try:
        lock = RedisLock(slow, "jobs:1", timeout=30)
        task = asyncio.create_task(lock.acquire())
        while not await real_redis.exists(lock.key):  # the SET ran on the server...
            await asyncio.sleep(0.005)
        task.cancel()  # ...and the reply is still on its way
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await real_redis.exists(lock.key)
    finally:
        await slow.aclose()
        await proxy.close()


async def test_a_task_cancelled_while_waiting_leaves_the_holder_alone(redis: Any) -> None:
    holder = RedisLock(redis, "jobs:1", timeout=30)
    await holder.acquire()
    waiter = asyncio.create_task(
        RedisLock(redis, "jobs:1", timeout=30).acquire(blocking=True, blocking_timeout=10)
    )
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await holder.owned()
    await holder.release()


async def test_a_cancelled_release_still_releases(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=30)
    await lock.acquire()
    task = asyncio.create_task(lock.release())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _expired(lock)  # released, long before its 30 s lease


async def test_a_release_cancelled_at_any_loop_turn_releases_and_raises(redis: Any) -> None:
    lock = RedisLock(redis, "jobs:1", timeout=30)
    for ticks in range(1, 9):  # a task cancelled before its first turn never runs at all
        assert await lock.acquire()
        # requested before the release finished, the cancel must reach the caller
        assert await cancel_after(ticks, lock.release) != "lost"
        await _expired(lock)  # released all the same, long before its 30 s lease
        assert lock.token is None and not lock._gate.locked()


# -- the FastAPI dependency on a real server ----------------------------------------------------


async def test_dependency_answers_409_with_retry_after_on_real_redis(
    make_app_client: AppClientFactory, real_redis: Redis
) -> None:
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(lock_routes.router)

    finish = asyncio.Event()

    @app.post("/slow/{job_id}")
    async def slow(
        job_id: str, lock: Annotated[RedisLock, request_lock("slow:{job_id}", timeout=0.6)]
    ) -> dict[str, Any]:
        await finish.wait()  # longer than the lease: the watchdog keeps it
        return {"fence": lock.fence}

    client: httpx.AsyncClient = await make_app_client(app, real_redis)
    first = asyncio.create_task(client.post("/slow/1"))
    await eventually(RedisLock(real_redis, "slow:1", timeout=1).locked, "the first request's lock")
    await asyncio.sleep(0.9)  # deliberate: the first lease runs out unless renewed
    busy = await client.post("/slow/1")
    finish.set()
    assert busy.status_code == 409
    assert busy.headers["content-type"] == "application/problem+json"
    assert int(busy.headers["retry-after"]) >= 1
    done = await first
    assert done.status_code == 200 and isinstance(done.json()["fence"], int)
    assert not await RedisLock(real_redis, "slow:1", timeout=1).locked()
    assert (await client.post("/jobs/5/run", params={"seconds": 0})).status_code == 200
