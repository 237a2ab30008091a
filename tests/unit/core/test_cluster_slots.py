"""The CROSSSLOT guard: every unit test on fake_redis runs with it, so it must really bite."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ResponseError

from app.core.keys import KeySpace
from app.core.scripts import Script
from app.testing.slots import SlotCheckingRedis, command_keys

BOTH = Script("return redis.call('MGET', KEYS[1], KEYS[2])", name="both")


def test_this_suite_runs_with_the_guard_on(fake_redis: Any) -> None:
    assert isinstance(fake_redis, SlotCheckingRedis)


async def test_scripts_over_two_slots_fail_like_on_cluster(fake_redis: Any) -> None:
    with pytest.raises(ResponseError, match="CROSSSLOT"):
        await BOTH(fake_redis, ["user:1", "user:2"])


async def test_tagged_keys_pass(fake_redis: Any) -> None:
    ks = KeySpace("app", "x")
    await fake_redis.set(ks.tagged("u1", "a"), b"1")
    assert await BOTH(fake_redis, [ks.tagged("u1", "a"), ks.tagged("u1", "b")]) == [b"1", None]


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.mget("a", "b"),
        lambda r: r.delete("a", "b"),
        lambda r: r.rename("a", "b"),
        lambda r: r.blpop(["a", "b"], timeout=0.01),
        lambda r: r.xread({"a": "0", "b": "0"}),
        lambda r: r.mset({"a": 1, "b": 2}),
    ],
)
async def test_multi_key_commands_over_two_slots_fail(fake_redis: Any, call: Any) -> None:
    with pytest.raises(ResponseError, match="CROSSSLOT"):
        await call(fake_redis)


async def test_transactions_over_two_slots_fail_but_plain_pipelines_pass(fake_redis: Any) -> None:
    async with fake_redis.pipeline(transaction=True) as pipe:
        pipe.set("a", 1).set("b", 2)
        with pytest.raises(ResponseError, match="CROSSSLOT"):
            await pipe.execute()
    async with fake_redis.pipeline(transaction=False) as pipe:
        pipe.set("a", 1).set("b", 2)
        assert await pipe.execute() == [True, True]


def test_key_extraction() -> None:
    assert command_keys(["EVALSHA", "sha", 2, "k1", "k2", "arg"]) == ["k1", "k2"]
    assert command_keys(["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", "s2", ">", ">"]) == [
        "s1",
        "s2",
    ]
    assert command_keys(["ZUNIONSTORE", "d", 2, "a", "b"]) == ["d", "a", "b"]
    assert command_keys(["GET", "k"]) == []
