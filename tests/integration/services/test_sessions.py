"""SessionStore on real Redis (standalone, Cluster, Sentinel): record contract, expiry, scale."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from redis.asyncio import Redis

from app.core.errors import RedisUnavailable, SessionConflict, SessionNotFound
from app.services.sessions import SessionStore
from app.testing.servers import RedisServer
from app.testing.waiting import ManualClock, eventually


@pytest.fixture
def client(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


def _key(store: SessionStore, session_id: str) -> str:
    family, token = session_id.split(".")
    return store._keys.record(family, token)


async def _ttl_below(client: Any, key: str, ms: int) -> None:
    """Wait until *key*'s TTL has run down below *ms* milliseconds."""

    async def below() -> bool:
        return 0 < int(await client.pttl(key)) < ms

    await eventually(below, f"the TTL of {key!r} to fall below {ms} ms")


async def _gone(client: Any, key: str) -> None:
    """Wait until Redis expired *key*."""

    async def gone() -> bool:
        return int(await client.exists(key)) == 0

    await eventually(gone, f"{key!r} to expire")


async def test_record_crud_round_trip_on_every_topology(topology_redis: Any) -> None:
    store = SessionStore(topology_redis)
    rec = await store.create(data={"user": 1, "raw": b"\x00\xff"}, client_ip="10.0.0.1")
    assert await store.get(rec.id) == rec
    updated = await store.update(rec.id, data={"user": 1, "raw": b"\xfe"}, locked=True)
    assert (updated.locked, updated.version, updated.data) == (True, 2, {"user": 1, "raw": b"\xfe"})
    assert updated.modified_at >= rec.modified_at and updated.created_at == rec.created_at
    assert [r.id async for r in store.list()] == [rec.id]
    assert await store.delete(rec.id)
    assert [r async for r in store.list()] == []


async def test_crud_binary_and_merge_rules(client: Any) -> None:
    store = SessionStore(client)
    rec = await store.create(data={"user": "u", "blob": bytes(range(256))}, client_ip="::1")
    got = await store.get(rec.id)
    assert got is not None and got.data["blob"] == bytes(range(256)) and got.client_ip == "::1"
    await store.merge(rec.id, base_version=1, changes={"a": 1})
    await store.merge(rec.id, base_version=1, changes={"b": 2})
    with pytest.raises(SessionConflict):
        await store.merge(rec.id, base_version=1, changes={"a": 5})
    got = await store.get(rec.id)
    assert got is not None and got.data == {"user": "u", "blob": bytes(range(256)), "a": 1, "b": 2}
    assert await store.delete(rec.id)
    with pytest.raises(SessionNotFound, match="deleted"):
        await store.merge(rec.id, base_version=0, changes={"user": "u"})
    assert await store.get(rec.id) is None


async def test_many_concurrent_writers_of_different_keys_lose_nothing(client: Any) -> None:
    store = SessionStore(client)
    rec = await store.create(data={})
    await asyncio.gather(
        *(store.merge(rec.id, base_version=1, changes={f"k{i}": i}) for i in range(100))
    )
    got = await store.get(rec.id)
    assert got is not None
    assert got.data == {f"k{i}": i for i in range(100)} and got.version == 101


async def test_concurrent_increments_of_one_key_never_lose_an_update(client: Any) -> None:
    store = SessionStore(client)
    rec = await store.create(data={"n": 0})

    async def increment() -> bool:
        while True:  # what a client does with a 409: reload and retry
            current = await store.load(rec.id)
            assert current is not None
            try:
                await store.merge(
                    rec.id, base_version=current.version, changes={"n": current.data["n"] + 1}
                )
                return True
            except SessionConflict:
                continue

    await asyncio.gather(*(increment() for _ in range(30)))
    got = await store.get(rec.id)
    assert got is not None and got.data["n"] == 30


async def test_idle_timeout_is_enforced_by_redis_and_restarted_by_activity(client: Any) -> None:
    store = SessionStore(client, idle_ttl=1, absolute_ttl=30)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    assert 0 < await client.pttl(key) <= 1000
    for _ in range(2):  # each load restarts the idle timer from the full second
        await _ttl_below(client, key, 800)
        assert await store.load(rec.id) is not None
        assert await client.pttl(key) > 800
    await _gone(client, key)  # left idle: Redis expires it
    assert await store.get(rec.id) is None
    assert await store.touch(rec.id) is False


async def _as_if_elapsed(client: Any, key: str, seconds: float, idle_ms: int) -> None:
    """Set *key*'s TTL to what it would be *seconds* after its last idle restart."""
    await client.pexpire(key, idle_ms - int(seconds * 1000))


async def test_loads_within_touch_after_read_and_the_next_one_restarts_the_idle_timeout(
    client: Any,
) -> None:
    """The slack: a session a process restarted less than touch_after ago is only read;
    once touch_after has passed, the next load restarts the idle timeout in full."""
    clock = ManualClock()
    store = SessionStore(client, idle_ttl=60, absolute_ttl=600, touch_after=5, clock=clock)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    assert await store.load(rec.id) is not None  # restarts it: 60 s from now
    await _as_if_elapsed(client, key, 3, store.idle_ms)
    clock.advance(3)
    assert (await store.load(rec.id)) == rec  # within touch_after: read only
    assert await client.pttl(key) <= 57_000
    await _as_if_elapsed(client, key, 5.5, store.idle_ms)
    clock.advance(2.5)  # 5.5 s since the restart
    assert (await store.load(rec.id)) == rec
    assert await client.pttl(key) > 57_000  # restarted in full
    assert await store.load(rec.id, touch=False) == rec


async def test_touch_after_zero_restarts_the_idle_timeout_on_every_load(client: Any) -> None:
    store = SessionStore(client, idle_ttl=60, touch_after=0)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    for _ in range(3):
        await _as_if_elapsed(client, key, 1, store.idle_ms)
        assert await store.load(rec.id) is not None
        assert await client.pttl(key) > 59_000


async def test_an_idle_session_still_ends_when_loads_only_read(client: Any) -> None:
    """Reads inside touch_after never extend the TTL: left alone, the session expires."""
    clock = ManualClock()
    store = SessionStore(client, idle_ttl=1, absolute_ttl=30, touch_after=0.5, clock=clock)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    assert await store.load(rec.id) is not None
    await _ttl_below(client, key, 800)
    assert await store.load(rec.id) is not None  # the clock did not move: read only
    assert await client.pttl(key) < 800
    await _gone(client, key)
    assert await store.load(rec.id) is None


async def test_a_remembered_restart_never_lets_an_old_or_deleted_id_read(client: Any) -> None:
    """The ids a process restarted recently are read with a plain HGETALL: a regenerated
    id still never reads the new session's data, a deleted one reads nothing."""
    store = SessionStore(client, idle_ttl=60)
    rec = await store.create(data={"user": "alice"})
    assert await store.load(rec.id) is not None  # remembered as just restarted
    new_id = await store.regenerate(rec.id)
    assert await store.load(rec.id) is None and await store.get(rec.id) is None
    assert (await store.load(new_id)) is not None
    assert (await store.load(new_id)) is not None  # the plain read of the new id
    assert await store.delete(new_id)
    assert await store.load(new_id) is None


async def test_a_hash_the_store_did_not_write_reads_as_no_session(client: Any) -> None:
    store = SessionStore(client, idle_ttl=60)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    assert await store.load(rec.id) is not None
    await client.hdel(key, "expires_at")  # no longer a record this store wrote
    assert await store.load(rec.id) is None  # the plain read
    assert await store.get(rec.id) is None
    assert await store.load(rec.id, touch=False) is None


async def test_absolute_lifetime_ends_a_session_however_active(client: Any) -> None:
    store = SessionStore(client, idle_ttl=1, absolute_ttl=1.2)
    rec = await store.create(data={"a": 1})
    key = _key(store, rec.id)
    assert rec.expires_at - rec.created_at == dt.timedelta(milliseconds=1200)
    await _ttl_below(client, key, 600)  # at least 0.4 s old: at most 0.8 s of its life left
    assert await store.touch(rec.id) is True
    # The TTL is bounded by the remaining absolute lifetime, not the idle timeout.
    assert await client.pttl(key) <= 800
    await store.merge(rec.id, base_version=1, changes={"b": 2})
    assert await client.pttl(key) <= 800

    async def ended() -> bool:  # active all along (every check loads it), yet it ends
        return await store.load(rec.id) is None

    await eventually(ended, "the session to reach its absolute lifetime")
    with pytest.raises(SessionNotFound, match="expired"):
        await store.merge(rec.id, base_version=0, changes={"c": 3})


async def test_the_old_id_never_resolves_and_is_forgotten_after_the_grace_window(
    client: Any,
) -> None:
    store = SessionStore(client, regenerate_grace=0.3)
    rec = await store.create(data={"user": "alice"})
    new_id = await store.regenerate(rec.id)
    assert await store.load(rec.id) is None  # at once: no grace for new arrivals
    assert await store.was_regenerated(rec.id) is True

    async def forgotten() -> bool:
        return not await store.was_regenerated(rec.id)

    await eventually(forgotten, "the grace window to end")
    assert await store.load(rec.id) is None
    assert await store.load(new_id) is not None


async def test_a_fixated_id_is_worthless_after_the_victim_logs_in(client: Any) -> None:
    store = SessionStore(client)
    planted = await store.create(data={"theme": "dark"})  # the attacker's own session
    logged_in = await store.merge(
        planted.id, base_version=planted.version, changes={"user": "victim"}, regenerate=True
    )
    assert await store.load(planted.id) is None
    assert await store.get(planted.id) is None
    with pytest.raises(SessionNotFound):
        await store.merge(planted.id, base_version=0, changes={"user": "attacker"})
    with pytest.raises(SessionNotFound):
        await store.update(planted.id, data={})
    with pytest.raises(SessionNotFound):
        await store.regenerate(planted.id)
    record = await store.load(logged_in.id)
    assert record is not None
    assert record.data == {"theme": "dark", "user": "victim"}
    assert record.version == logged_in.version


async def test_tombstone_and_index_expire(client: Any) -> None:
    store = SessionStore(client, tombstone_ttl=0.3, absolute_ttl=5)
    rec = await store.create(data={"user": "alice"})
    index = store._keys.index("alice")
    assert 5_000 < await client.pttl(index) <= 65_000  # absolute lifetime + margin
    await store.delete(rec.id)
    with pytest.raises(SessionNotFound, match="deleted"):
        await store.merge(rec.id, base_version=0, changes={"a": 1})

    async def forgotten() -> bool:  # the tombstone expired: the id is simply unknown
        with pytest.raises(SessionNotFound) as caught:
            await store.merge(rec.id, base_version=0, changes={"a": 1})
        return "does not exist" in str(caught.value)

    await eventually(forgotten, "the tombstone to expire")
    assert await client.exists(index) == 0  # emptied on delete


async def test_list_and_revoke_at_scale(client: Any) -> None:
    store = SessionStore(client)
    alice = [await store.create(data={"user": "alice"}) for _ in range(130)]
    others = [await store.create(data={"n": i}) for i in range(120)]
    listed = {r.id async for r in store.list()}
    assert listed == {r.id for r in [*alice, *others]}
    assert len(await store.list_for("alice")) == 130
    assert await store.delete_all_for("alice") == 130
    assert {r.id async for r in store.list()} == {r.id for r in others}
    for rec in others:
        await store.delete(rec.id)
    assert [r async for r in store.list()] == []


async def test_scripts_reload_after_the_server_forgets_them(client: Any) -> None:
    store = SessionStore(client)
    rec = await store.create(data={"a": 1})
    await client.script_flush()
    assert (await store.load(rec.id)) is not None
    await client.script_flush()
    await store.merge(rec.id, base_version=1, changes={"b": 1})
    assert (await store.get(rec.id)).data == {"a": 1, "b": 1}  # type: ignore[union-attr]


async def test_redis_down_raises_redis_unavailable(private_server: RedisServer) -> None:
    client = Redis.from_url(private_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        store = SessionStore(client)
        rec = await store.create(data={"a": 1})
        private_server.stop()
        with pytest.raises(RedisUnavailable):
            await store.load(rec.id)
    finally:
        await client.aclose()
