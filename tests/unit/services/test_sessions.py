"""SessionStore on fakeredis: web2py records, lost-update rules, regeneration, revocation."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
import pytest_asyncio
from redis.exceptions import ResponseError

from app.core.errors import (
    ConfigurationError,
    RedisCommandError,
    RedisUnavailable,
    SessionConflict,
    SessionNotFound,
    UsageError,
)
from app.core.keys import KeySpace, key_slot_tag
from app.services.sessions import SessionRecord, SessionStore, is_session_id, new_session_id
from app.testing.slots import SlotCheckingRedis


@pytest.fixture
def client(fake_client: Any) -> Any:
    """fakeredis on a fresh server, with decode_responses False and True."""
    return fake_client


@pytest.fixture
def store(client: Any) -> SessionStore:
    return SessionStore(client, idle_ttl=600, absolute_ttl=3600)


async def _all_keys(client: Any) -> list[str]:
    keys = await client.keys("*")
    return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)


async def test_record_crud_with_every_web2py_field(store: SessionStore) -> None:
    rec = await store.create(data={"user": 1, "theme": "dark"}, client_ip="10.0.0.1")
    assert isinstance(rec, SessionRecord)
    assert is_session_id(rec.id)
    assert rec.client_ip == "10.0.0.1"
    assert rec.locked is False
    assert rec.unique_key and len(rec.unique_key) >= 22
    assert rec.created_at == rec.modified_at
    assert rec.created_at.tzinfo is not None
    assert rec.expires_at - rec.created_at == dt.timedelta(hours=1)
    assert rec.version == 1
    assert rec.data == {"user": 1, "theme": "dark"}

    read = await store.get(rec.id)
    assert read == rec

    await asyncio.sleep(0.005)  # modified_at has millisecond resolution
    updated = await store.update(rec.id, data={"user": 1, "cart": [1, 2]}, locked=True)
    assert updated.locked is True
    assert updated.data == {"user": 1, "cart": [1, 2]}
    assert updated.modified_at > rec.modified_at
    assert updated.created_at == rec.created_at
    assert updated.unique_key == rec.unique_key
    assert updated.client_ip == "10.0.0.1"
    assert updated.version == 2
    assert await store.get(rec.id) == updated

    unlocked = await store.update(rec.id, locked=False)
    assert unlocked.locked is False
    assert unlocked.data == {"user": 1, "cart": [1, 2]}

    other = await store.create(data={"user": 2})
    listed = {r.id: r async for r in store.list()}
    assert set(listed) == {rec.id, other.id}
    assert listed[rec.id].data == {"user": 1, "cart": [1, 2]}

    assert await store.delete(rec.id) is True
    assert await store.get(rec.id) is None
    assert await store.delete(rec.id) is False
    assert await store.delete(other.id) is True
    assert [r async for r in store.list()] == []


async def test_update_that_changes_nothing_keeps_version_and_modified_at(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"a": 1})
    same = await store.update(rec.id, data={"a": 1}, locked=False)
    assert (same.version, same.modified_at) == (1, rec.modified_at)


async def test_binary_and_typed_values_round_trip(store: SessionStore) -> None:
    data = {
        "raw": b"\x00\xff\xfe binary \x80",
        "when": dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
        "price": Decimal("9.99"),
        "tags": {"a", "b"},
        "pair": (1, "x"),
        "nested": {"bytes": b"\x01\x02", "list": [b"\xff"]},
        "unicode": "za\u017c\u00f3\u0142\u0107 \U0001f600",
    }
    rec = await store.create(data=data)
    assert (await store.get(rec.id)).data == data  # type: ignore[union-attr]
    await store.merge(rec.id, base_version=rec.version, changes={"raw": b"\x00" * 3})
    assert (await store.get(rec.id)).data["raw"] == b"\x00\x00\x00"  # type: ignore[union-attr]


async def test_concurrent_merges_of_different_keys_all_survive(store: SessionStore) -> None:
    rec = await store.create(data={"user": 1})
    results = await asyncio.gather(
        *(store.merge(rec.id, base_version=rec.version, changes={f"k{i}": i}) for i in range(20))
    )
    assert sorted(r.version for r in results) == list(range(2, 22))
    stored = await store.get(rec.id)
    assert stored is not None
    assert stored.data == {"user": 1, **{f"k{i}": i for i in range(20)}}


async def test_conflicting_change_to_the_same_key_is_refused_and_writes_nothing(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"counter": 1, "other": "x"})
    await store.merge(rec.id, base_version=rec.version, changes={"counter": 2})
    with pytest.raises(SessionConflict, match="counter"):
        # Same value the winner wrote: still a lost increment, so still a conflict.
        await store.merge(rec.id, base_version=rec.version, changes={"counter": 2, "other": "y"})
    stored = await store.get(rec.id)
    assert stored is not None
    assert stored.data == {"counter": 2, "other": "x"}
    assert stored.version == 2


async def test_deleting_a_key_changed_since_the_read_conflicts(store: SessionStore) -> None:
    rec = await store.create(data={"cart": [1]})
    await store.merge(rec.id, base_version=1, changes={"cart": [1, 2]})
    with pytest.raises(SessionConflict, match="cart"):
        await store.merge(rec.id, base_version=1, deleted=["cart"])
    assert (await store.get(rec.id)).data == {"cart": [1, 2]}  # type: ignore[union-attr]


async def test_deleting_a_key_someone_else_deleted_is_not_a_conflict(store: SessionStore) -> None:
    rec = await store.create(data={"flash": "saved", "user": 1})
    first = await store.merge(rec.id, base_version=1, deleted=["flash"])
    second = await store.merge(rec.id, base_version=1, deleted=["flash"])
    assert second.version == first.version  # nothing left to change
    assert (await store.get(rec.id)).data == {"user": 1}  # type: ignore[union-attr]


async def test_a_key_changed_before_the_read_is_no_conflict(store: SessionStore) -> None:
    rec = await store.create(data={"a": 1})
    w = await store.merge(rec.id, base_version=1, changes={"a": 2})
    await store.merge(rec.id, base_version=w.version, changes={"b": 1})
    done = await store.merge(rec.id, base_version=w.version, changes={"a": 3})
    assert (await store.get(rec.id)).data == {"a": 3, "b": 1}  # type: ignore[union-attr]
    assert done.version == 4


async def test_update_with_expected_version_is_compare_and_set(store: SessionStore) -> None:
    rec = await store.create(data={"a": 1})
    await store.update(rec.id, data={"a": 2}, expected_version=1)
    with pytest.raises(SessionConflict):
        await store.update(rec.id, data={"a": 3}, expected_version=1)
    with pytest.raises(SessionConflict):
        await store.update(rec.id, locked=True, expected_version=1)
    stored = await store.get(rec.id)
    assert stored is not None
    assert (stored.data, stored.locked, stored.version) == ({"a": 2}, False, 2)


async def test_replacing_data_conflicts_with_a_writer_that_read_the_removed_key(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"a": 1, "b": 1})
    await store.update(rec.id, data={"a": 1})
    with pytest.raises(SessionConflict, match="b"):
        await store.merge(rec.id, base_version=1, changes={"b": 2})
    await store.merge(rec.id, base_version=1, changes={"c": 1})


async def test_a_deleted_session_is_never_written_back(store: SessionStore, client: Any) -> None:
    rec = await store.create(data={"user": 1})
    assert await store.delete(rec.id)
    with pytest.raises(SessionNotFound, match="deleted"):
        await store.merge(rec.id, base_version=rec.version, changes={"user": 1})
    with pytest.raises(SessionNotFound):
        await store.update(rec.id, data={"user": 1})
    with pytest.raises(SessionNotFound):
        await store.regenerate(rec.id)
    assert await store.get(rec.id) is None
    assert await store.load(rec.id) is None
    assert await store.touch(rec.id) is False
    keys = await _all_keys(client)
    assert len(keys) == 1 and ".gone:" in keys[0]  # only the tombstone


async def test_unknown_and_malformed_ids_are_not_found(store: SessionStore) -> None:
    unknown = new_session_id()
    with pytest.raises(SessionNotFound, match="does not exist"):
        await store.merge(unknown, base_version=0, changes={"a": 1})
    for bad in ("", "nope", "a" * 31, "*.*", "{x}.abc", "../../etc"):
        assert await store.get(bad) is None
        assert await store.load(bad) is None
        assert await store.delete(bad) is False
        assert await store.touch(bad) is False
        with pytest.raises(SessionNotFound):
            await store.update(bad, data={})


async def test_regenerate_moves_the_record_and_the_old_id_is_dead_at_once(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"user": 1, "cart": [1]}, client_ip="10.0.0.2")
    new_id = await store.regenerate(rec.id)
    assert new_id != rec.id
    assert new_id.split(".")[0] == rec.id.split(".")[0]  # same family: same Cluster slot
    moved = await store.get(new_id)
    assert moved is not None
    assert moved.data == rec.data
    assert moved.created_at == rec.created_at
    assert moved.client_ip == "10.0.0.2"
    assert moved.unique_key != rec.unique_key
    # the old id resolves to nothing (it used to lead to the new session for a grace window)
    assert await store.get(rec.id) is None
    assert await store.load(rec.id) is None
    assert await store.was_regenerated(rec.id) is True
    assert await store.was_regenerated(new_id) is False
    chained = await store.regenerate(new_id)
    assert await store.load(rec.id) is None and await store.load(new_id) is None
    assert (await store.load(chained)) is not None


async def test_a_fixated_id_reads_writes_and_regenerates_nothing_after_the_login(
    store: SessionStore,
) -> None:
    planted = await store.create()  # the attacker's session id, planted in the victim's browser
    victim = await store.merge(
        planted.id, base_version=planted.version, changes={"user": "victim"}, regenerate=True
    )
    assert await store.load(planted.id) is None
    assert await store.get(planted.id) is None
    for write in (
        store.merge(planted.id, base_version=0, changes={"user": "attacker"}),
        store.merge(planted.id, base_version=victim.version, deleted=["user"]),
        store.update(planted.id, data={"user": "attacker"}),
        store.update(planted.id, locked=True),
    ):
        with pytest.raises(SessionNotFound, match="regenerated"):
            await write
    with pytest.raises(SessionNotFound, match="regenerated"):
        await store.regenerate(planted.id)  # no fresh valid id through the planted one
    record = await store.get(victim.id)
    assert record is not None
    assert record.data == {"user": "victim"} and record.locked is False
    assert record.version == victim.version
    assert await store.list_for("victim") == [record]


async def test_without_grace_the_old_id_stops_at_once(client: Any) -> None:
    store = SessionStore(client, regenerate_grace=0)
    rec = await store.create(data={"a": 1})
    new_id = await store.regenerate(rec.id)
    assert await store.load(rec.id) is None
    assert await store.was_regenerated(rec.id) is False
    assert await store.load(new_id) is not None
    with pytest.raises(SessionNotFound):
        await store.regenerate(rec.id)


async def test_merge_with_regenerate_applies_changes_and_moves_in_one_step(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"cart": [1]})
    result = await store.merge(
        rec.id, base_version=rec.version, changes={"user": "alice"}, regenerate=True
    )
    assert result.id != rec.id
    stored = await store.get(result.id)
    assert stored is not None
    assert stored.data == {"cart": [1], "user": "alice"}
    assert stored.subject == "alice"
    assert [r.id for r in await store.list_for("alice")] == [result.id]


async def test_delete_all_for_revokes_every_session_of_one_subject(
    store: SessionStore, client: Any
) -> None:
    alice = [await store.create(data={"user": "alice", "n": i}) for i in range(3)]
    bob = await store.create(data={"user": "bob"})
    anonymous = await store.create(data={"cart": []})
    moved = await store.regenerate(alice[0].id)
    assert sorted(r.id for r in await store.list_for("alice")) == sorted(
        [moved, alice[1].id, alice[2].id]
    )

    assert await store.delete_all_for("alice") == 3
    assert await store.list_for("alice") == []
    assert await store.get(moved) is None
    assert await store.get(bob.id) is not None
    assert await store.get(anonymous.id) is not None
    assert not any("alice" in k for k in await _all_keys(client))
    with pytest.raises(SessionNotFound, match="deleted"):
        await store.merge(alice[1].id, base_version=0, changes={"user": "alice"})


async def test_subject_index_follows_login_logout_and_user_switch(store: SessionStore) -> None:
    rec = await store.create(data={"cart": [1]})
    await store.merge(rec.id, base_version=1, changes={"user": 7})
    assert [r.id for r in await store.list_for(7)] == [rec.id]
    await store.merge(rec.id, base_version=2, changes={"user": 8})
    assert await store.list_for(7) == []
    assert [r.subject for r in await store.list_for(8)] == ["8"]
    await store.merge(rec.id, base_version=3, deleted=["user"])
    assert await store.list_for(8) == []
    assert await store.delete_all_for(8) == 0
    assert await store.get(rec.id) is not None


async def test_a_session_that_changed_subject_is_not_revoked_with_the_old_one(
    store: SessionStore,
) -> None:
    rec = await store.create(data={"user": "alice"})
    # The index is written before the record, so a crash can leave extra ids, never missing
    # ones; simulate the leftover: the id is still listed under alice.
    await store.merge(rec.id, base_version=1, changes={"user": "bob"})
    await store._index.add("alice", rec.id)
    assert await store.delete_all_for("alice") == 0
    assert await store.get(rec.id) is not None


async def test_touch_restarts_the_idle_timeout_within_the_absolute_bound(
    client: Any,
) -> None:
    store = SessionStore(client, idle_ttl=100, absolute_ttl=1000)
    rec = await store.create(data={})
    key = store._keys.record(*rec.id.split("."))
    assert 0 < await client.pttl(key) <= 100_000
    await client.pexpire(key, 5_000)
    assert await store.touch(rec.id) is True
    assert 95_000 < await client.pttl(key) <= 100_000
    short = SessionStore(client, idle_ttl=1000, absolute_ttl=100)
    rec2 = await short.create(data={})
    assert await short.touch(rec2.id) is True
    assert await client.pttl(short._keys.record(*rec2.id.split("."))) <= 100_000


async def test_every_key_has_a_ttl_and_one_script_keeps_to_one_hash_tag(
    store: SessionStore, client: Any
) -> None:
    rec = await store.create(data={"user": "alice"})
    new_id = await store.regenerate(rec.id)
    other = await store.create(data={"user": "bob"})
    await store.delete(other.id)
    keys = await _all_keys(client)
    assert len(keys) == 4  # record, moved marker, tombstone, alice's index
    for key in keys:
        assert await client.pttl(key) > 0, key
    family = new_id.split(".")[0]
    assert {key_slot_tag(k) for k in keys if "subject" not in k} == {
        family,
        other.id.split(".")[0],
    }


async def test_session_data_keys_must_be_strings(store: SessionStore) -> None:
    with pytest.raises(Exception, match="non-empty strings"):
        await store.create(data={"": 1})


async def test_redis_down_raises_redis_unavailable(client: Any, store: SessionStore) -> None:
    rec = await store.create(data={"a": 1})
    client.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(RedisUnavailable):
        await store.get(rec.id)
    with pytest.raises(RedisUnavailable):
        await store.merge(rec.id, base_version=1, changes={"a": 2})


async def test_bad_ttls_are_refused(client: Any) -> None:
    with pytest.raises(ValueError, match="idle_ttl"):
        SessionStore(client, idle_ttl=0)
    with pytest.raises(ValueError, match="regenerate_grace"):
        SessionStore(client, regenerate_grace=-1)
    store = SessionStore(
        client, idle_ttl=dt.timedelta(minutes=5), absolute_ttl=dt.timedelta(hours=1)
    )
    assert (store.idle_ms, store.absolute_ms) == (300_000, 3_600_000)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("idle_ttl", float("nan")),
        ("idle_ttl", "60"),
        ("absolute_ttl", float("inf")),
        ("absolute_ttl", -1),
        ("tombstone_ttl", True),
        ("tombstone_ttl", 0),
        ("regenerate_grace", None),
        ("touch_after", -1),
        ("touch_after", 1800),  # not shorter than the default idle_ttl
    ],
)
def test_bad_durations_are_configuration_errors_naming_the_option(
    client: Any, option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        SessionStore(client, **{option: value})


def test_durations_are_kept_in_milliseconds_rounded_up(client: Any) -> None:
    store = SessionStore(client, idle_ttl=1.0004, absolute_ttl=1.1, regenerate_grace=0)
    assert (store.idle_ms, store.absolute_ms, store.grace_ms) == (1001, 1100, 0)


async def test_a_refused_command_is_a_redis_command_error_without_the_redis_text(
    client: Any, store: SessionStore
) -> None:
    rec = await store.create(data={"a": 1})
    family, token = rec.id.split(".")
    key = store._keys.record(family, token)
    await client.delete(key)
    await client.set(key, "not a hash")  # every session command now meets WRONGTYPE
    for call in (store.get(rec.id), store.load(rec.id)):
        with pytest.raises(RedisCommandError) as caught:
            await call
        message = str(caught.value)
        assert message.startswith("session store 'session': ") and "WRONGTYPE" not in message
        assert isinstance(caught.value.__cause__, ResponseError)  # the text stays for the logs
    assert store.guard.breaker.state == "closed"  # the server answered: not an outage


async def test_bad_data_keys_are_usage_errors(store: SessionStore) -> None:
    with pytest.raises(UsageError, match="non-empty strings") as caught:
        await store.create(data={"": 1})
    assert isinstance(caught.value, TypeError)


def test_fast_key_builders_match_the_key_space(store: SessionStore) -> None:
    family, token = new_session_id().split(".")
    assert store._keys.record(family, token) == KeySpace("app", "session").tagged(family, token)
    assert store._keys.moved(family, token) == KeySpace("app", "session.moved").tagged(
        family, token
    )
    assert store._keys.gone(family, token) == KeySpace("app", "session.gone").tagged(family, token)


class LostReplyRedis(SlotCheckingRedis):
    """fakeredis whose next script call runs twice: the first reply is lost, the retry answers.

    That is what redis-py's automatic retry does when a connection breaks after the
    server ran a command. *between* runs another client's command in the gap.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.between: Callable[[], Awaitable[Any]] | None = None
        self.ran_twice = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if not self.armed or name.upper() not in ("EVALSHA", "EVAL"):
            return await super().execute_command(*args, **options)
        await super().execute_command(*args, **options)  # ran; its reply never arrives
        self.armed = False  # (after a NOSCRIPT the script is loaded and sent again: still armed)
        if self.between is not None:
            await self.between()
        self.ran_twice += 1
        return await super().execute_command(*args, **options)  # the retry


@pytest_asyncio.fixture
async def lossy(
    fake_server: fakeredis.FakeServer, decode_responses: bool
) -> AsyncIterator[LostReplyRedis]:
    redis = LostReplyRedis(server=fake_server, decode_responses=decode_responses)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_a_retried_merge_recognises_its_own_write(lossy: LostReplyRedis) -> None:
    store = SessionStore(lossy)
    rec = await store.create(data={"n": 0})
    lossy.armed = True
    result = await store.merge(rec.id, base_version=rec.version, changes={"n": 1})
    assert lossy.ran_twice == 1
    assert result.version == rec.version + 1  # the first run's answer, not a conflict
    stored = await store.get(rec.id)
    assert stored is not None and stored.data == {"n": 1} and stored.version == result.version
    # a different call with the same stale base version is still a conflict
    with pytest.raises(SessionConflict, match="n"):
        await store.merge(rec.id, base_version=rec.version, changes={"n": 5})


async def test_a_retried_write_survives_another_writer_in_the_gap(lossy: LostReplyRedis) -> None:
    store = SessionStore(lossy)
    rec = await store.create(data={"a": 0, "b": 0})
    lossy.between = lambda: store.merge(rec.id, base_version=rec.version, changes={"b": 1})
    lossy.armed = True
    mine = await store.merge(rec.id, base_version=rec.version, changes={"a": 1})
    assert mine.version == rec.version + 1
    stored = await store.get(rec.id)
    assert stored is not None
    assert stored.data == {"a": 1, "b": 1} and stored.version == rec.version + 2


async def test_a_retried_update_returns_the_record(lossy: LostReplyRedis) -> None:
    store = SessionStore(lossy)
    rec = await store.create(data={"a": 1})
    lossy.armed = True
    updated = await store.update(rec.id, data={"a": 2}, expected_version=rec.version)
    assert lossy.ran_twice == 1
    assert updated.data == {"a": 2} and updated.version == rec.version + 1
    assert "w_ring" not in updated.model_dump_json()  # bookkeeping never reaches callers


async def test_a_retried_regeneration_answers_the_new_id(lossy: LostReplyRedis) -> None:
    store = SessionStore(lossy)
    rec = await store.create(data={"theme": "dark"})
    lossy.armed = True
    new_id = await store.regenerate(rec.id)
    assert lossy.ran_twice == 1
    moved = await store.load(new_id)
    assert moved is not None and moved.data == {"theme": "dark"}
    assert await store.load(rec.id) is None
    with pytest.raises(SessionNotFound, match="regenerated"):
        await store.regenerate(rec.id)  # a new call through the old id is still refused

    owned = await store.create(data={"user": "alice"})
    lossy.armed = True
    login = await store.merge(
        owned.id, base_version=owned.version, changes={"n": 1}, regenerate=True, subject="alice"
    )
    assert lossy.ran_twice == 2
    assert [r.id for r in await store.list_for("alice")] == [login.id]  # old id left the index


async def test_the_write_nonces_kept_on_a_record_are_bounded(client: Any) -> None:
    store = SessionStore(client)
    rec = await store.create(data={})
    for i in range(20):
        await store.merge(rec.id, base_version=0, changes={"n": i})
    fields = await client.hkeys(store._keys.record(*rec.id.split(".")))
    names = [f.decode() if isinstance(f, bytes) else f for f in fields]
    assert len([n for n in names if n.startswith("w:")]) == 4


async def test_a_loaded_record_is_the_model_model_construct_builds(store: SessionStore) -> None:
    rec = await store.create(data={"user": 7, "tags": ["a"]}, client_ip="10.0.0.3", locked=True)
    for read in (await store.load(rec.id), await store.get(rec.id), rec):
        assert read is not None
        built = SessionRecord.model_construct(
            **{name: getattr(read, name) for name in read.__dict__}
        )
        assert list(read.__dict__) == list(SessionRecord.model_fields)  # declaration order
        assert read.model_fields_set == built.model_fields_set == set(SessionRecord.model_fields)
        assert read == built and repr(read) == repr(built)
        assert read.model_dump_json() == built.model_dump_json()
        assert read.model_copy(update={"locked": False}).locked is False
        read.client_ip = "10.0.0.4"  # an ordinary model: attributes can be set
        assert read.client_ip == "10.0.0.4" and read.model_extra is None


async def test_loads_never_share_mutable_values_and_keep_every_type(store: SessionStore) -> None:
    data = {
        "user": 7,
        "name": "Ada",
        "ratio": 0.5,
        "admin": False,
        "none": None,
        "raw": b"\x00\xff",
        "when": dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
        "cart": [1, 2],
        "prefs": {"theme": "dark"},
        "long": "x" * 5000,
    }
    rec = await store.create(data=data)
    first = await store.load(rec.id)
    assert first is not None and first.data == data
    first.data["cart"].append(3)  # a request changing what it read, in place
    first.data["prefs"]["theme"] = "light"
    first.data["user"] = 8
    second = await store.load(rec.id)
    assert second is not None and second.data == data  # the next read sees the stored values
    assert second.data["cart"] is not first.data["cart"]
    assert {k: type(v) for k, v in second.data.items()} == {k: type(v) for k, v in data.items()}
    third = await store.get(rec.id)
    assert third is not None and third.data == data and third.data is not second.data


async def test_a_hash_without_a_deadline_at_a_record_key_reads_as_missing(
    client: Any, store: SessionStore
) -> None:
    session_id = new_session_id()
    key = store._keys.record(*session_id.split("."))
    await client.hset(key, mapping={"version": 1, "unique_key": "u"})  # not written by the store
    assert await store.load(session_id) is None
    assert await client.pttl(key) == -1  # left alone: neither read nor expired by the load
