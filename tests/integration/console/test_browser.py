"""The operator console in a real headless Chromium, against the demo under uvicorn on real Redis.

The demo runs as ``uvicorn app.main:app`` (``CONSOLE_TOKEN`` set, a private key
prefix) against the plugin's redis-server; the browser is the system
``/usr/bin/chromium`` driven by playwright (never ``playwright install``). Each
test logs in through the form and acts through the pages; the effect is then
checked the way a user of the service would see it (the demo's own routes, a
waiting lock, a stream consumer). Screenshots of every page go to
``reports/console/*.png``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, async_playwright
from redis.asyncio import Redis

from app.core.redis import unlink_matching
from app.services.locks import RedisLock
from app.services.streams import StreamConsumer, StreamMessage, StreamProducer
from app.testing.plugin import RedisServerInfo
from app.testing.servers import serve_app
from app.testing.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
TOKEN = "ui-Q8w3Ne7Rt2Yu6Io1Pa5Sd9Fg4Hj0Kl"
SHOTS = Path(__file__).resolve().parents[3] / "reports" / "console"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)"
    if os.environ.get("REDIS_REQUIRED") == "1" or os.environ.get("CI"):
        pytest.fail(reason)  # CI must run the browser tests, never skip them
    pytest.skip(reason)


@dataclass(frozen=True)
class Demo:
    base: str
    prefix: str
    redis_url: str


@pytest.fixture(scope="module")
def demo(redis_server: RedisServerInfo) -> Iterator[Demo]:
    """``uvicorn app.main:app`` with the console on, a private key prefix, real Redis."""
    _require_chromium()
    prefix = f"ui{uuid.uuid4().hex[:10]}"
    env = {
        "REDIS_URL": redis_server.url,
        "REDIS_KEY_PREFIX": prefix,
        "CONSOLE_TOKEN": TOKEN,
        "SECRET_KEY": "browser-test-secret-" + uuid.uuid4().hex,
    }
    with serve_app(env=env, drop_env=("CONSOLE_", "REDIS_")) as base:
        yield Demo(base, prefix, redis_server.url)


@pytest_asyncio.fixture
async def redis(demo: Demo, settings_override: Any) -> AsyncIterator[Redis]:
    """A client on the demo's server, with the demo's key prefix in this process too."""
    settings_override(redis_key_prefix=demo.prefix)
    client = Redis.from_url(demo.redis_url)
    try:
        yield client
    finally:
        await unlink_matching(client, f"{demo.prefix}:*")
        await client.aclose()


@pytest_asyncio.fixture
async def browser(demo: Demo) -> AsyncIterator[BrowserContext]:
    """A fresh headless Chromium profile (the system binary, no downloads)."""
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    try:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield context
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def _logged_in(browser: BrowserContext, demo: Demo) -> Page:
    page = browser.pages[0] if browser.pages else await browser.new_page()
    await page.goto(demo.base + "/console/")
    assert page.url.startswith(demo.base + "/console/login")  # redirected to the form
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(demo.base + "/console/")
    return page


async def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_login_then_every_page_renders_with_live_counters(
    demo: Demo, redis: Redis, browser: BrowserContext
) -> None:
    async with httpx.AsyncClient(base_url=demo.base) as http:  # something to show
        await http.put("/cache/items/a", json={"value": 1, "ttl": 60, "tags": ["blue"]})
        await http.post("/session/login", json={"user": "alice"})
    page = await _logged_in(browser, demo)
    await page.locator("#live .live-state", has_text="live").wait_for()  # SSE arrived
    assert int(await page.locator("[data-live=used_memory]").inner_text()) > 0
    assert await page.locator("h1").inner_text() == "Overview"
    assert "cache" in await page.locator("table").first.inner_text()
    await _shot(page, "overview")
    for path, heading, name in (
        ("/streams", "Streams", "streams"),
        ("/locks", "Locks and semaphores", "locks"),
        ("/limits?limiter=demo+user&identity=alice", "Rate limits", "limits"),
        ("/cache", "Cache", "cache"),
        ("/sessions?user=alice", "Sessions", "sessions"),
        ("/pubsub", "Pub/sub", "pubsub"),
        ("/audit", "Audit", "audit"),
    ):
        response = await page.goto(demo.base + "/console" + path)
        assert response is not None and response.status == 200, path
        assert await page.locator("h1").inner_text() == heading
        await _shot(page, name)
    await page.goto(demo.base + "/console/sessions?user=alice")
    assert await page.locator("table.sessions tbody tr").count() == 1


async def test_a_dead_letter_replayed_from_the_console_is_handled(
    demo: Demo, redis: Redis, browser: BrowserContext
) -> None:
    handled: list[Any] = []
    broken = True

    async def handler(message: StreamMessage[Any]) -> None:
        if broken:
            raise RuntimeError("the payment provider is down")
        handled.append(message.payload)

    consumer: StreamConsumer[Any] = StreamConsumer(
        redis, "orders", "billing", "worker-1", handler, max_deliveries=2, retry_backoff=0.05
    )
    await consumer.ensure_group()
    await StreamProducer(redis, "orders").add({"order": 42})
    runner = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: consumer.counters.dead_lettered == 1, "the order dead-lettered")
        broken = False
        page = await _logged_in(browser, demo)
        await page.goto(demo.base + "/console/streams")
        await page.click("text=orders")
        row = page.locator("table.dead tbody tr").first
        assert "the payment provider is down" in await row.inner_text()
        await _shot(page, "stream-dead-letters")
        await row.locator("button", has_text="Replay").click()
        await page.locator(".notice", has_text="replayed as").wait_for()
        await eventually(lambda: handled == [{"order": 42}], "the replayed order handled")
        assert (await consumer.stats()).dead_letters == 0
        await page.reload()
        assert "no dead letters" in await page.locator("table.dead").inner_text()
    finally:
        await consumer.stop(timeout=5)
        await runner


async def test_a_revoked_session_cookie_is_refused(
    demo: Demo, redis: Redis, browser: BrowserContext
) -> None:
    async with httpx.AsyncClient(base_url=demo.base) as alice:
        assert (await alice.post("/session/login", json={"user": "alice"})).status_code == 200
        assert (await alice.get("/session/profile")).json()["user"] == "alice"
        page = await _logged_in(browser, demo)
        await page.goto(demo.base + "/console/sessions")
        await page.fill("input[name=user]", "alice")
        await page.click("text=Find")
        await page.locator("table.sessions button", has_text="Revoke").click()
        await page.locator(".notice", has_text="session revoked").wait_for()
        refused = await alice.get("/session/profile")
        assert refused.status_code == 401


async def test_an_invalidated_tag_makes_the_next_read_a_miss(
    demo: Demo, redis: Redis, browser: BrowserContext
) -> None:
    async with httpx.AsyncClient(base_url=demo.base) as http:
        stored = await http.put(
            "/cache/items/user:7", json={"value": 7, "ttl": 300, "tags": ["users"]}
        )
        assert stored.status_code == 200
        assert (await http.get("/cache/items/user:7")).json()["hit"] is True
        page = await _logged_in(browser, demo)
        await page.goto(demo.base + "/console/cache")
        await page.click("a:text-is('users')")
        assert "user:7" in await page.locator("main").inner_text()
        await _shot(page, "cache-tag")
        await page.locator("tr[data-tag=users] button", has_text="Invalidate").click()
        await page.locator(".notice", has_text="1 entries removed").wait_for()
        assert (await http.get("/cache/items/user:7")).json()["hit"] is False


async def test_a_force_released_lock_goes_to_the_waiter(
    demo: Demo, redis: Redis, browser: BrowserContext
) -> None:
    stuck = RedisLock(redis, "jobs:42", timeout=120)  # a holder that will never release
    assert await stuck.acquire()
    waiter = RedisLock(redis, "jobs:42", timeout=30)
    waiting = asyncio.create_task(waiter.acquire(blocking=True, blocking_timeout=60))
    page = await _logged_in(browser, demo)
    await page.goto(demo.base + "/console/locks")
    row = page.locator("tr[data-lock='jobs:42']")
    assert str(stuck.fence) in await row.inner_text()
    assert not waiting.done()
    await row.locator("text=Force release").click()
    await page.check("input[name=confirm]")
    await _shot(page, "lock-release")
    await page.click("button:text-is('Force release')")
    await page.locator(".notice", has_text="force-released").wait_for()
    assert await asyncio.wait_for(waiting, 30) is True
    assert await waiter.owned() and not await stuck.owned()
    await waiter.release()


async def test_live_views_are_capped_per_worker(demo: Demo, redis: Redis) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=demo.base, timeout=30))
        readers: list[AsyncGenerator[str, None]] = []  # a collected reader closes its response
        for _ in range(4):
            events = await stack.enter_async_context(
                http.stream("GET", "/console/events", headers=headers)
            )
            assert events.status_code == 200
            readers.append(cast(AsyncGenerator[str, None], events.aiter_lines()))
            assert (await anext(readers[-1])) == "event: counters"  # open and counted
        refused = await http.get("/console/events", headers=headers)
        assert refused.status_code == 429
        for reader in readers:
            await reader.aclose()
    async with httpx.AsyncClient(base_url=demo.base, timeout=30) as http:

        async def reopened() -> bool:  # the closed views were given back
            async with http.stream("GET", "/console/events", headers=headers) as events:
                return events.status_code == 200

        await eventually(reopened, "a live view accepted again after the others closed")
