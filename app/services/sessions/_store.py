"""``SessionStore``: the verbs of server-side sessions over its private collaborators.

Keys (``_keys``), the subject index (``_index``), the hash layout (``_fields``)
and the write path (``_write``) are modules of their own; the store holds one of
each, and one ``app.core.guard.Guard`` that every Redis call of all of them runs in.
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError, ToolkitError
from app.core.guard import Duration, Guard, as_seconds, as_text, to_ms
from app.core.keys import KeySpace
from app.core.memo import BoundedMemo
from app.core.redis import AnyRedis, client_decodes_responses, scan_keys
from app.core.scripts import Script, ScriptArg
from app.core.telemetry import traced
from app.services.sessions._fields import RecordFields
from app.services.sessions._ids import new_session_id, split_id
from app.services.sessions._index import SubjectIndex
from app.services.sessions._keys import SessionKeys
from app.services.sessions._record import (
    SessionRecord,
    WriteResult,
    hash_of,
    new_record,
    time_of,
)
from app.services.sessions._write import SessionWriter

__all__ = ["DEFAULT_ABSOLUTE_TTL", "DEFAULT_IDLE_TTL", "SessionStore"]

DEFAULT_IDLE_TTL: Final = 30 * 60.0
"""Seconds without a request after which a session ends (OWASP: 15-30 min)."""
DEFAULT_ABSOLUTE_TTL: Final = 12 * 3600.0
"""Seconds after creation after which a session ends whatever its activity."""

_CREATE = Script.from_package("app.services.sessions", "lua/session_create.lua")
_LOAD = Script.from_package("app.services.sessions", "lua/session_load.lua")
_DELETE = Script.from_package("app.services.sessions", "lua/session_delete.lua")
_TOUCH = Script.from_package("app.services.sessions", "lua/session_touch.lua")

_TOUCH_AFTER_SHARE: Final = 0.01
"""Default ``touch_after``: this share of ``idle_ttl`` (18 s of the default 30 min)."""
_TOUCHED_MAX: Final = 16_384  # sessions whose last idle restart this process remembers


def touch_after_seconds(touch_after: Duration | None, idle_seconds: float) -> float:
    """*touch_after* checked against *idle_seconds* (default: 1% of it), in seconds.

    ``ConfigurationError`` when it is not a duration (0 allowed) or not shorter
    than the idle timeout.
    """
    if touch_after is None:
        return idle_seconds * _TOUCH_AFTER_SHARE
    seconds = as_seconds(touch_after, "touch_after", allow_zero=True)
    if seconds >= idle_seconds:
        raise ConfigurationError("touch_after must be shorter than idle_ttl")
    return seconds


_BATCH = 100  # HGETALLs per pipeline
_PARALLEL = 16  # concurrent deletes in delete_all_for (leaves the pool to the requests)


class SessionStore:
    """Sessions in Redis: create, read, update without lost writes, expire, revoke.

    Args:
        redis: any ``redis.asyncio`` client (``decode_responses`` True or False),
            fakeredis, or a ``RedisCluster``.
        idle_ttl: seconds (or timedelta) without activity after which a session ends.
        absolute_ttl: seconds after creation after which it ends regardless.
        namespace: key namespace (``<prefix>:<namespace>:...``).
        codec: encodes each data value (default: the shared JSON codec).
        subject_key: the data key naming the session's owner, indexed for
            ``delete_all_for``; ``None`` disables the index.
        regenerate_grace: seconds an id replaced by ``regenerate`` is remembered as
            moved (``was_regenerated``; writes through it say so). It never
            resolves to the new session: 0 forgets it at once.
        tombstone_ttl: seconds a deleted id is remembered as deleted.
        touch_after: seconds after this process restarted a session's idle timeout
            during which its ``load`` reads without restarting it again (a plain
            ``HGETALL`` instead of the read-and-touch script). Default: 1% of
            ``idle_ttl``; 0 restarts it on every load. A session then ends between
            ``idle_ttl - touch_after`` and ``idle_ttl`` after its last request,
            never later, and never past ``absolute_ttl``.
        clock: the monotonic clock ``touch_after`` is measured on, in seconds
            (default ``time.monotonic``; tests pass one they move by hand).

    Durations are seconds (int or float) or ``timedelta``, kept by Redis in whole
    milliseconds rounded up; a bad one (zero, negative, NaN, infinite, not a
    number) raises ``ConfigurationError`` here.

    Every method is one Redis round trip unless its docstring says otherwise,
    and raises ``RedisUnavailable`` when Redis cannot be reached (or the circuit
    breaker is open), ``RedisCommandError`` when Redis refuses a command (its
    text stays in ``__cause__``). Writes are single Lua scripts: cancelled
    mid-call, a write has either happened entirely or not at all. ``guard`` is
    the ``app.core.guard.Guard`` every call runs in (its breaker is the client's).
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        idle_ttl: Duration = DEFAULT_IDLE_TTL,
        absolute_ttl: Duration = DEFAULT_ABSOLUTE_TTL,
        namespace: str = "session",
        codec: Codec | None = None,
        subject_key: str | None = "user",
        regenerate_grace: Duration = 10.0,
        tombstone_ttl: Duration = 60.0,
        touch_after: Duration | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.idle_ms = to_ms(as_seconds(idle_ttl, "idle_ttl"))
        self.absolute_ms = to_ms(as_seconds(absolute_ttl, "absolute_ttl"))
        self.grace_ms = to_ms(as_seconds(regenerate_grace, "regenerate_grace", allow_zero=True))
        self.tombstone_ms = to_ms(as_seconds(tombstone_ttl, "tombstone_ttl"))
        self.touch_after = touch_after_seconds(touch_after, self.idle_ms / 1000)
        self._clock = clock
        # session id -> the clock time until which a load need not restart its idle
        # timeout (this process restarted it less than touch_after ago). Bounded: a
        # forgotten session is only touched once more.
        self._touched: BoundedMemo[str, float] = BoundedMemo(_TOUCHED_MAX)
        self.subject_key = subject_key
        self.codec = (codec or default_codec()).with_text_safe(client_decodes_responses(redis))
        self._keys = SessionKeys(KeySpace.of(namespace))
        self.guard = Guard(redis, f"session store {namespace!r}")
        self._fields = RecordFields(self.codec, subject_key)
        self._index = SubjectIndex(redis, self._keys, self.guard, self.absolute_ms)
        self._writer = SessionWriter(
            redis,
            keys=self._keys,
            guard=self.guard,
            index=self._index,
            fields=self._fields,
            grace_ms=self.grace_ms,
        )
        self._idle_arg = str(self.idle_ms)
        self._absolute_arg = str(self.absolute_ms)

    # -- create ---------------------------------------------------------------

    @traced("session.save", result=lambda _: "saved")
    async def create(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        client_ip: str | None = None,
        locked: bool = False,
    ) -> SessionRecord:
        """Store a new session with a fresh random id and return its record.

        TTL: ``min(idle_ttl, absolute_ttl)`` from now. When *data* names a
        subject (``subject_key``), the id is first added to that subject's index
        (a second round trip). Atomic: the record appears whole or not at all.
        """
        values = dict(data or {})
        encoded = self._fields.encode_items(values)
        subject = self._fields.subject_of(values)
        for _ in range(3):
            session_id = new_session_id()
            family, token = session_id.split(".")
            unique_key = secrets.token_urlsafe(16)
            if subject:
                await self._index.add(subject, session_id)
            args: builtins.list[ScriptArg] = [
                self._idle_arg,
                self._absolute_arg,
                unique_key,
                client_ip or "",
                "1" if locked else "0",
                subject,
            ]
            for name, value in encoded:
                args += (name, value)
            with self.guard:
                reply = await _CREATE(
                    self.redis, keys=[self._keys.record(family, token)], args=args
                )
            if int(reply[0]) == 1:
                created = time_of(reply[1])
                return new_record(
                    session_id,
                    unique_key,
                    client_ip,
                    locked,
                    created,
                    created,
                    time_of(reply[2]),
                    1,
                    subject or None,
                    values,
                )
        raise ToolkitError("could not allocate a unique session id after 3 attempts")

    # -- read -----------------------------------------------------------------

    @traced("session.load", result=lambda record: "found" if record else "missing")
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record of *session_id*, or None when unknown, expired or deleted.

        A pure read: it does not extend the idle timeout (``load`` does). An id
        that ``regenerate`` replaced reads None. Undecodable data raises
        ``CodecError``.
        """
        parts = split_id(session_id)
        if parts is None:
            return None
        with self.guard:
            fields = await self.redis.hgetall(self._keys.record(*parts))
        return self._fields.read(session_id, fields)

    @traced("session.load", result=lambda record: "found" if record else "missing")
    async def load(self, session_id: str, *, touch: bool = True) -> SessionRecord | None:
        """Read a session as a request does, restarting its idle timeout.

        With *touch* the TTL restarts at ``min(idle_ttl, time to expires_at)``
        in the same script that reads, unless this store restarted it less than
        ``touch_after`` ago: then the read is a plain ``HGETALL`` (every writer
        bounds the key's TTL by ``expires_at``, so the key cannot outlive its
        deadline and no check is needed). Returns None when the id is unknown,
        expired, deleted or was replaced by ``regenerate`` (whenever that was:
        the old id of a regenerated session never reads the new one's data).
        """
        parts = split_id(session_id)
        if parts is None:
            return None
        key = self._keys.record(*parts)
        if touch:
            now = self._clock()  # before the call: the restart it makes comes later
            due = self._touched.get(session_id)  # never set with touch_after=0
            if due is None or now >= due:
                with self.guard:
                    flat = await _LOAD(self.redis, keys=[key])
                if not flat:
                    return None
                if self.touch_after:
                    self._touched.put(session_id, now + self.touch_after)
                return self._fields.parse(session_id, hash_of(flat))
        with self.guard:
            fields = await self.redis.hgetall(key)
        return self._fields.read(session_id, fields)

    async def was_regenerated(self, session_id: str) -> bool:
        """True when *session_id* was replaced by ``regenerate`` less than ``regenerate_grace`` ago.

        Only a fact about the old id (it gives no access to the new session):
        the session middleware uses it to leave the browser's cookie alone for
        a request that raced a login, instead of clearing it as a forged one.
        """
        parts = split_id(session_id)
        if parts is None:
            return False
        with self.guard:
            return bool(await self.redis.exists(self._keys.moved(*parts)))

    async def touch(self, session_id: str) -> bool:
        """Restart the idle timeout (never past the absolute deadline); False if gone."""
        parts = split_id(session_id)
        if parts is None:
            return False
        with self.guard:
            left = await _TOUCH(self.redis, keys=[self._keys.record(*parts)])
        return int(left) > 0

    # -- write ----------------------------------------------------------------

    @traced("session.save", result=lambda _: "saved")
    async def update(
        self,
        session_id: str,
        *,
        data: Mapping[str, Any] | None = None,
        locked: bool | None = None,
        expected_version: int | None = None,
    ) -> SessionRecord:
        """Replace the data (when given) and/or set ``locked``; return the stored record.

        *data* replaces every data key (removed keys count as changed for
        concurrent ``merge`` callers). With *expected_version* the write happens
        only if the record is still at that version, else ``SessionConflict``.
        Raises ``SessionNotFound`` when the session is unknown, expired or
        deleted: an update never recreates it. Refreshes the idle timeout; a
        call that changes nothing keeps ``version`` and ``modified_at``.
        """
        reply = await self._writer.write(
            session_id,
            mode="keep" if data is None else "replace",
            base_version=expected_version or 0,
            changes=data,
            deleted=(),
            locked=locked,
            regenerate=False,
            known_subject=None,
            want_record=True,
        )
        assert isinstance(reply, SessionRecord)
        return reply

    @traced("session.save", result=lambda _: "saved")
    async def merge(
        self,
        session_id: str,
        *,
        base_version: int,
        changes: Mapping[str, Any] | None = None,
        deleted: Iterable[str] = (),
        locked: bool | None = None,
        regenerate: bool = False,
        subject: str | None = None,
    ) -> WriteResult:
        """Apply a request's changes to the session it read at *base_version*.

        Each key in *changes* / *deleted* is written unless another writer
        changed that key after *base_version* (a key both deleted is no
        conflict): then nothing is written and ``SessionConflict`` lists the keys. Other keys are
        untouched, so concurrent writers of different keys never undo each
        other. ``base_version=0`` skips the check (last writer wins per key).

        With *regenerate* the session moves to a new id (same family, new
        ``unique_key``) in the same script, and the old id stops working for
        reads and writes at once; *subject* is the session's current
        subject if the caller knows it (saves a round trip when indexed).
        Raises ``SessionNotFound`` when the session is unknown, expired or
        deleted: a write never resurrects it.
        """
        reply = await self._writer.write(
            session_id,
            mode="merge",
            base_version=base_version,
            changes=changes,
            deleted=deleted,
            locked=locked,
            regenerate=regenerate,
            known_subject=subject,
            want_record=False,
        )
        assert isinstance(reply, WriteResult)
        return reply

    async def regenerate(self, session_id: str) -> str:
        """Move the session to a new id (fixation defence after a login); return it.

        Atomic: data, version and TTL move with the record; ``unique_key``
        changes. The old id is dead from that moment: it reads None, writes
        nothing, and ``regenerate`` through it raises ``SessionNotFound`` (as
        for a session that is gone), so a fixated id never yields a valid one.
        """
        result = await self.merge(session_id, base_version=0, regenerate=True)
        return result.id

    # -- delete ---------------------------------------------------------------

    async def delete(self, session_id: str) -> bool:
        """Delete a session (logout); True when it existed.

        Leaves a tombstone for ``tombstone_ttl`` so a request still holding the
        session cannot write it back (it gets ``SessionNotFound``), and stops an
        id replaced by ``regenerate`` from resolving. Also removes the id from
        its subject's index (a second round trip when it had a subject).
        """
        parts = split_id(session_id)
        if parts is None:
            return False
        reply = await self._delete(parts, expected_subject="")
        if int(reply[0]) != 1:
            return False
        subject = as_text(reply[1])
        if subject:
            await self._index.drop(subject, session_id)
        return True

    async def _delete(self, parts: tuple[str, str], *, expected_subject: str) -> Any:
        family, token = parts
        keys = [
            self._keys.record(family, token),
            self._keys.gone(family, token),
            self._keys.moved(family, token),
        ]
        with self.guard:
            return await _DELETE(self.redis, keys=keys, args=[self.tombstone_ms, expected_subject])

    async def delete_all_for(self, subject: str | int) -> int:
        """Revoke every session of *subject* (the value of ``subject_key``); return how many.

        Reads the subject's index and deletes each session that still names
        this subject (each with its tombstone), pruning stale ids; repeats
        while sessions were added during the pass (at most 5 passes). One round
        trip per session (16 in flight at a time) plus two per pass.
        """
        if self.subject_key is None:
            raise ToolkitError("delete_all_for needs a SessionStore with a subject_key")
        name = str(subject)
        deleted = 0
        for _ in range(5):
            ids = await self._index.members(name)
            if not ids:
                break
            for start in range(0, len(ids), _PARALLEL):
                chunk = ids[start : start + _PARALLEL]
                replies = await asyncio.gather(
                    *(self._delete(p, expected_subject=name) for p in map(split_id, chunk) if p)
                )
                deleted += sum(1 for r in replies if int(r[0]) == 1)
            await self._index.remove(name, ids)
        return deleted

    async def list_for(self, subject: str | int) -> builtins.list[SessionRecord]:
        """The live sessions of *subject* (a device list); prunes stale index entries."""
        name = str(subject)
        ids = sorted(await self._index.members(name))
        records = await self._get_many(ids)
        stale = [i for i, r in zip(ids, records, strict=True) if r is None or r.subject != name]
        if stale:
            await self._index.remove(name, stale)
        return [r for r in records if r is not None and r.subject == name]

    # -- listing --------------------------------------------------------------

    async def _get_many(self, ids: Sequence[str]) -> builtins.list[SessionRecord | None]:
        found: dict[str, SessionRecord] = {}
        valid = [(i, p) for i in ids if (p := split_id(i)) is not None]
        for start in range(0, len(valid), _BATCH):
            chunk = valid[start : start + _BATCH]
            with self.guard:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for _, parts in chunk:
                        pipe.hgetall(self._keys.record(*parts))
                    replies = await pipe.execute()
            for (session_id, _), fields in zip(chunk, replies, strict=True):
                if fields:
                    found[session_id] = self._fields.parse(session_id, fields)
        return [found.get(i) for i in ids]

    async def list(self) -> AsyncIterator[SessionRecord]:
        """Every live session (SCAN over every primary, then HGETALL in batches of 100).

        Not a snapshot: sessions created or deleted during the walk may or may
        not appear, and one may appear twice (SCAN's guarantee). Reads only.
        """
        batch: builtins.list[str] = []
        keys = scan_keys(self.redis, self._keys.records.pattern("*"))
        while True:
            with self.guard:
                try:
                    key = await anext(keys)
                except StopAsyncIteration:
                    break
            session_id = self._keys.id_of(key)
            if session_id is None:
                continue
            batch.append(session_id)
            if len(batch) >= _BATCH:
                for record in await self._get_many(batch):
                    if record is not None:
                        yield record
                batch = []
        if batch:
            for record in await self._get_many(batch):
                if record is not None:
                    yield record
