"""The lease deadline the watchdog enforces, on fakeredis behind a link that can stall.

A holder with ``auto_renew=True`` tracks its lease from when the acquire (or
the last confirmed renewal) was sent. When no renewal is confirmed by
``deadline`` (that time + lease - drift), its block is cancelled and
``LockLost`` raised while its lease is still running in Redis, whatever the
pending renewal call is doing. The real-server proof with a stalled TCP proxy
and a rival is ``tests/integration/services/test_locks_deadline.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import pytest_asyncio

from app.api.deps import request_lock, request_semaphore
from app.core.clock import LOOP_CLOCK, Clock
from app.core.errors import ConfigurationError, LockLost
from app.services.locks import RedisLock, Redlock, Semaphore, lease_drift
from app.testing.clock import VirtualClock
from app.testing.slots import SlotCheckingRedis

BOUND = 10.0
"""Deadline of every wait here (proves "no hang", not speed)."""


class _Link(SlotCheckingRedis):
    """fakeredis behind a link: ``stall()`` holds every command until ``resume()``.

    Like a half-dead TCP link: nothing fails, nothing answers. ``latency`` delays
    each command on its way to the server, ``reply_latency`` its reply (seconds
    on ``clock``: a test's ``VirtualClock`` makes them virtual too).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.latency = 0.0
        self.reply_latency = 0.0
        self.clock: Clock = LOOP_CLOCK

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.latency:
            await self.clock.sleep(self.latency)  # the link's latency, not synchronisation
        await self.flowing.wait()
        reply = await super().execute_command(*args, **options)
        if self.reply_latency:
            await self.clock.sleep(self.reply_latency)  # the reply's way back
        return reply


@pytest_asyncio.fixture
async def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest_asyncio.fixture
async def link(server: fakeredis.FakeServer) -> AsyncIterator[_Link]:
    """The holder's client, over a link the test can stall (resumed and closed at the end)."""
    client = _Link(server=server)
    try:
        yield client
    finally:
        client.resume()
        await client.aclose()


@pytest_asyncio.fixture
async def peer(server: fakeredis.FakeServer) -> AsyncIterator[Any]:
    """Another client of the same server, with a healthy link (another process)."""
    client = SlotCheckingRedis(server=server)
    try:
        yield client
    finally:
        await client.aclose()


async def _until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(BOUND):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {BOUND} s: {what}") from None


async def _run_until_stopped(lease: Any, link: _Link | _Both) -> tuple[list[str], LockLost]:
    """Enter *lease*, stall the link, and return (what the block did, the LockLost raised)."""
    progress: list[str] = []
    entered = asyncio.Event()

    async def block() -> None:
        async with lease:
            progress.append("entered")
            entered.set()
            await asyncio.Event().wait()  # the guarded work: runs until cancelled
            progress.append("finished")

    task = asyncio.create_task(block())
    async with asyncio.timeout(BOUND):
        await entered.wait()
    link.stall()
    with pytest.raises(LockLost) as caught:
        async with asyncio.timeout(BOUND):
            await task
    return progress, caught.value


# -- a stalled link ends the hold while the lease still runs in Redis ------------------------


async def test_a_stalled_renewal_ends_the_lock_hold_before_its_lease_ends_in_redis(
    link: _Link, peer: Any
) -> None:
    lost: list[LockLost] = []
    lock = RedisLock(link, "jobs:1", timeout=0.6, auto_renew=True, drift=0.2, on_lost=lost.append)

    progress, error = await _run_until_stopped(lock, link)

    assert await peer.pttl(lock.key) > 0  # nobody else could have taken it yet
    assert progress == ["entered"]
    assert lost == [error] and error.lock_name == "jobs:1"
    assert "no renewal was confirmed" in str(error) and "cancelled" in str(error)
    assert lock.deadline is None  # the hold is over


async def test_a_stalled_renewal_ends_the_permit_before_its_lease_ends_in_redis(
    link: _Link, peer: Any
) -> None:
    sem = Semaphore(link, "exports", 1, timeout=0.6, auto_renew=True, drift=0.2)

    progress, error = await _run_until_stopped(sem, link)

    assert await Semaphore(peer, "exports", 1, timeout=1).count() == 1  # still counted
    assert progress == ["entered"]
    assert "no renewal was confirmed" in str(error)


async def test_a_stalled_majority_ends_the_redlock_hold_within_its_validity(
    server: fakeredis.FakeServer,
) -> None:
    servers = [server, fakeredis.FakeServer(), fakeredis.FakeServer()]
    links = [_Link(server=s) for s in servers]
    peers = [SlotCheckingRedis(server=s) for s in servers]
    try:
        # each master may take 2 s to answer: longer than the lease. The drift margin is
        # 0.24 s, not the default 8 ms: the hold ends that long before the lease ends in
        # Redis, and the check below must run inside that margin on a loaded machine.
        lock = Redlock(
            links, "billing", timeout=0.6, auto_renew=True, node_timeout=2, drift_factor=0.4
        )
        progress, error = await _run_until_stopped(lock, _Both(*links))
        assert sum([await p.pttl(lock.key) > 0 for p in peers]) >= 2  # a majority still holds
        assert progress == ["entered"]
        assert "no renewal was confirmed" in str(error)
        assert lock.drift == pytest.approx(0.6 * 0.4 + 0.002)
    finally:
        for link in links:
            link.resume()
            await link.aclose()
        for peer in peers:
            await peer.aclose()


class _Both:
    """Several links stalled as one."""

    def __init__(self, *links: _Link) -> None:
        self.links = links

    def stall(self) -> None:
        for link in self.links:
            link.stall()


async def test_an_acquire_confirmed_after_its_deadline_does_not_enter_the_block(
    link: _Link, peer: Any
) -> None:
    clock = link.clock = VirtualClock()
    link.reply_latency = 0.5  # the lease is 0.6 s, the deadline 0.4 s after the acquire was sent
    lost: list[LockLost] = []
    lock = RedisLock(
        link, "jobs:1", timeout=0.6, auto_renew=True, drift=0.2, on_lost=lost.append, clock=clock
    )
    entered = False

    async def enter() -> None:
        nonlocal entered
        async with lock:
            entered = True

    task = asyncio.create_task(enter())
    await clock.advance(0.5)  # the reply arrives
    with pytest.raises(LockLost) as caught:
        await task
    await clock.advance(0.5)  # the clean-up's reply arrives too
    assert not await peer.exists(lock.key)
    assert not entered
    assert lost == [caught.value]
    assert lock.deadline is None and not lock._gate.locked()  # free for the next owner


# -- a slow but confirmed renewal keeps the hold --------------------------------------------


async def test_renewals_confirmed_before_the_deadline_keep_the_lock(link: _Link) -> None:
    clock = link.clock = VirtualClock()
    lost: list[LockLost] = []
    lock = RedisLock(
        link, "jobs:1", timeout=0.6, auto_renew=True, drift=0.1, on_lost=lost.append, clock=clock
    )
    async with lock:
        link.latency = 0.05  # every renewal is slow, but answered well within the lease
        deadlines = [lock.deadline]
        for _ in range(12):  # renewals every 0.2 s, each confirmed 0.05 s after it was sent
            await clock.advance(0.1)
            if lock.deadline != deadlines[-1]:
                deadlines.append(lock.deadline)
        # each deadline counts from when its renewal was sent, not from the reply
        assert deadlines == pytest.approx([0.5, 0.7, 0.9, 1.1, 1.3, 1.5])
        assert clock.now() == pytest.approx(1.2) and lock.deadline == pytest.approx(1.5)
        link.latency = 0
        assert await lock.owned()
    assert lost == [] and lock.lost is None


# -- the deadline: from when the call was sent, moved by confirmed extensions ----------------


async def test_the_deadline_counts_from_when_the_acquire_was_sent(link: _Link) -> None:
    loop = asyncio.get_running_loop()
    link.latency = 0.05
    lock = RedisLock(link, "jobs:1", timeout=5, auto_renew=True, drift=0.5)
    assert lock.deadline is None
    before = loop.time()
    assert await lock.acquire()
    after = loop.time()
    deadline = lock.deadline
    assert deadline is not None
    # not later than "sent + lease - drift": the reply's latency is not counted as lease
    assert before + 4.5 <= deadline <= after - 0.05 + 4.5
    before = loop.time()
    await lock.extend(20, replace=True)
    assert lock.deadline is not None and lock.deadline >= before + 19.5
    await lock.release()
    assert lock.deadline is None


# -- configuration ----------------------------------------------------------------------------


async def test_the_drift_margin_is_checked(link: _Link) -> None:
    assert lease_drift(10, None) == pytest.approx(0.102)  # 1 % + 2 ms by default
    assert RedisLock(link, "x", timeout=10).drift == pytest.approx(0.102)
    assert RedisLock(link, "x", timeout=10, drift=0).drift == 0
    with pytest.raises(ConfigurationError, match="drift"):
        RedisLock(link, "x", timeout=1, drift=1)
    with pytest.raises(ConfigurationError, match="drift"):
        RedisLock(link, "x", timeout=1, drift=-0.1)
    # the watchdog must have time to get a renewal confirmed before the deadline
    with pytest.raises(ConfigurationError, match="renew_interval"):
        RedisLock(link, "x", timeout=1, auto_renew=True, renew_interval=0.6, drift=0.4)
    assert RedisLock(link, "x", timeout=1, renew_interval=0.6, drift=0.4).drift == 0.4
    with pytest.raises(ConfigurationError, match="renew_interval"):
        Semaphore(link, "x", 1, timeout=1, auto_renew=True, drift=0.7)
    with pytest.raises(ConfigurationError, match="drift"):
        request_lock("jobs:{job}", timeout=1, drift=0.7)
    with pytest.raises(ConfigurationError, match="drift"):
        request_semaphore("jobs:{job}", limit=2, timeout=1, drift=2)
