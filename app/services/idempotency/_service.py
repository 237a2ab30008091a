"""``IdempotencyService``: one Redis hash per key, claimed, completed or released by Lua.

See the package docstring for the record lifecycle and the waiters' wake-up list.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Final

from app.core.clock import Clock
from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError
from app.core.guard import Duration, Guard, as_seconds, as_text, block_cap, to_ms
from app.core.keys import KeySpace
from app.core.redis import AnyRedis, client_decodes_responses
from app.core.scripts import Script
from app.core.telemetry import traced
from app.services.idempotency._claim import OUTCOMES, STATUS, Claim
from app.services.idempotency._heartbeat import Heartbeat

__all__ = ["IdempotencyService"]

_CLAIM = Script.from_package("app.services.idempotency", "lua/idempotency_claim.lua")
_COMPLETE = Script.from_package("app.services.idempotency", "lua/idempotency_complete.lua")
_RELEASE = Script.from_package("app.services.idempotency", "lua/idempotency_release.lua")
_RENEW = Script.from_package("app.services.idempotency", "lua/idempotency_renew.lua")

_MAX_BLOCK: Final = 1.0  # longest single BLPOP while waiting; the loop re-checks the lease
_NOTIFY_TTL_MS: Final = 60_000
_ABSENT: Final = 4  # the claim script's answer for a fallback record that does not exist
_UNCLAIMED: Final = ""


def _look(name: str, key: str) -> bytes:
    return b"0" if name == key else b"1"


class IdempotencyService:
    """Idempotency records in Redis for *redis* (any client, ``decode_responses`` either way).

    Args:
        redis: a ``redis.asyncio`` client, a ``RedisCluster`` or fakeredis.
        ttl: how long a completed result is kept (seconds or ``timedelta``; default 24 h).
        lease: how long an in-flight claim lives without a renewal (default 30 s).
            Keep it short: it is how long a crashed worker blocks its key.
        namespace: the key space service name (``<prefix>:<namespace>:{key}``).
        codec: how results are encoded (default: the settings' JSON codec).

    Durations are validated here (``ConfigurationError`` for zero, a negative,
    NaN, infinity or a non-number) and kept in whole milliseconds, rounded up.
    Every Redis call runs under the service's ``guard``: Redis unreachable (or
    the client's breaker open) raises ``RedisUnavailable``; a command Redis
    refuses raises ``RedisCommandError`` (Redis's text in ``__cause__``).
    """

    __slots__ = (
        "_codec",
        "_keys",
        "_lease_ms",
        "_max_block",
        "_ttl_ms",
        "guard",
        "redis",
    )

    def __init__(
        self,
        redis: AnyRedis,
        ttl: Duration = 86400,
        *,
        lease: Duration = 30.0,
        namespace: str = "idempotency",
        codec: Codec | None = None,
    ) -> None:
        self.redis = redis
        self._ttl_ms = to_ms(as_seconds(ttl, "ttl"))
        self._lease_ms = to_ms(as_seconds(lease, "lease"))
        self._keys = KeySpace.of(namespace)
        text_safe = client_decodes_responses(redis)
        self._codec = (codec or default_codec()).with_text_safe(text_safe)
        # a BLPOP must return before the client's socket timeout gives up on it
        self._max_block = block_cap(redis, _MAX_BLOCK)
        self.guard = Guard(redis, f"idempotency {namespace!r}")
        """The guard every Redis call of this service runs under (the client's breaker)."""

    @property
    def ttl(self) -> float:
        """Seconds a completed result is kept."""
        return self._ttl_ms / 1000

    @property
    def lease(self) -> float:
        """Seconds an in-flight claim lives without a renewal."""
        return self._lease_ms / 1000

    def record_key(self, key: str) -> str:
        """The Redis key of *key*'s record (escaped, hash-tagged)."""
        return self._keys.tagged(key)

    def _record_keys(self, key: str) -> tuple[str, str]:
        """*key*'s record and its wake-up list (same hash tag), escaping *key* once."""
        record = self._keys.tagged(key)
        return record, record + ":n"

    def _notify_key(self, key: str) -> str:
        return self._record_keys(key)[1]

    # -- the DESIGN.md contract ----------------------------------------------

    async def is_duplicate(self, key: str) -> bool:
        """True if *key* was seen before; the first caller gets False and marks it seen.

        Atomic (one Lua call): among any number of concurrent callers exactly one
        gets False. The mark lasts ``lease`` seconds unless ``store_request``
        stores a result (then ``ttl``), so a caller that crashes before storing
        blocks the key for one lease only. Raises ``RedisUnavailable`` when Redis
        is down; cancelling the call may or may not have marked the key.
        """
        claim = await self.claim(key)
        return claim.status != "new"

    async def store_request(self, key: str, result: Any, *, ttl: Duration | None = None) -> None:
        """Store *result* as the outcome of *key* for ``ttl`` seconds (default: the service's).

        Overwrites whatever the key held (no owner token: use ``complete`` for
        that) and wakes callers waiting on the key. One round trip; raises
        ``CodecError`` for an unencodable result and ``RedisUnavailable`` when
        Redis is down.
        """
        keys, args = self._completion(key, _UNCLAIMED, result, ttl)
        with self.guard:
            await _COMPLETE(self.redis, keys=keys, args=args)

    async def get_result(self, key: str, type_: Any = None) -> Any:
        """The stored result of *key*, or None when unknown, expired or still in flight.

        *type_* validates and converts the stored value (e.g. a pydantic model).
        One round trip; raises ``RedisUnavailable`` when Redis is down.
        """
        with self.guard:
            state, blob = await self.redis.hmget(self.record_key(key), ["s", "r"])
        if state is None or as_text(state) != "c" or blob is None:
            return None
        return self._codec.decode(blob, type_)

    async def forget(self, key: str) -> bool:
        """Delete *key*'s record whatever its state; True if there was one.

        An operator tool (and a test helper): the next claim of the key is new.
        """
        with self.guard:
            deleted = await self.redis.delete(self.record_key(key), self._notify_key(key))
        return bool(deleted)

    # -- primitives ----------------------------------------------------------

    @traced("idempotency.claim", result=lambda claim: OUTCOMES[claim.status])
    async def claim(
        self,
        key: str,
        fingerprint: str = "",
        *,
        wait: float = 0.0,
        result_type: Any = None,
        fallbacks: Sequence[str] = (),
    ) -> Claim:
        """Claim *key* for a request whose payload hashes to *fingerprint*.

        One Lua round trip decides atomically: a free key becomes in flight
        under a fresh owner token for ``lease`` seconds (``"new"``); otherwise
        the answer is ``"mismatch"`` (another fingerprint), ``"completed"``
        (with the stored result, decoded as *result_type*) or ``"in_flight"``.

        *fallbacks* are older names of the same record (the caller's scope
        under fallback keys during a secret rotation): each is looked at first,
        without creating it (one round trip each), and the first that exists
        answers instead of *key*; ``Claim.key`` names the record that answered,
        the one to ``complete`` or ``release``. Without fallbacks: one round trip.

        With ``wait > 0`` an in-flight answer parks the caller (``BLPOP`` on the
        key's notify list, one pooled connection held) until the owner
        completes or releases the key or its lease runs out, for at most *wait*
        seconds; then it claims again, so a waiter can get ``"completed"``, or
        ``"new"`` when the first attempt failed and released the key (it then
        owns the key and must do the work). After *wait* seconds it returns
        ``"in_flight"``. Cancelling a wait leaves nothing behind.

        Raises ``RedisUnavailable`` when Redis is down.
        """
        if not fallbacks and wait <= 0:  # the common case: one round trip, nothing to loop on
            token = os.urandom(16).hex()  # secrets.token_hex(16), without its two calls
            record, notify = self._record_keys(key)
            with self.guard:
                code, payload = await _CLAIM(
                    self.redis,
                    keys=(record, notify),
                    args=(fingerprint, token, self._lease_ms),  # no waiting, no look-only
                )
            return self._answer(key, int(code), payload, token, result_type)
        register = b"1" if wait > 0 else b"0"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        names = [*(name for name in fallbacks if name != key), key]
        while True:
            token = os.urandom(16).hex()
            for name in names:
                code, payload = await self._claim_script(
                    name, fingerprint, token, register, _look(name, key)
                )
                if int(code) != _ABSENT:
                    break
            claim = self._answer(name, int(code), payload, token, result_type)
            if claim.status != "in_flight":
                return claim
            remaining = deadline - loop.time()
            if remaining <= 0:
                return claim
            lease_left = claim.lease_remaining or 0.0
            block = min(remaining, self._max_block, max(lease_left, 0.01))
            with self.guard:
                await self.redis.blpop([self._notify_key(name)], timeout=block)

    async def _claim_script(
        self, name: str, fingerprint: str, token: str, register: bytes, look: bytes
    ) -> Any:
        record, notify = self._record_keys(name)
        with self.guard:
            return await _CLAIM(
                self.redis,
                keys=(record, notify),
                args=(fingerprint, token, self._lease_ms, register, look),
            )

    def _answer(self, name: str, code: int, payload: Any, token: str, result_type: Any) -> Claim:
        """The ``Claim`` for the claim script's reply (``code``, ``payload``) on record *name*."""
        status = STATUS[code]
        if status == "new":
            return Claim(status, name, token=token)
        if status == "completed":
            return Claim(status, name, result=self._codec.decode(payload, result_type))
        if status == "mismatch":
            return Claim(status, name)
        return Claim(status, name, lease_remaining=max(int(payload), 0) / 1000)

    async def complete(
        self, key: str, token: str, result: Any, *, ttl: Duration | None = None
    ) -> bool:
        """Store *result* for the claim *token* owns and keep it ``ttl`` seconds.

        Returns False, storing nothing, when the claim is not this token's any
        more (its lease expired and someone else may have claimed the key).
        Wakes every waiter. One round trip; raises ``RedisUnavailable`` when
        Redis is down (the claim then stays in flight until its lease ends).
        """
        if not token:
            raise ConfigurationError("complete() needs the owner token from claim()")
        keys, args = self._completion(key, token, result, ttl)
        with self.guard:
            done = await _COMPLETE(self.redis, keys=keys, args=args)
        return bool(done)

    def _completion(
        self, key: str, token: str, result: Any, ttl: Duration | None
    ) -> tuple[tuple[str, str], tuple[str, bytes, int, int]]:
        """The complete script's keys and arguments (``CodecError`` for an unencodable result)."""
        ttl_ms = self._ttl_ms if ttl is None else to_ms(as_seconds(ttl, "ttl"))
        return self._record_keys(key), (token, self._codec.encode(result), ttl_ms, _NOTIFY_TTL_MS)

    async def release(self, key: str, token: str) -> bool:
        """Drop the in-flight claim *token* owns so the key can be claimed again.

        For work that failed and may be retried. Returns False when the claim
        is not this token's (expired, completed, or another owner's). Wakes
        every waiter. One round trip; raises ``RedisUnavailable`` when Redis is
        down (the claim then ends with its lease).
        """
        with self.guard:
            done = await _RELEASE(
                self.redis,
                keys=self._record_keys(key),
                args=(token, _NOTIFY_TTL_MS),
            )
        return bool(done)

    async def renew(self, key: str, token: str) -> bool:
        """Extend the in-flight lease of the claim *token* owns to ``lease`` seconds from now.

        Returns False when the claim is not this token's any more. One round
        trip; raises ``RedisUnavailable`` when Redis is down.
        """
        with self.guard:
            done = await _RENEW(
                self.redis, keys=(self.record_key(key),), args=(token, self._lease_ms)
            )
        return bool(done)

    def heartbeat(
        self,
        key: str,
        token: str,
        *,
        interval: Duration | None = None,
        clock: Clock | None = None,
    ) -> Heartbeat:
        """Renews the claim every *interval* seconds (default: a third of the lease).

        ``async with service.heartbeat(key, token) as hb: ...`` (or
        ``hb.start()`` / ``await hb.stop()``). Starting arms a timer; the task
        that renews is created only when the first renewal is due, so work that
        ends sooner costs no task. ``hb.lost`` turns True when a renewal finds
        the claim gone; the heartbeat then stops. *clock* times the renewals
        (default ``LOOP_CLOCK``, the event loop's time).
        """
        return Heartbeat(self, key, token, interval=interval or self._lease_ms / 3000, clock=clock)
